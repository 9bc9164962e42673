set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RTLM_OUTPUT_DIR=/tmp/rtlm
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv
mkdir -p $OUT/train
F="warn|Loading weights|it/s\]|s/it\]"
for lm in dialogpt_ccc blenderbot_ccc godel_ccc; do
  timeout 110 python3 -m rtlm_lab.tasks.profile experiment=lmstate_train lm=$lm platform=cuda data=prompts data.path=.device_carry/train5000.jsonl data.n_prompts=null data.with_context=false 2>&1 | grep -v -i -E "$F" | tail -6 | tee -a $OUT/train/profile.log
  d=$(dirname $(ls /tmp/rtlm/profile/$lm/cuda/*/profile.parquet | head -1))
  python3 -m rtlm_lab.tasks.reference target=train_profile target.src=$d target.dst=$OUT/train/${lm}__cuda.parquet 2>&1 | tail -2 | tee -a $OUT/train/profile.log
  cp $d/summary.json $OUT/train/${lm}__cuda.summary.json 2>/dev/null; cp $d/profile.parquet /tmp/train_${lm}.parquet
done
MAX_SEQS=64 timeout ${RUNS_S:-330} python3 tools/device/runs.py /tmp/runsA dialogpt_ccc 1000 0.9 fcfs,sjf_input,oracle_srpt,lmstate,lmstate_no_refine 0,1,2 /tmp/train_dialogpt_ccc.parquet 2>&1 | grep -v -i -E "$F" | tee $OUT/runsA.log
tar czf $OUT/runsA.tar.gz -C /tmp runsA
