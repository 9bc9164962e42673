#!/usr/bin/env bash
# Device job of 2026-12-06: rtlm-bench bench=replicas on one GPU without Hydra (the box lacks it): DialoGPT-ccc,
# one engine vs two replicas on the same GPU stepped by a thread each vs stepped in turn (each mode in a fresh
# process). Carried: .whl/ with transformers 5.23.0, tokenizers 0.23.3, omegaconf 2.3.1 and antlr4 4.9.3 (the
# box's huggingface_hub 1.33 satisfies transformers 5.23); the tracked tree kept small by symlinking
# outputs/reference/{scheduler/runs,report,models/blenderbot_ccc,models/godel_ccc} aside for the call.
#   bash tools/device/job_replicas.sh [N] [MAX_SEQS] [NAME]   -> $OUT/NAME (default replicas_cuda.json)
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RTLM_OUTPUT_DIR=/tmp/rtlm RTLM_DATA_DIR=/tmp/rtlmdata RTLM_GIT_COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
python3 - "$OUT/${3:-replicas_cuda.json}" "${1:-2048}" "${2:-64}" <<'PY'
import sys
from omegaconf import OmegaConf
from rtlm_lab.scheduler.bench_replicas import bench
platform = OmegaConf.to_container(OmegaConf.load("conf/platform/cuda.yaml"), resolve=True)
n, seqs = int(sys.argv[2]), int(sys.argv[3])
bench("dialogpt_ccc", platform, ["cuda:0", "cuda:0"], n=n, max_seqs=seqs, out=sys.argv[1],
      config={"name": "replicas", "lm": "dialogpt_ccc", "devices": ["cuda:0", "cuda:0"], "n": n, "max_seqs": seqs,
              "platform": "cuda", "via": "tools/device/job_replicas.sh"})
PY
