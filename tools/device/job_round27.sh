#!/usr/bin/env bash
# Device job of 2026-12-06 (after tools/device/stage.sh staged /tmp/site): where the MiniLM predictors run, on a
# GPU box. DialoGPT-ccc on the continuous engine (64 rows, no CPU workers), 1,000 requests at rho 0.9 of the
# capacity this machine measures in its first run (cached: every later run gets the same arrival rate), per seed:
#   thread:  fcfs, sjf_proxy, ltr with the predictors in the serving process (the default)
#   process: sjf_proxy, ltr with them in a process of their own (scheduler.predictor_process=true, PT threads)
# each rtlm-schedule call a fresh process, the two placements interleaved seed by seed (drift hits both alike).
#   bash tools/device/job_round27.sh SEEDS      e.g. "0" then "1 2" (resumable: finished runs are skipped)
set -o pipefail
. tools/device/env.sh  # .whl install, environment, log filter F, GPU line
run() {
    timeout ${PS:-560} python3 -m rtlm_lab.tasks.schedule -m mode=real lm=dialogpt_ccc platform=cuda \
        platform.engine.max_seqs=64 platform.offload_workers=0 workload.n_requests=1000 workload.rho=0.9 \
        scheduler.figures=false "$@" 2>&1 | grep -v -i -E "$F" \
        | grep -E "mean|ERROR|Error|rror:|already done|capacity" | tee -a $OUT/predpair.log
    echo "load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a $OUT/predpair.log
}
for s in ${1:-0 1 2}; do
    run seed=$s policy=fcfs,sjf_proxy,ltr
    run seed=$s policy=sjf_proxy,ltr scheduler.predictor_process=true scheduler.predictor_threads=${PT:-4}
done
tar czf $OUT/predpair.tar.gz -C /tmp rtlm/schedule
ls -la $OUT
