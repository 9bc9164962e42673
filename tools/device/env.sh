# Sourced by the device job scripts (job_round21.sh, job_round22.sh): install what the call carried in .whl/
# into /tmp/site (stage.sh put the rest there), set the environment the jobs run in, print the GPU.
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RTLM_OUTPUT_DIR=/tmp/rtlm RTLM_DATA_DIR=/tmp/rtlmdata COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
export RTLM_GIT_COMMIT=$COMMIT  # provenance(): the box's copy of .git can lag the tree it runs; pass COMMIT=<sha>
F="warn|Loading weights|it/s\]|s/it\]|req/s\]|Generating|Converting|^\s*$"  # log lines the jobs leave out
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
