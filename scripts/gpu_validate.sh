#!/usr/bin/env bash
# One-shot validation of sd-vram on a rented GPU (H100/H200), in about 5 minutes (budget 310 s).
#
#   bash scripts/gpu_validate.sh            # on the GPU machine, from the repository root;
#                                           # needs .whl/ with the diffusers wheel, writes $OUT
#   DRY=1 bash scripts/gpu_validate.sh      # rehearsal on a CPU: fake backends
#
# Steps, most important first, each with an absolute deadline (seconds after the start; the
# suite and the probe skip what they can no longer start, `timeout` kills what overruns, and
# nothing runs past BUDGET + 10 s). Archives are rewritten after every case and copied to $OUT
# after every step, so a killed step or command keeps what it measured.
#   P  (+45)  conv-workspace probe at 7 sizes, a process of its own (it resets the peak counters
#             at every convolution)                                   -> results/<gpu>/*_conv_probe.json
#   A  (+245) pytest --gpu over the catalogue but its settings and pipelines cases (their own scripts:
#             gpu_cases_validate.sh settings|pipelines), the four seed images' short call among them,
#             then the full default call (guidance 5.0, strength 0.8, 50 steps) of the four seed
#             images, each only if the time foreseen from its short run's UNet stage fits before
#             A's deadline                                            -> results/<gpu>/<run>.json
#             (the full calls run here because they reuse the short runs already measured in
#             this process: a process of its own costs ~28 s of setup plus the short run again)
#   B  (+305) memory-history snapshots of SNAPSHOT_CASES: balloon and bench (the smallest and
#             largest seed image), then images2-1024x1024 (batch-2 decoder workspaces, unprobed)
#                                                                     -> results/<gpu>/*memhistory*
#   C  (EXPANDABLE=1 only) A's catalogue again with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
#   D  (+BUDGET) the full calls A had no time for, in a fresh process, if D_MIN_S (120) seconds are left
#   M  (BUDGET_CASES only, first, until +M_AT) each of BUDGET_CASES under memory budgets around its
#             boundary (set_per_process_memory_fraction; plugin/device_tasks.py budgets)
#                                                                     -> results/<gpu>/*_budgets.json
# Then the archives are compared in the log.
#
# Environment: OUT (default /tmp/sd-vram-out), SD_VRAM_BUDGET_S (default 310), DRY=1,
# RESULTS_DIR (default results; DRY: a temporary folder), PROBE_SIZES, FULL_CALLS (the seed cases
# whose full call A tries), A_FULL_CALL (A's --full-call; "cheapest" leaves the big ones to D),
# SNAPSHOT_CASES, EXPANDABLE=1, P_AT/A_AT/B_AT/M_AT (deadlines), D_MIN_S, BUDGET_CASES, SKIP (steps
# not to run, e.g. SKIP=P,B,D).
set -o pipefail
cd "$(dirname "$0")/.." || exit 2

DRY=${DRY:-0}
OUT=${OUT:-/tmp/sd-vram-out}
BUDGET=${SD_VRAM_BUDGET_S:-310}
GRACE=30                  # a step may overrun its deadline by this much (a case already started) ...
TAIL=5                    # ... but none runs past BUDGET + TAIL (+5 s to die): the command ends by ~325 s
P_AT=${P_AT:-45}
A_AT=${A_AT:-245}
B_AT=${B_AT:-305}
D_MIN_S=${D_MIN_S:-120}   # a fresh process needs ~28 s of setup and the short run before a full call
PROBE_SIZES=${PROBE_SIZES:-64x64,128x128,256x256,512x512,640x427,1024x1024,2048x2048}
FULL_CALLS=${FULL_CALLS:-balloon-396x380,groceries-800x534,bench-2048x2048,truck-1800x1200}
A_FULL_CALL=${A_FULL_CALL:-$FULL_CALLS}
SNAPSHOT_CASES=${SNAPSHOT_CASES:-balloon-396x380,bench-2048x2048,images2-1024x1024}
EXPANDABLE=${EXPANDABLE:-0}
BUDGET_CASES=${BUDGET_CASES:-}
M_AT=${M_AT:-150}
SKIP=${SKIP:-}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# No third-party pytest plugins (the GPU image has no pytest-benchmark, which addopts names);
# the repository's conftest.py loads the sd-vram plugin.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
# log, prepare (wheels and the sd_vram shim), run_step, collect, finish; DRY's folders and backends
source scripts/gpu_common.sh
set_backends
mkdir -p "$OUT"
START=$(date +%s)
MARK=$(mktemp)            # archives newer than this file are this run's

