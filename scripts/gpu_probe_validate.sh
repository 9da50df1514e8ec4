#!/usr/bin/env bash
# Issue 9 on a GPU: probed profiles predict the suite's cases, on two stacks (budget 540 s).
#
#   bash scripts/gpu_probe_validate.sh          # on the GPU machine, from the repository root;
#                                               # needs .whl/ with the diffusers wheel, writes $OUT
#   DRY=1 bash scripts/gpu_probe_validate.sh    # rehearsal on a CPU: fake backends
#
# Steps, each with an absolute deadline (seconds after the start; `timeout` kills what overruns):
#   P1 (+100) sd-vram probe at the sizes of CASES (their exact shapes)   -> profile PROFILE
#   A1 (+260) pytest --gpu over CASES, predicting with the probed profile it picks by GPU and
#             stack (the archive's prediction_profile.source is "probe")
#   P2 (+360) with STACK_CHANGE (default CUBLAS_WORKSPACE_CONFIG=:16:8: cuBLAS 128 KiB, cuBLASLt
#             capped at it) a fresh probe at the sizes of CASES -> profile PROFILE-stack2
#   A2 (+480) pytest --gpu over CASES under the same change (it picks PROFILE-stack2)
#   B  (+540) sd-vram probe at its default sizes (the seed images and its ladder), timed: the
#             issue's benchmark (under 60 s on an H200)               -> profile PROFILE-default-sizes
# Then both archives are compared in the log. Profiles go to $RESULTS_DIR/profiles
# (SD_VRAM_PROFILES), archives to $RESULTS_DIR/<gpu>/; everything is copied to $OUT.
#
# Environment: OUT (default /tmp/sd-vram-out), SD_VRAM_BUDGET_S (540), DRY=1, RESULTS_DIR,
# CASES (catalogue names or globs: the four seed images and four other sizes), PROFILE (h200-probe),
# STACK_CHANGE (VAR=VALUE).
set -o pipefail
cd "$(dirname "$0")/.." || exit 2

DRY=${DRY:-0}
OUT=${OUT:-/tmp/sd-vram-out}
BUDGET=${SD_VRAM_BUDGET_S:-540}
GRACE=20
CASES=${CASES:-balloon-396x380,groceries-800x534,bench-2048x2048,truck-1800x1200,square-768x768,landscape-1024x576,odd-1001x777,square-1536x1536}
PROFILE=${PROFILE:-h200-probe}
STACK_CHANGE=${STACK_CHANGE:-CUBLAS_WORKSPACE_CONFIG=:16:8}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
# log, prepare (wheels and the sd_vram shim), run_step, collect, finish; DRY's folders and backends
source scripts/gpu_common.sh
set_backends
export SD_VRAM_PROFILES="$RESULTS_DIR/profiles"
mkdir -p "$OUT" "$SD_VRAM_PROFILES"
START=$(date +%s)
MARK=$(mktemp)

TAIL=$GRACE                 # a step ends GRACE s after its deadline, the last one after BUDGET
SKIP=${SKIP:-}

PYTEST=("$PY" -m pytest tests/test_plugin_suite.py -o addopts=-ra -p no:cacheprovider -q --gpu "${BACKEND[@]}"
        --results-dir "$RESULTS_DIR" -m "not sd_vram_archived" --cases "$CASES" --full-call none)
PROBE=("$PY" -m sd_vram.cli probe "${TASK_BACKEND[@]}")

main() {
    log "sd-vram gpu_probe_validate: DRY=$DRY OUT=$OUT budget=${BUDGET}s results=$RESULTS_DIR cases=$CASES"
    prepare || return 2
    local sizes
    sizes=$("$PY" - "$CASES" <<'EOF'
import sys
from sd_vram.plugin.cases import load_catalogue
cat = load_catalogue("cases/catalogue.toml")
seen = []
for c in cat.select(sys.argv[1], None):
    h, w = c.size(cat.images_dir)
    if f"{w}x{h}" not in seen:
        seen.append(f"{w}x{h}")
print(" ".join(seen))
EOF
) || { log "FATAL: sd_vram does not import or the catalogue does not read"; return 2; }
    log "case sizes: $sizes"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv

    # shellcheck disable=SC2086  # $sizes: one argument per size
    run_step P1 100 "${PROBE[@]}" $sizes --name "$PROFILE"
    run_step A1 260 "${PYTEST[@]}"
    # shellcheck disable=SC2086
    run_step P2 360 env "$STACK_CHANGE" "${PROBE[@]}" $sizes --name "$PROFILE-stack2"
    run_step A2 480 env "$STACK_CHANGE" "${PYTEST[@]}"
    run_step B 540 "${PROBE[@]}" --name "$PROFILE-default-sizes"

    log "steps: ${STEPS[*]}"
    collect
    local runs=() f
    for f in "${NEW[@]}"; do
        case "$f" in */profiles/*) ;; *) runs+=("$f") ;; esac
    done
    if [ ${#runs[@]} -gt 0 ]; then
        "$PY" - "${runs[@]}" <<'EOF' || log "summary failed"
import json, sys
for path in sys.argv[1:]:
    d = json.load(open(path))
    pp = d.get("prediction_profile", {})
    print(f"{path}: predicted with {pp.get('name')} (source {pp.get('source')}), "
          f"CUBLAS_WORKSPACE_CONFIG={d['environment']['env'].get('CUBLAS_WORKSPACE_CONFIG')}")
    for c in d["cases"]:
        m, p = c["measurement"], c["prediction"] or {}
        if m.get("status") != "ok" or not p:
            print(f"  {c['id']}: {m.get('status')} {m.get('error') or c.get('prediction_error')}")
            continue
        errs = " ".join(f"{q} {(p[f'peak_{q}_bytes'] - m[f'peak_{q}_bytes']) / m[f'peak_{q}_bytes']:+.2%}"
                        for q in ("allocated", "reserved", "device"))
        stage = "stage ok" if p["peak_stage"] == m["peak_stage"] else f"stage {p['peak_stage']} != {m['peak_stage']}"
        print(f"  {c['id']}: {errs}, {stage}, conv workspaces {p.get('conv_workspace')}")
EOF
        "$PY" -m sd_vram.plugin.compare "${runs[@]}" || log "compare failed"
    else
        log "no archive was written"
    fi
    finish
    return 0
}

run_main
