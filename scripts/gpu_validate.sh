#!/usr/bin/env bash
# One-shot validation of sd-vram on a rented GPU (H100/H200), in about 6 minutes.
#
#   bash scripts/gpu_validate.sh            # on the GPU machine, from the repository root;
#                                           # needs .whl/ with the diffusers wheel, writes $OUT
#   DRY=1 bash scripts/gpu_validate.sh      # rehearsal on a CPU: fake measurement backend
#
# Steps, cheapest and most important first, each with an absolute deadline (the suite skips
# cases it can no longer start, `timeout` kills what overruns; archives are rewritten after
# every case, so a killed step keeps what it measured):
#   A  pytest --gpu over the whole catalogue (+ balloon's full 50-step call)   -> results/<gpu>/
#   B  memory-history snapshots of balloon and truck, reduced on the device     -> results/<gpu>/*memhistory*
#   C  A again in a fresh process with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
#   D  full default calls (strength 0.8, 50 steps) of the other three seed cases
# Then every new archive is copied to $OUT/results/<gpu>/ and compared in the log.
#
# Environment: OUT (default /tmp/sd-vram-out), SD_VRAM_BUDGET_S (seconds for all steps,
# default 330), DRY=1, RESULTS_DIR (default results; DRY: a temporary folder).
set -o pipefail
cd "$(dirname "$0")/.." || exit 2

DRY=${DRY:-0}
OUT=${OUT:-/tmp/sd-vram-out}
BUDGET=${SD_VRAM_BUDGET_S:-330}
GRACE=30
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# No third-party pytest plugins (the GPU image has no pytest-benchmark, which addopts names);
# the repository's conftest.py loads the sd-vram plugin.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
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
mkdir -p "$OUT"
START=$(date +%s)
MARK=$(mktemp)            # archives newer than this file are this run's

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

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

# run_step NAME SECONDS_FROM_START CMD...: runs CMD with SD_VRAM_DEADLINE set, killed GRACE s after it.
run_step() {
    local name=$1 offset=$2; shift 2
    local deadline=$(( START + (offset < BUDGET ? offset : BUDGET) ))
    local now; now=$(date +%s)
    if [ "$now" -ge "$deadline" ]; then
        log "step $name: skipped, its deadline passed"
        STEPS+=("$name:skipped")
        return 0
    fi
    log "step $name: start (until +$(( deadline - START ))s): $*"
    SD_VRAM_DEADLINE=$deadline timeout --kill-after=10 $(( deadline - now + GRACE )) "$@"
    local rc=$?
    log "step $name: exit $rc after $(( $(date +%s) - now ))s"
    STEPS+=("$name:$rc")
    return 0
}

PYTEST=("$PY" -m pytest tests/test_plugin_suite.py -o addopts=-ra -p no:cacheprovider -q
        --gpu "${BACKEND[@]}" --results-dir "$RESULTS_DIR" -m "not sd_vram_archived")

main() {
    log "sd-vram gpu_validate: DRY=$DRY OUT=$OUT budget=${BUDGET}s results=$RESULTS_DIR"
    if [ "$DRY" != 1 ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            || { log "FATAL: could not install the wheels from .whl/"; return 2; }
    fi
    export PYTHONPATH="$SITE:$PWD"
    make_shim || { log "FATAL: could not write the sd_vram shim in $SITE"; return 2; }
    "$PY" - <<'EOF' || { log "FATAL: sd_vram or its dependencies do not import"; return 2; }
import importlib, sys
import sd_vram, sd_vram.formula, sd_vram.plugin.pytest_plugin, sd_vram.plugin.suite
print("sd_vram from", sd_vram.__file__, "| formula from", sd_vram.formula.__file__, "| finder",
      type(sys.meta_path[0]).__name__, "| python", sys.version.split()[0])
for m in ("torch", "diffusers", "transformers", "pynvml", "matplotlib"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m} {getattr(mod, '__version__', '')}")
    except Exception as e:
        print(f"  {m}: NOT IMPORTABLE ({type(e).__name__}: {e})")
try:
    import torch
    print("  cuda available:", torch.cuda.is_available(), "| torch CUDA", torch.version.cuda)
except Exception:
    pass
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,uuid,memory.used,memory.total,driver_version --format=csv

    STEPS=()
    run_step A 150 "${PYTEST[@]}"
    TORCH_SYMBOLIZE_MODE=dladdr run_step B 195 "$PY" -m sd_vram.plugin.device_tasks snapshot "${TASK_BACKEND[@]}" \
        --cases balloon-640x427,truck-4032x3024 --results-dir "$RESULTS_DIR"
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True run_step C 265 "${PYTEST[@]}" --full-call none
    run_step D "$BUDGET" "${PYTEST[@]}" --cases 'groceries-*,bench-*,truck-*' --full-call all -k test_full_default_call

    log "steps: ${STEPS[*]}"
    local new=()
    while IFS= read -r f; do new+=("$f"); done < <(find "$RESULTS_DIR" -name '*.json' -newer "$MARK" 2>/dev/null | sort)
    local f
    for f in "${new[@]}"; do
        mkdir -p "$OUT/results/$(basename "$(dirname "$f")")"
        cp "$f" "$OUT/results/$(basename "$(dirname "$f")")/"
    done
    if [ ${#new[@]} -gt 0 ]; then
        "$PY" -m sd_vram.plugin.compare "${new[@]}" || log "compare failed"
    else
        log "no archive was written"
    fi
    log "files in $OUT:"
    (cd "$OUT" && find . -type f | sort)
    log "done in $(( $(date +%s) - START ))s"
    return 0
}

main 2>&1 | tee "$OUT/log.txt"
rc=$?
rm -f "$MARK"
exit $rc
