#!/usr/bin/env bash
# Device jobs of the 2026-12-03 session (one warm H200; what tools/device/stage.sh staged in /tmp/site).
#   bash tools/device/job_round21.sh profiles    5,000-turn train profiles of Gemma-3 and SmolLM2, in parallel
#                                                (PS_<lm> seconds, BS_<lm> batch size; default 300 s, 512)
#   bash tools/device/job_round21.sh regressors  rtlm-train-regressor use_prefill for the five LMs (parallel)
#   bash tools/device/job_round21.sh groups      H200 run groups: Gemma-3 (every policy), DialoGPT-ccc (proxies)
# Small results come back under $OUT; /tmp/rtlm keeps the rest for the next call while the machine is warm.
set -o pipefail
. tools/device/env.sh  # .whl install, environment, log filter F, GPU line
case "$1" in
profiles)  # the LMs in parallel on the one GPU (decoding them is launch-bound, not GPU-bound)
    mkdir -p $OUT/train
    for lm in ${LMS:-gemma3_270m smollm2_135m}; do
      ( t0=$(date +%s)
        ps_var=PS_$lm; bs_var=BS_$lm
        timeout ${!ps_var:-300} python3 -m rtlm_lab.tasks.profile experiment=lmstate_train lm=$lm platform=cuda data=prompts \
            data.path=.device_carry/train5000.jsonl data.n_prompts=null data.with_context=false \
            profile.batch_size=${!bs_var:-512} > /tmp/profile_$lm.log 2>&1
        d=$(dirname $(ls -d /tmp/rtlm/profile/$lm/cuda/*/profile.parquet /tmp/rtlm/profile/$lm/cuda/*/parts 2>/dev/null | head -1))
        python3 -m rtlm_lab.tasks.reference target=train_profile target.src=$d target.dst=$OUT/train/${lm}__cuda.parquet >> /tmp/profile_$lm.log 2>&1
        cp $d/summary.json $OUT/train/${lm}__cuda.summary.json 2>/dev/null
        python3 -c "from rtlm_lab.regressor.lmstate import read_run; read_run('$d').to_parquet('/tmp/train_$lm.parquet')"
        echo "$lm: $(( $(date +%s) - t0 )) s" >> /tmp/profile_$lm.log ) &
    done
    wait
    for lm in ${LMS:-gemma3_270m smollm2_135m}; do echo "== $lm"; grep -v -i -E "$F" /tmp/profile_$lm.log | tail -12; done | tee $OUT/train/profile.log ;;
regressors)
    mkdir -p /tmp/lmstate
    for lm in ${LMS:-gemma3_270m smollm2_135m dialogpt_ccc blenderbot_ccc godel_ccc}; do
        tp=/tmp/train_$lm.parquet; [ -f $tp ] || tp=$PWD/.device_carry/train_$lm.parquet
        ( OMP_NUM_THREADS=3 timeout ${RS:-540} python3 -m rtlm_lab.tasks.train_regressor lm=$lm platform=cuda regressor=ridge \
            regressor.use_prefill=true train_profile=$tp 'lmstate.refine_k=[8,16,32]' lmstate.batch_size=64 figures=false \
            > /tmp/lmstate/$lm.log 2>&1
          r=/tmp/rtlm/train_regressor/$lm/cuda/ridge
          cp $r/metrics.json /tmp/lmstate/${lm}__cuda__train5000.metrics.json
          cp $r/refine.csv /tmp/lmstate/${lm}__cuda__train5000.refine.csv ) &
    done
    wait
    for f in /tmp/lmstate/*.log; do echo "== $f"; grep -v -i -E "$F" $f | tail -32; done | tee $OUT/regressors.log | tail -150
    tar czf $OUT/lmstate.tar.gz -C /tmp lmstate ;;
groups)
    R=tools/device/runs.py; export MAX_SEQS=64
    timeout ${GS:-330} python3 $R /tmp/runsG gemma3_270m 1000 0.9 fcfs,oracle_srpt,lmstate,sjf_input,rtlm,sjf_proxy,ltr 0,1,2 \
        /tmp/train_gemma3_270m.parquet 2>&1 | grep -v -i -E "$F" | tee $OUT/gemma.log
    timeout ${DS:-150} python3 $R /tmp/runsD dialogpt_ccc 1000 0.9 fcfs,sjf_proxy,ltr 0,1,2 2>&1 | grep -v -i -E "$F" | tee $OUT/dialogpt.log
    tar czf $OUT/runs.tar.gz -C /tmp $(cd /tmp && ls -d runsG runsD 2>/dev/null) rtlm/schedule/capacity 2>/dev/null ;;
*) echo "usage: job_round21.sh profiles|regressors|groups"; exit 2 ;;
esac
ls -la $OUT
