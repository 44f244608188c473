#!/usr/bin/env bash
# One-shot check on a machine with one CUDA GPU and no internet, in under 8 minutes (step limits sum to 475 s):
#   1. build the extension        pip install -e . --no-build-isolation --no-deps
#   2. GPU tests                  pytest -m gpu
#   3. compile audit              python -m bench.audit   (registers, spills, HGMMA per kernel config)
#   4. benchmarks                 python -m bench --preset mixtral / fine, token sweeps sized to fit
#   5. report                     bench/results/<date>-<gpu>.md + bench/results/<date>-<gpu>/ (CSV, JSON, PNGs)
# and print a short summary table last. Every step has a timeout; a failed step is recorded and the rest run.
#
# Usage: bench/gpu_check.sh [--dry-run]
#   --dry-run: no GPU needed. Skips the build, runs pytest -m gpu (everything skips without a GPU), the audit and
#   both presets on CPU at tiny sizes, and writes the report into $BSM_GPU_CHECK_OUT (default: a temporary folder).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY=1 ;;
  *) echo "usage: $0 [--dry-run] (got '$1')" >&2; exit 2 ;;
esac

export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
unset TRITON_INTERPRET
DATE=$(date -u +%Y-%m-%d)
START=$SECONDS

if [ "$DRY" = 1 ]; then
  NAME="$DATE-cpu-dry-run"
  ROOT="${BSM_GPU_CHECK_OUT:-$(mktemp -d)}"
  DEVICE=(--device cpu --min-run-time 0.01)
  MIXTRAL=(--tokens 32,64 --hidden 64 --ffn 128)
  FINE=(--tokens 64,128 --hidden 64 --ffn 32)
  AUDIT_JOBS=2
  AUDIT_LIMIT=300  # 2 CPU cores, not the GPU machine's 16
else
  GPU=$(python -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null | tr -cs 'A-Za-z0-9' '-' | sed 's/-*$//')
  if [ -z "$GPU" ]; then echo "gpu_check: torch sees no CUDA GPU (use --dry-run on CPU)" >&2; exit 1; fi
  NAME="$DATE-$GPU"
  ROOT="bench/results"
  DEVICE=(--device cuda --time-budget 70)
  MIXTRAL=(--tokens 2048,8192)
  FINE=(--tokens 2048,8192)
  AUDIT_JOBS=$(nproc)
  AUDIT_LIMIT=75
fi
OUT="$ROOT/$NAME"
mkdir -p "$OUT"
STEPS="$OUT/steps.tsv"
: > "$STEPS"

# step NAME TIMEOUT_S CMD...: run with a timeout, log to $OUT/NAME.log, record status and seconds
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS status rc
  echo "== $name: $*" >&2
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timeout (${limit} s)" ;;
    *) status="failed (exit $rc, see $name.log)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >> "$STEPS"
  tail -n 3 "$OUT/$name.log" >&2
}

if [ "$DRY" = 1 ]; then
  printf 'build\tskipped (dry run)\t0\n' >> "$STEPS"
else
  step build 110 python -m pip install -e . --no-build-isolation --no-deps
fi
step pytest_gpu 110 python -m pytest -q -m gpu tests
step audit "$AUDIT_LIMIT" python -m bench.audit --jobs "$AUDIT_JOBS" --out "${TMPDIR:-/tmp}/bsm-audit-$NAME"  # ~50 MB of cubins/SASS: not kept in results
step bench_mixtral 90 python -m bench --preset mixtral "${DEVICE[@]}" "${MIXTRAL[@]}" --out "$OUT/mixtral" --no-progress
step bench_fine 90 python -m bench --preset fine "${DEVICE[@]}" "${FINE[@]}" --out "$OUT/fine" --no-progress

# the audit's table is its stdout, minus the progress line on stderr that the log also holds
grep -E '^\||^[0-9]+ builds' "$OUT/audit.log" > "$OUT/audit.md" || true
printf 'total\t\t%s\n' "$((SECONDS - START))" >> "$STEPS"
echo >&2
python -m bench.summary --title "GPU check $NAME" --steps "$STEPS" --audit "$OUT/audit.md" \
  --out "$ROOT/$NAME.md" "$OUT/mixtral" "$OUT/fine"
