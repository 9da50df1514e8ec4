#!/usr/bin/env bash
# One group of catalogue cases on a GPU, held to the bands of the issue that asks for them
# (allocated 1 %, reserved and device 3 %). Budget 540 s.
#
#   bash scripts/gpu_cases_validate.sh settings    # issue 11: dtype, channels_last, schedulers, cuDNN switches,
#                                                  # LoRA, xformers, PYTORCH_CUDA_ALLOC_CONF
#   bash scripts/gpu_cases_validate.sh pipelines   # issue 13: txt2img squares and one other size,
#                                                  # inpaint with both UNets on the seed images
#   DRY=1 bash scripts/gpu_cases_validate.sh ...   # rehearsal on a CPU: fake backend
#
# On the GPU machine, from the repository root, with .whl/ holding the diffusers wheel (and
# peft's, for the LoRA cases); writes $OUT. Steps, each a pytest process with an absolute
# deadline (seconds after the start; the suite starts no case it cannot finish, `timeout` kills
# what overruns), cheapest cases first within a step:
#   settings  S1 (+130) the alloc-conf cases, in a process started with
#                       PYTORCH_CUDA_ALLOC_CONF=$SPLIT_CONF (the allocator reads it once)
#             S2 (+430) every other settings case (SETTINGS_TAGS), in one process
#             S3 (+480) a memory-history snapshot of CL_SNAPSHOT (a channels_last case: its NHWC
#                       workspaces and layout copies, which only a trace shows; CASES does not
#                       apply)                                -> results/<gpu>/*memhistory*
#             S4 (+540) the xformers cases, in the one process that has the carried xformers
#                       wheel (diffusers imports xformers whenever it is installed)
#   pipelines T  (+250) the txt2img cases
#             I  (+540) the inpaint cases
# Archives go to results/<gpu>/<run>.json; then they are compared in the log.
#
# Environment: OUT (default /tmp/sd-vram-out), SD_VRAM_BUDGET_S (540), DRY=1, RESULTS_DIR,
# CASES (name globs within the group; default all), SETTINGS_TAGS, SPLIT_CONF, CL_SNAPSHOT, SKIP
# (e.g. SKIP=S1).
set -o pipefail
cd "$(dirname "$0")/.." || exit 2

GROUP=${1:-}
case "$GROUP" in
    settings|pipelines) ;;
    *) echo "usage: $0 {settings|pipelines}" >&2; exit 2 ;;
esac
DRY=${DRY:-0}
OUT=${OUT:-/tmp/sd-vram-out}
BUDGET=${SD_VRAM_BUDGET_S:-540}
GRACE=20
SETTINGS_TAGS=${SETTINGS_TAGS:-dtype,scheduler,cudnn,lora,channels-last}
SPLIT_CONF=${SPLIT_CONF:-max_split_size_mb:512}
CL_SNAPSHOT=${CL_SNAPSHOT:-channels-last.balloon-396x380}
CASES=${CASES:-*}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
# log, prepare (wheels and the sd_vram shim), run_step, collect, finish; DRY's folders and backends
source scripts/gpu_common.sh
set_backends
mkdir -p "$OUT"
START=$(date +%s)
MARK=$(mktemp)
TAIL=$GRACE
SKIP=${SKIP:-}

PYTEST=("$PY" -m pytest tests/test_plugin_suite.py -o addopts=-ra -p no:cacheprovider -q --gpu "${BACKEND[@]}"
        --results-dir "$RESULTS_DIR" -m "not sd_vram_archived" --full-call none --cases "$CASES"
        --band-allocated 0.01 --band-reserved 0.03 --band-device 0.03)

main() {
    log "sd-vram gpu_cases_validate $GROUP: DRY=$DRY OUT=$OUT budget=${BUDGET}s results=$RESULTS_DIR"
    prepare || return 2
    "$PY" -c "import sd_vram.plugin.pytest_plugin" || { log "FATAL: sd_vram does not import"; return 2; }
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv

    if [ "$GROUP" = settings ]; then
        run_step S1 130 env PYTORCH_CUDA_ALLOC_CONF="$SPLIT_CONF" "${PYTEST[@]}" --case-tags alloc-conf
        run_step S2 430 "${PYTEST[@]}" --case-tags "$SETTINGS_TAGS"
        run_step S3 480 env TORCH_SYMBOLIZE_MODE=dladdr "$PY" -m sd_vram.plugin.device_tasks snapshot \
            "${TASK_BACKEND[@]}" --cases "$CL_SNAPSHOT" --results-dir "$RESULTS_DIR"
        if opt_in_site "$SITE-xformers" 'xformers-*'; then
            run_step S4 540 env PYTHONPATH="$SITE-xformers:$PYTHONPATH" "${PYTEST[@]}" --case-tags xformers
        else
            log "step S4: the xformers cases run without xformers (each is skipped with the reason)"
            run_step S4 540 "${PYTEST[@]}" --case-tags xformers
        fi
    else
        run_step T 250 "${PYTEST[@]}" --case-tags txt2img
        run_step I 540 "${PYTEST[@]}" --case-tags inpaint
    fi

    wrap_up
    return 0
}

run_main
