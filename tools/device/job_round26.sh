#!/usr/bin/env bash
# Device jobs of 2026-12-05 (third session; one warm H200, after tools/device/stage.sh staged /tmp/site).
# Each job first seeds this machine's caches with the engine measurements its group was made with, so a run added
# to an earlier session's group gets the same arrival rate (the same service model / capacity) as its siblings:
#   .device_carry/service/<lm>__cuda[__offload].json   static path: the group's calibration (from its metrics.json)
#   .device_carry/capacity/<engine key>.json           continuous engine: the group's saturation-run capacity
#   bash tools/device/job_round26.sh godel     GODEL-ccc static path, seed SSEEDS (2), policies SPOLS
#   bash tools/device/job_round26.sh smollm2   SmolLM2 continuous, SPOL (ltr) x SSEEDS (2), MAX_SEQS 128 (runs.py)
#   bash tools/device/job_round26.sh predproc  DialoGPT-ccc continuous (seqs 64), fcfs/sjf_proxy/ltr x 3 seeds with the
#                                              predictors in their own process (scheduler.predictor_process=true,
#                                              PT threads), a group of its own
set -o pipefail
. tools/device/env.sh  # .whl install, environment, log filter F, GPU line
mkdir -p /tmp/rtlm/schedule/service /tmp/rtlm/schedule/capacity
cp .device_carry/service/*.json /tmp/rtlm/schedule/service/ 2>/dev/null
cp .device_carry/capacity/*.json /tmp/rtlm/schedule/capacity/ 2>/dev/null
case "$1" in
godel)
    SLMS=godel_ccc SSEEDS=${SSEEDS:-2} bash tools/device/job_round23.sh static ;;
smollm2)
    SPOL=${SPOL:-ltr} SSEEDS=${SSEEDS:-2} bash tools/device/job_round23.sh smollm2 ;;
predproc)
    timeout ${PS:-540} python3 -m rtlm_lab.tasks.schedule -m mode=real lm=dialogpt_ccc platform=cuda \
        platform.engine.max_seqs=64 platform.offload_workers=0 workload.n_requests=1000 workload.rho=0.9 \
        seed=${PSEEDS:-0,1,2} policy=${PPOLS:-fcfs,sjf_proxy,ltr} scheduler.predictor_process=true \
        scheduler.predictor_threads=${PT:-4} scheduler.figures=false 2>&1 | grep -v -i -E "$F" \
        | grep -E "mean|ERROR|Error|rror:|already done|capacity" | tee -a $OUT/predproc.log
    tar czf $OUT/predproc.tar.gz -C /tmp rtlm/schedule ;;
*) echo "usage: job_round26.sh godel|smollm2|predproc"; exit 2 ;;
esac
