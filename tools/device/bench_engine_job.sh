#!/usr/bin/env bash
# The engine benchmark on a GPU box staged with box.sh (SmolLM2 real weights; no Hydra there):
#   MODE=smoke|full TAG=<file tag> DTYPES=float32,bfloat16 CAP_DTYPES=bfloat16 NCAP=2000 CONC=1,8,64,256 \
#   BACKENDS=kv,slots bash tools/device/bench_engine_job.sh
# writes $OUT/engine_<TAG>.json (rtlm_lab.scheduler.bench_engine; `rtlm-bench bench=engine` where Hydra is installed)
set -e
. tools/device/box.sh env
export RTLM_DATA_DIR=/tmp/rtlmdata
python3 - <<'PY'
import json, os, sys, logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
for n in ("transformers", "urllib3", "filelock", "httpx"):
    logging.getLogger(n).setLevel(logging.WARNING)
from omegaconf import OmegaConf
from rtlm_lab.scheduler.bench_engine import bench_engine
plat = OmegaConf.to_container(OmegaConf.load("conf/platform/cuda.yaml"), resolve=True)
mode = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MODE", "smoke")
out = os.environ["OUT"]
if os.environ.get("MODE") == "smoke":
    bench_engine(["smollm2_135m"], plat, [1, 8], n_check=4, out=f"{out}/engine_smoke.json", dtypes=["bfloat16"],
                 backends=("kv",), pinned_tokens=32)
else:
    cap = {"max_seqs": 256, "rho": 0.9, "n_requests": int(os.environ.get("NCAP", 3000)), "policies": ["fcfs", "oracle_srpt"],
           "dtypes": os.environ.get("CAP_DTYPES", "bfloat16").split(",")}
    conc = [int(c) for c in os.environ.get("CONC", "1,8,64,256").split(",")]
    bench_engine(["smollm2_135m"], plat, conc, n_check=16, out=f"{out}/engine_{os.environ['TAG']}.json",
                 dtypes=os.environ.get("DTYPES", "float32,bfloat16").split(","),
                 backends=tuple(os.environ.get("BACKENDS", "kv,slots").split(",")),
                 pinned_tokens=128, capacity=cap)
PY
