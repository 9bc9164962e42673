#!/usr/bin/env bash
# Device jobs of the second 2026-12-03 session (one warm H200; what tools/device/stage.sh staged in /tmp/site).
#   LMS="godel_ccc blenderbot_ccc" bash tools/device/job_round21.sh regressors   (the encoder-decoders' rows)
#   bash tools/device/job_round22.sh smollm2   SmolLM2-135M on the continuous engine (MAX_SEQS, default 128: its
#                                              replies average 132 tokens, 8.6x Gemma's), every policy of the
#                                              issue, 3 seeds x 1000 requests; resumable (call it again)
#   bash tools/device/job_round22.sh static    the paper's static-batch path (rtlm-schedule scheduler.engine=static,
#                                              the cuda platform's 2 CPU offload workers for every policy): SLMS x
#                                              SPOLS x seeds 0-2, SN requests a run
# Small results come back under $OUT; /tmp keeps the rest for the next call while the machine is warm.
set -o pipefail
. tools/device/env.sh  # .whl install, environment, log filter F, GPU line
case "$1" in
smollm2)
    export MAX_SEQS=${MAX_SEQS:-128}
    timeout ${SS:-540} python3 tools/device/runs.py /tmp/runsS smollm2_135m 1000 0.9 \
        ${SPOL:-fcfs,oracle_srpt,lmstate,rtlm,sjf_proxy,ltr} 0,1,2 $PWD/.device_carry/train_smollm2_135m.parquet 2>&1 \
        | grep -v -i -E "$F" | tee -a /tmp/smollm2.log | tee $OUT/smollm2.log
    tar czf $OUT/runsS.tar.gz -C /tmp runsS rtlm/schedule/capacity ;;
static)
    for lm in ${SLMS:-gemma3_270m}; do
        timeout ${ST:-540} python3 -m rtlm_lab.tasks.schedule -m lm=$lm platform=cuda mode=real scheduler.engine=static \
            policy=${SPOLS:-fcfs,rtlm} seed=0,1,2 workload.n_requests=${SN:-300} scheduler.figures=false 2>&1 \
            | grep -v -i -E "$F" | grep -E "static engine|ERROR|Error|rror:|service model" | tee -a $OUT/static.log
    done
    tar czf $OUT/static.tar.gz -C /tmp rtlm/schedule ;;
*) echo "usage: job_round22.sh smollm2|static"; exit 2 ;;
esac
ls -la $OUT
