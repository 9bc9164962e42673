#!/usr/bin/env bash
# Device jobs of the third 2026-12-03 session (one warm H200; what tools/device/stage.sh staged in /tmp/site).
#   bash tools/device/job_round23.sh probe    fit the LM-state policy's probe for PLM (default gemma3_270m) the way
#                                             the harness does (load_state_probe, conf/policy/lmstate.yaml's
#                                             parameters, train profile .device_carry/train_<lm>.parquet) and
#                                             return its joblib: put it in outputs/schedule/probes/ and the CPU
#                                             harness (policy.train_profile=<the same file>) finds it by key
#   bash tools/device/job_round23.sh static   the paper's static-batch path, as job_round22.sh static but with the
#                                             seeds outermost (a cut-off call leaves whole seeds, not whole
#                                             policies, missing) and resumable while the machine is warm
#   bash tools/device/job_round23.sh smollm2  SmolLM2 continuous runs: SPOL policies, SSEEDS seeds (runs.py)
#   bash tools/device/job_round23.sh predbench  rtlm-bench bench=predictor platform=cuda: predictions in the serving
#                                             process vs their own, beside a real GPU decode thread (~1-2 min)
# SX: extra rtlm-schedule overrides for `static`, e.g. SX="scheduler.predictor_process=true"
set -o pipefail
. tools/device/env.sh  # .whl install, environment, log filter F, GPU line
case "$1" in
probe)
    lm=${PLM:-gemma3_270m}
    timeout ${PT:-400} python3 - <<PY 2>&1 | grep -v -i -E "$F" | tee $OUT/probe.log
import logging, time
from pathlib import Path
from omegaconf import OmegaConf
from rtlm_lab.lm.loader import lm_config, load_lm
from rtlm_lab.paths import ROOT
from rtlm_lab.scheduler.lmprobe import load_state_probe
logging.basicConfig(level=logging.INFO)
params = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/policy/lmstate.yaml"))
params.pop("max_batch")
params["train_profile"] = str(ROOT / ".device_carry/train_$lm.parquet")
platform = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/platform/cuda.yaml"))
t0 = time.time()
probe = load_state_probe(load_lm(lm_config("$lm"), platform), "cuda", params)
print("probe", probe.meta, f"{time.time() - t0:.0f} s")
PY
    cp /tmp/rtlm/schedule/probes/*.joblib $OUT/ ;;
static)
    for lm in ${SLMS:-blenderbot_ccc godel_ccc}; do
        timeout ${ST:-540} python3 -m rtlm_lab.tasks.schedule -m lm=$lm platform=cuda mode=real scheduler.engine=static \
            seed=${SSEEDS:-0,1,2} policy=${SPOLS:-fcfs,oracle_sjf,rtlm,sjf_proxy,ltr} workload.n_requests=${SN:-300} \
            scheduler.figures=false ${SX:-} 2>&1 | grep -v -i -E "$F" | grep -E "static engine|ERROR|Error|rror:|already done" \
            | tee -a $OUT/static.log
    done
    tar czf $OUT/static.tar.gz -C /tmp rtlm/schedule ;;
smollm2)
    export MAX_SEQS=${MAX_SEQS:-128}
    timeout ${SS:-540} python3 tools/device/runs.py /tmp/runsS smollm2_135m 1000 0.9 ${SPOL:-ltr} ${SSEEDS:-2} \
        $PWD/.device_carry/train_smollm2_135m.parquet 2>&1 | grep -v -i -E "$F" | tee $OUT/smollm2.log
    tar czf $OUT/runsS.tar.gz -C /tmp runsS ;;
predbench)
    timeout ${PB:-300} python3 -m rtlm_lab.tasks.bench bench=predictor platform=cuda bench.out=$OUT/predictor_cuda.json \
        2>&1 | grep -v -i -E "$F" | tee $OUT/predbench.log ;;
*) echo "usage: job_round23.sh probe|static|smollm2|predbench"; exit 2 ;;
esac
ls -la $OUT
