# Sourced by scripts/gpu_validate.sh, gpu_probe_validate.sh and gpu_cases_validate.sh (from the
# repository root) once they set DRY; its functions read OUT, PY, SITE, RESULTS_DIR, BUDGET, GRACE,
# TAIL, SKIP, START and MARK when called.
# What they do the same way: the log, the DRY switch, sd_vram without installing it, timed steps, copying results.

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

# set_backends: from DRY, the site folder (SITE), the archives' folder (RESULTS_DIR) and the
# arguments that pick the backend: BACKEND for pytest --gpu, TASK_BACKEND for the device tasks,
# the conv probe and sd-vram probe. DRY=1: fake backends and temporary folders.
set_backends() {
    if [ "$DRY" = 1 ]; then
        SITE=${SITE:-/tmp/sd-vram-dry-site}
        RESULTS_DIR=${RESULTS_DIR:-/tmp/sd-vram-dry-results}
        BACKEND=(--sd-backend fake)
        TASK_BACKEND=(--backend fake)
    else
        SITE=/tmp/site
        RESULTS_DIR=${RESULTS_DIR:-results}
        BACKEND=()
        TASK_BACKEND=()
    fi
}

# sd_vram without installing it: $SITE/sitecustomize.py puts a finder first on sys.meta_path
# that maps sd_vram -> sd_vram/, sd_vram.formula -> formula/, sd_vram.plugin -> plugin/,
# sd_vram.simulation -> simulation/ (pyproject.toml's package-dir). A finder, not a folder on
# sys.path: python -m and pytest put the checkout first on sys.path, where sd_vram/ lacks the
# subpackages. Any other sitecustomize further down sys.path still runs.
make_shim() {
    mkdir -p "$SITE" && rm -rf "$SITE/sd_vram" && cat > "$SITE/sitecustomize.py" <<SHIM
# Written by scripts/gpu_validate.sh: import sd_vram from the checkout $PWD without installing it.
import importlib.abc, importlib.util, os, runpy, sys

_REPO = ${PWD@Q}
_MAP = {"sd_vram": "sd_vram", "sd_vram.formula": "formula", "sd_vram.plugin": "plugin",
        "sd_vram.simulation": "simulation"}


class _SdVramShimFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        folder = _MAP.get(name)
        if folder is None or not os.path.isdir(os.path.join(_REPO, folder)):
            return None
        d = os.path.join(_REPO, folder)
        return importlib.util.spec_from_file_location(name, os.path.join(d, "__init__.py"),
                                                      submodule_search_locations=[d])


sys.meta_path.insert(0, _SdVramShimFinder())
_here = os.path.dirname(os.path.abspath(__file__))
for _p in sys.path:
    _f = os.path.join(_p or ".", "sitecustomize.py")
    if os.path.abspath(_p or ".") != _here and os.path.isfile(_f):
        runpy.run_path(_f, run_name="sitecustomize")
        break
SHIM
}


# prepare: the carried wheels (.whl/, not in a dry run) and the shim; returns 2 on failure.
# xformers stays out: diffusers imports it whenever it is installed, so only the process that
# measures it gets it (opt_in_site).
prepare() {
    if [ "$DRY" != 1 ]; then
        local wheels=() w
        for w in .whl/*.whl; do
            case "$(basename "$w")" in xformers-*) ;; *) wheels+=("$w") ;; esac
        done
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
            || { log "FATAL: could not install the wheels from .whl/"; return 2; }
    fi
    export PYTHONPATH="$SITE:$PWD"
    make_shim || { log "FATAL: could not write the sd_vram shim in $SITE"; return 2; }
}

# opt_in_site DIR PATTERN: the carried wheels matching PATTERN (e.g. 'xformers-*') installed in DIR
# (a PYTHONPATH entry for the one step that needs them); returns 1 when there is none or it fails.
opt_in_site() {
    local dir=$1 pattern=$2 wheels=()
    [ "$DRY" = 1 ] && { mkdir -p "$dir"; return 0; }
    shopt -s nullglob
    wheels=(.whl/$pattern.whl)
    shopt -u nullglob
    [ ${#wheels[@]} -gt 0 ] || { log "no .whl/$pattern.whl carried"; return 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$dir" "${wheels[@]}" \
        || { log "could not install ${wheels[*]}"; return 1; }
}

# run_step NAME SECONDS_FROM_START CMD...: runs CMD with SD_VRAM_DEADLINE set, killed GRACE s after
# it (and never later than BUDGET + TAIL), then copies what it wrote to $OUT. SKIP: names not to run.
STEPS=()
run_step() {
    local name=$1 offset=$2; shift 2
    if [[ ",$SKIP," == *",$name,"* ]]; then
        log "step $name: skipped (SKIP=$SKIP)"
        STEPS+=("$name:skipped")
        return 0
    fi
    local deadline=$(( START + (offset < BUDGET ? offset : BUDGET) ))
    local now; now=$(date +%s)
    if [ "$now" -ge "$deadline" ]; then
        log "step $name: skipped, its deadline passed"
        STEPS+=("$name:skipped")
        return 0
    fi
    local kill_at=$(( deadline + GRACE ))
    [ "$kill_at" -gt $(( START + BUDGET + TAIL )) ] && kill_at=$(( START + BUDGET + TAIL ))
    log "step $name: start (until +$(( deadline - START ))s, killed at +$(( kill_at - START ))s): $*"
    SD_VRAM_DEADLINE=$deadline timeout --kill-after=5 $(( kill_at - now )) "$@"
    local rc=$?
    log "step $name: exit $rc after $(( $(date +%s) - now ))s"
    STEPS+=("$name:$rc")
    collect
    return 0
}

# collect: copy this run's JSON files (newer than $MARK) to $OUT/results/<folder>/; lists them in NEW.
NEW=()
collect() {
    NEW=()
    local f
    while IFS= read -r f; do NEW+=("$f"); done < <(find "$RESULTS_DIR" -name '*.json' -newer "$MARK" 2>/dev/null | sort)
    for f in "${NEW[@]}"; do
        mkdir -p "$OUT/results/$(basename "$(dirname "$f")")"
        cp "$f" "$OUT/results/$(basename "$(dirname "$f")")/"
    done
}

# compare_runs FILE...: the suite archives among FILE (not probes, snapshots, budgets or profiles)
# compared in the log.
compare_runs() {
    local runs=() f
    for f in "$@"; do
        case "$f" in *_memhistory_*|*_conv_probe.json|*_budgets.json|*/profiles/*) ;; *) runs+=("$f") ;; esac
    done
    if [ ${#runs[@]} -gt 0 ]; then
        "$PY" -m sd_vram.plugin.compare "${runs[@]}" || log "compare failed"
    else
        log "no archive was written"
    fi
}

# finish: the files brought back and the time taken.
finish() {
    log "files in $OUT:"
    (cd "$OUT" && find . -type f | sort)
    log "done in $(( $(date +%s) - START ))s"
}

# wrap_up: the steps' outcomes, this run's files collected and compared, and the summary.
wrap_up() {
    log "steps: ${STEPS[*]}"
    collect
    compare_runs "${NEW[@]}"
    finish
}

# run_main: main (defined by the script), its output also in $OUT/log.txt; exits with its status.
run_main() {
    main 2>&1 | tee "$OUT/log.txt"
    local rc=$?
    rm -f "$MARK"
    exit $rc
}
