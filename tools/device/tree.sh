#!/usr/bin/env bash
# Keep what a device call sends under its 64 MiB (the tool counts what the git index tracks, plus carried paths).
#   bash tools/device/tree.sh min      all of outputs/reference aside (staging calls: ~1.5 MB + one 65 MB part)
#   bash tools/device/tree.sh job      outputs/reference back but for scheduler/runs, report and the BlenderBot-ccc
#                                      weights (job calls: the GODEL-/DialoGPT-ccc weights and profiles travel)
#   bash tools/device/tree.sh sweep    outputs/reference back but for scheduler/runs and report (~41 MB: every lab
#                                      LM's weights, the profiles and regressors `rtlm-sweep`'s cuda cells read)
#   bash tools/device/tree.sh restore  everything back where it was, the index as HEAD has it
# "Aside" = moved to /tmp/aside/ with a symlink left in its place (local jobs keep reading it; a link travels as
# a link) and `git rm --cached` (the index stops tracking it). Commit nothing until `restore`.
set -euo pipefail
A=/tmp/aside
R=outputs/reference
JOB_ASIDE="$R/scheduler/runs $R/report $R/models/blenderbot_ccc"
SWEEP_ASIDE="$R/scheduler/runs $R/report"
aside() {
    for p in "$@"; do
        [ -L "$p" ] && continue
        [ -e "$A/$p" ] && { echo "tree.sh: $A/$p exists already (restore first, or clear it)"; exit 1; }
        mkdir -p "$A/$(dirname "$p")" && mv "$p" "$A/$p" && ln -s "$A/$p" "$p"
        git rm -r -q --cached "$p"
    done
}
back() {
    for p in "$@"; do
        [ -L "$p" ] || continue
        rm "$p" && mv "$A/$p" "$p" && git reset -q -- "$p"
    done
    find "$A" -depth -type d -empty -delete 2>/dev/null || true  # no empty folder left to catch the next mv
}
# While anything is aside, a pre-commit hook refuses commits: `git commit -a` there would record the whole of
# outputs/reference as deleted (it happened once; undone with `git reset --soft HEAD~1` before restore).
HOOK="$(git rev-parse --git-path hooks)/pre-commit"
guard() {
    [ -e "$HOOK" ] && ! grep -q "tree.sh guard" "$HOOK" && { echo "tree.sh: $HOOK exists: no guard installed"; return; }
    mkdir -p "$(dirname "$HOOK")"
    printf '#!/bin/sh\n# tree.sh guard\necho "outputs/reference is aside (tools/device/tree.sh): run tree.sh restore before committing" >&2\nexit 1\n' >"$HOOK"
    chmod +x "$HOOK"
}
unguard() { [ -e "$HOOK" ] && grep -q "tree.sh guard" "$HOOK" && rm "$HOOK"; return 0; }
case "${1:-}" in
min) aside $R; guard ;;
job) back $R; aside $JOB_ASIDE; guard ;;
sweep) back $R; back $JOB_ASIDE; aside $SWEEP_ASIDE; guard ;;
restore) back $JOB_ASIDE; back $R; git reset -q; unguard ;;
*) echo "usage: tree.sh min|job|sweep|restore"; exit 2 ;;
esac
git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1
