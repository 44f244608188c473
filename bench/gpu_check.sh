#!/usr/bin/env bash
# One-shot check on a machine with one CUDA GPU and no internet, in under 8 minutes (step limits sum to 480 s):
#   1. build the extension        pip install -e . --no-build-isolation --no-deps
#   2. GPU tests                  pytest -m gpu (routing backends, CUDA graphs: the decode step captured fwd+bwd,
#                                 no host sync in the fused MLP, the compiled kernels against float64 in
#                                 every dtype and FP8 recipe: tests/test_gpu_numerics.py, ...)
#   3. memcheck                   compute-sanitizer --tool memcheck python -m bench.sanitize: one small fwd+bwd per
#                                 strategy, unchecked invalid expert ids included; 0 errors expected
#   4. benchmarks                 python -m bench at the issue-10 reference shapes: --preset mixtral at T=16384
#                                 and --preset fine at the decode shape T=64, then T=32768, within a time
#                                 budget (bf16 fwd+bwd; dense GEMMs and torch._grouped_mm in the same run)
#      fp8                        python -m bench --fp8 blockwise,rowwise,mxfp8 at the fine-grained shape (grouped):
#                                 the FP8 tensor-core MLP beside bf16, time and SQNR per recipe
#      profile                    python -m bench.profile at both shapes: each kernel's share of one fwd+bwd
#                                 (torch.profiler), blocksparse, grouped (and FP8), torch._grouped_mm
#   5. targets                    python -m bench.targets: % of dense and speedup vs torch._grouped_mm, pass/FAIL
#      model                      python -m bench.model.compare: the whole-layer roofline's estimate beside each
#                                 measured fwd+bwd time (blocksparse, grouped, torch_grouped_mm, the FP8 rows;
#                                 forward and backward ratios too) and the speedups over torch._grouped_mm,
#                                 measured and estimated (the dry run: the H200 model)
#      calibrate                  python -m bench.model.calibrate: the model's calibrated constants refitted to this
#                                 run beside the ones it holds (the H100's of 2026-12-06), and the measured dense
#                                 rate (not in the dry run: it has no bf16 GPU times)
#   6. report                     bench/results/<date>-<gpu>.md + bench/results/<date>-<gpu>/ (CSV, JSON, PNGs)
# and print a short summary table last. Every step has a timeout; a failed step is recorded and the rest run.
# The compile audit is a CPU job (python -m bench.audit, in CI), not repeated here.
#
# Usage: bench/gpu_check.sh [--dry-run]
#   --dry-run: no GPU needed. Skips the build and memcheck, runs pytest -m gpu (everything skips without a GPU),
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
  FP8=(--tokens 64 --hidden 64 --ffn 32)
  PROFILE_MIXTRAL=(--device cpu --tokens 64 --hidden 64 --ffn 128 --steps 1)
  PROFILE_FINE=(--device cpu --tokens 64 --hidden 64 --ffn 32 --steps 1)
else
  GPU=$(python -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null | tr -cs 'A-Za-z0-9' '-' | sed 's/-*$//')
  if [ -z "$GPU" ]; then echo "gpu_check: torch sees no CUDA GPU (use --dry-run on CPU)" >&2; exit 1; fi
  NAME="$DATE-$GPU"
  ROOT="bench/results"
  DEVICE=(--device cuda --time-budget 50)
  MIXTRAL=(--tokens 16384)  # the issue-10 reference shapes
  FINE=(--tokens 64,32768)  # decode (T=64) first: its rows take milliseconds; the targets judge the largest T
  FP8=(--tokens 32768 --time-budget 35)
  PROFILE_MIXTRAL=(--device cuda --tokens 16384)
  PROFILE_FINE=(--device cuda --tokens 32768 --fp8 blockwise,rowwise)
fi
# the GPU tests compile dozens of kernel variants (CPU-bound): one worker per 2 cores where pytest-xdist is there
XDIST=()
if [ "$DRY" = 0 ] && python -c "import xdist" 2>/dev/null; then XDIST=(-n "$(( $(nproc) / 2 ))"); fi
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
  step build 55 python -m pip install -e . --no-build-isolation --no-deps
fi
step pytest_gpu 140 python -m pytest -q -m gpu "${XDIST[@]}" tests
if [ "$DRY" = 1 ]; then
  printf 'memcheck\tskipped (dry run)\t0\n' >> "$STEPS"
else
  step memcheck 30 compute-sanitizer --tool memcheck --error-exitcode 3 python -m bench.sanitize
fi
step bench_mixtral 60 python -m bench --preset mixtral "${DEVICE[@]}" "${MIXTRAL[@]}" --out "$OUT/mixtral" --no-progress
step bench_fine 60 python -m bench --preset fine "${DEVICE[@]}" "${FINE[@]}" --out "$OUT/fine" --no-progress
step bench_fp8 45 python -m bench --preset fine "${DEVICE[@]}" "${FP8[@]}" --impls grouped --fp8 blockwise,rowwise,mxfp8 \
  --out "$OUT/fp8" --no-progress
step profile_mixtral 20 python -m bench.profile --preset mixtral "${PROFILE_MIXTRAL[@]}" \
  --impls blocksparse,grouped,torch_grouped_mm --out "$OUT/profile_mixtral"
step profile_fine 25 python -m bench.profile --preset fine "${PROFILE_FINE[@]}" \
  --impls blocksparse,grouped,torch_grouped_mm --out "$OUT/profile_fine"
step targets 10 python -m bench.targets --mixtral "$OUT/mixtral" --fine "$OUT/fine" --out "$OUT/targets.md"
step model 20 python -m bench.model.compare --gpu "${GPU:-h200}" "$OUT/mixtral" "$OUT/fine" "$OUT/fp8" \
  --out "$OUT/model.md"
if [ "$DRY" = 1 ]; then
  printf 'calibrate\tskipped (dry run)\t0\n' >> "$STEPS"
else
  step calibrate 15 python -m bench.model.calibrate --gpu "$GPU" "$OUT/mixtral" "$OUT/fine"
fi

printf 'total\t\t%s\n' "$((SECONDS - START))" >> "$STEPS"
echo >&2
python -m bench.summary --title "GPU check $NAME" --steps "$STEPS" --out "$ROOT/$NAME.md" "$OUT/mixtral" "$OUT/fine"
cat "$OUT/targets.md" >&2
[ -f "$OUT/model.md" ] && cat "$OUT/model.md" >&2
[ -f "$OUT/calibrate.log" ] && cat "$OUT/calibrate.log" >&2