# missing_full_calls: the FULL_CALLS cases whose full call no archive of this run holds, comma-separated.
missing_full_calls() {
    local c out=()
    for c in ${FULL_CALLS//,/ }; do
        grep -qsF "\"id\": \"$c/full-call\"" "${NEW[@]}" /dev/null || out+=("$c")
    done
    local IFS=,
    echo "${out[*]}"
}

PYTEST=("$PY" -m pytest tests/test_plugin_suite.py -o addopts=-ra -p no:cacheprovider -q
        --gpu "${BACKEND[@]}" --results-dir "$RESULTS_DIR" -m "not sd_vram_archived and not settings and not pipelines")

main() {
    log "sd-vram gpu_validate: DRY=$DRY OUT=$OUT budget=${BUDGET}s results=$RESULTS_DIR"
    prepare || return 2
    "$PY" - <<'EOF' || { log "FATAL: sd_vram or its dependencies do not import"; return 2; }
import importlib, sys
import sd_vram, sd_vram.formula, sd_vram.plugin.pytest_plugin, sd_vram.plugin.suite, sd_vram.plugin.conv_probe
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
    print("  cuda available:", torch.cuda.is_available(), "| torch CUDA", torch.version.cuda,
          "| cuDNN", torch.backends.cudnn.version())
except Exception:
    pass
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,uuid,memory.used,memory.total,driver_version --format=csv

    if [ -n "$BUDGET_CASES" ]; then
        # no cuDNN plan cache: a plan cached after a workspace fallback would run again at a
        # larger budget ("a negative value for no caching", PyTorch's environment variables)
        TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT=-1 run_step M "$M_AT" "$PY" -m sd_vram.plugin.device_tasks budgets "${TASK_BACKEND[@]}" \
            --cases "$BUDGET_CASES" --results-dir "$RESULTS_DIR"
    fi
    run_step P "$P_AT" "$PY" -m sd_vram.plugin.conv_probe "${TASK_BACKEND[@]}" --sizes "$PROBE_SIZES" \
        --results-dir "$RESULTS_DIR"
    run_step A "$A_AT" "${PYTEST[@]}" --full-call "$A_FULL_CALL"
    TORCH_SYMBOLIZE_MODE=dladdr run_step B "$B_AT" "$PY" -m sd_vram.plugin.device_tasks snapshot "${TASK_BACKEND[@]}" \
        --cases "$SNAPSHOT_CASES" --results-dir "$RESULTS_DIR"
    if [ "$EXPANDABLE" = 1 ]; then
        PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True run_step C "$BUDGET" "${PYTEST[@]}" --full-call none
    fi
    local missing left=$(( START + BUDGET - $(date +%s) ))
    missing=$(missing_full_calls)
    if [ -z "$missing" ]; then
        log "step D: nothing to do, A ran every full call ($FULL_CALLS)"
        STEPS+=("D:none")
    elif [ "$left" -lt "$D_MIN_S" ]; then
        log "step D: skipped, ${left}s left < D_MIN_S=${D_MIN_S}s for the full calls of $missing"
        STEPS+=("D:skipped")
    else
        run_step D "$BUDGET" "${PYTEST[@]}" --cases "$missing" --full-call all -k test_full_default_call
    fi

    wrap_up
    return 0
}

run_main
