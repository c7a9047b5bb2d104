#!/usr/bin/env bash
# The one script to run on a GPU machine: GPU tests, kernel benchmark, environment.
#
# Usage: tools/gpu_check.sh [OUT_DIR]
#   OUT_DIR: the argument, else $VOPT_RESULTS_DIR, else ./gpu-results/
#
# Steps (each with a timeout, each logged to OUT_DIR/<step>.log; a failed step
# does not stop the later ones):
#   nvidia-smi   the GPU and driver
#   cuda-lib     use $VOPT_CUDA_LIB or a prebuilt vopt/_lib/libvopt_cuda.so,
#                else build it with tools/build_cuda.sh
#   python       pick the interpreter ($VOPT_PYTHON, else .venv if its torch
#                sees a GPU, else the system python3) and make vopt importable (editable install,
#                --no-deps, only if `import vopt.ops.axpy` fails; torch is never
#                installed here)
#   cuda-attn    python -m pytest -m gpu tests/test_sage_cuda.py tests/test_block_sparse_cuda.py
#                tests/test_vidkv_decode_cuda.py (the hand-written attention kernels: SageAttention2 quantizers
#                bit-exact, attention vs the reference, selection, graph replay; block-sparse and packed VidKV/KIVI
#                decode vs their references; first, as the newest code)
#   sanitize     compute-sanitizer memcheck + racecheck on tools/cuda_kernels_smoke.py (small shapes, every kernel
#                and preset); optional: skipped when compute-sanitizer is not installed
#   pytest-gpu   python -m pytest -m gpu -q tests (the rest)
#   bench        tools/bench_kernels.py --out OUT_DIR/bench_kernels.json
#   bench-attn   tools/bench_attention.py --out OUT_DIR/bench_attention.json (SDPA vs vopt
#                CUDA and Triton SageAttention vs sageattention 1.0.6; N up to 16K here, hd128 first; at most 120 s,
#                stops starting cases ~30 s before its limit and keeps ~315 s for the steps after it)
#   bench-kv     tools/bench_kvcache.py --out OUT_DIR/bench_kvcache.json (KV-cache bytes per setting; decode
#                latency per token vs context 1K..32K: fp16 SDPA vs packed KIVI-2 / VidKV torch reference,
#                dequantize+SDPA and the Triton kernel; ~60 s, stops starting contexts after ~35 s)
#   bench-ccam   tools/bench_ccam.py --out OUT_DIR/bench_ccam.json (Video-CCAM projector cross-attention,
#                Q 1024, T 16/32 x 729 tokens: dense masked SDPA vs FlexAttention vs vopt Triton block-sparse;
#                ~45 s, compiled Flex and T 8 left out, stops starting frame counts after ~25 s)
#   bench-e2e    tools/bench_e2e.py --gpu --out OUT_DIR/bench_e2e (end to end, bf16, random-weight medium shapes:
#                LLaVA-OV with a Qwen2-0.5B-like LLM, Llama 0.5B-like; eager vs every pass alone and all together:
#                TTFT, decode tok/s, peak memory, KV bytes, visual tokens, FLOPs, output fidelity; ~75 s here with
#                torch.compile left out and no new model started after 40 s; the whole --gpu profile alone, compile
#                included, is ~4 min)
#   bench-moe    tools/bench_moe.py --out OUT_DIR/bench_moe.json (sorted-by-expert dispatch + grouped GEMM vs the
#                model's own dense loop: MoE-VRD shapes and a generic 8-64-expert top-2 block; ~40 s)
#   bench-vq     tools/bench_vq.py --out OUT_DIR/bench_vq.json (fused nearest-code argmin vs the unfused distance
#                expression, tokens x codebook x dim of E-ViLM-like sizes; ~40 s)
#   vopt-env     python -m vopt.cli env (versions, GPU, backend availability)
# The whole run stays under 8 minutes; a summary table (step, status, seconds)
# comes last. Exits non-zero if any non-optional step failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-${VOPT_RESULTS_DIR:-./gpu-results}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT" || exit 1

START=$(date +%s)
DEADLINE=$((START + 465))   # 8 min total, minus a margin for the summary
unset TRITON_INTERPRET       # real GPU kernels, not the interpreter
export ROOT OUT

SUMMARY=()
FAILED=0

# run_step NAME LIMIT_S OPTIONAL(0|1) COMMAND-STRING
run_step() {
  local name=$1 limit=$2 optional=$3 cmd=$4
  local now left rc status t0 t1
  now=$(date +%s)
  left=$((DEADLINE - now))
  if ((left < limit)); then limit=$left; fi
  if ((limit <= 5)); then
    SUMMARY+=("$(printf '%-12s %-22s %6s' "$name" "SKIPPED (out of time)" 0)")
    ((optional)) || FAILED=1
    return
  fi
  echo "===== [$name] (limit ${limit}s) $cmd"
  t0=$(date +%s)
  timeout -k 10 "$limit" bash -c "$cmd" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  t1=$(date +%s)
  if ((rc == 0)); then
    status="ok"
  elif ((rc == 124 || rc == 137)); then
    status="TIMEOUT"
  else
    status="FAILED rc=$rc"
  fi
  if ((rc != 0)); then
    if ((optional)); then status="$status (optional)"; else FAILED=1; fi
  fi
  SUMMARY+=("$(printf '%-12s %-22s %6s' "$name" "$status" $((t1 - t0)))")
}

# ---- 1. GPU ----
run_step nvidia-smi 30 0 'nvidia-smi'

# ---- 2. the CUDA library ----
if [[ -n "${VOPT_CUDA_LIB:-}" && -f "${VOPT_CUDA_LIB}" ]]; then
  export VOPT_CUDA_LIB
  run_step cuda-lib 10 0 'echo "using VOPT_CUDA_LIB=$VOPT_CUDA_LIB"'
elif [[ -f "$ROOT/vopt/_lib/libvopt_cuda.so" ]]; then
  unset VOPT_CUDA_LIB
  run_step cuda-lib 10 0 'echo "using prebuilt $ROOT/vopt/_lib/libvopt_cuda.so"'
else
  unset VOPT_CUDA_LIB
  run_step cuda-lib 200 0 'bash tools/build_cuda.sh && test -f vopt/_lib/libvopt_cuda.so'
fi

# ---- 3. Python with vopt importable ----
PY="${VOPT_PYTHON:-}"
if [[ -n "$PY" ]]; then
  :
elif [[ -x "$ROOT/.venv/bin/python" ]] && "$ROOT/.venv/bin/python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3 || command -v python || echo python3)"
fi
export PY
run_step python 120 0 '
echo "python: $PY"
"$PY" -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available())"
if ! "$PY" -c "import vopt.ops.axpy, vopt.kernels.axpy" 2>/dev/null; then
  echo "vopt not importable: pip install -e . --no-deps --no-build-isolation"
  VOPT_SKIP_CUDA_BUILD=1 "$PY" -m pip install -e . --no-deps --no-build-isolation || exit 1
fi
"$PY" -c "import vopt.ops.axpy, vopt.kernels.axpy; from vopt import cuda_library as c; print(\"vopt imported; CUDA backend:\", c.unavailable_reason() or \"available\")"
'

# ---- 4. GPU tests: the SageAttention2 CUDA kernels first, compute-sanitizer on them, then the rest ----
run_step cuda-attn 120 0 '"$PY" -m pytest -m gpu -q tests/test_sage_cuda.py tests/test_block_sparse_cuda.py tests/test_vidkv_decode_cuda.py --junitxml="$OUT/pytest-cuda-attn.xml"'
SANITIZER="$(command -v compute-sanitizer || true)"
[[ -z "$SANITIZER" && -x /usr/local/cuda/bin/compute-sanitizer ]] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer
export SANITIZER
if [[ -n "$SANITIZER" ]]; then
  run_step sanitize 90 1 '"$SANITIZER" --tool memcheck --error-exitcode 9 "$PY" tools/cuda_kernels_smoke.py && "$SANITIZER" --tool racecheck --error-exitcode 9 "$PY" tools/cuda_kernels_smoke.py'
else
  SUMMARY+=("$(printf '%-12s %-22s %6s' sanitize "SKIPPED (not installed)" 0)")
fi
run_step pytest-gpu 240 0 '"$PY" -m pytest -m gpu -q tests --ignore=tests/test_sage_cuda.py --ignore=tests/test_block_sparse_cuda.py --ignore=tests/test_vidkv_decode_cuda.py --junitxml="$OUT/pytest-gpu.xml"'

# ---- 5. kernel benchmark ----
run_step bench 90 0 '"$PY" tools/bench_kernels.py --out "$OUT/bench_kernels.json" --force'

# ---- 6. attention benchmark (trimmed sizes; the full 1K..32K sweep is tools/bench_attention.py alone) ----
ATTN_LIMIT=$((DEADLINE - $(date +%s) - 315))  # leave time for bench-kv (60 s), bench-ccam (45 s), bench-e2e (90 s), bench-moe/-vq (2 x 40 s), vopt-env (40 s)
if ((ATTN_LIMIT > 120)); then ATTN_LIMIT=120; fi
export ATTN_MAX_S=$((ATTN_LIMIT > 60 ? ATTN_LIMIT - 30 : ATTN_LIMIT / 2))
run_step bench-attn "$ATTN_LIMIT" 0 '"$PY" tools/bench_attention.py --head-dims 128,64 --seqs 1k,2k,4k,8k,16k --max-seconds "$ATTN_MAX_S" --out "$OUT/bench_attention.json" --force'

# ---- 7. KV-cache benchmark (memory table + decode latency slope; contexts 1K..32K) ----
run_step bench-kv 60 0 '"$PY" tools/bench_kvcache.py --contexts 1k,2k,4k,8k,16k,32k --reps 20 --max-seconds 35 --out "$OUT/bench_kvcache.json" --force'

# ---- 8. CCAM block-sparse cross-attention benchmark (trimmed; the full T 8/16/32 sweep is tools/bench_ccam.py alone) ----
run_step bench-ccam 45 0 '"$PY" tools/bench_ccam.py --frames 16,32 --no-compile --reps 20 --target-ms 150 --max-seconds 25 --out "$OUT/bench_ccam.json" --force'

# ---- 9. end-to-end benchmark (trimmed --gpu profile: no torch.compile, no new model after 40 s) ----
run_step bench-e2e 90 0 '"$PY" tools/bench_e2e.py --gpu --compile-models none --max-seconds 40 --no-progress --out "$OUT/bench_e2e" --force'

# ---- 10. MoE dispatch and VQ lookup benchmarks (trimmed; each stops starting cases after ~25 s) ----
run_step bench-moe 40 0 '"$PY" tools/bench_moe.py --max-seconds 25 --out "$OUT/bench_moe.json" --force'
run_step bench-vq 40 0 '"$PY" tools/bench_vq.py --sizes 1568x8192x256,8192x16384x256,1568x16384x1024 --reps 10 --max-seconds 25 --out "$OUT/bench_vq.json" --force'

# ---- 11. vopt environment report ----
run_step vopt-env 60 0 '"$PY" -m vopt.cli env'

# ---- summary ----
{
  echo
  echo "===== gpu_check summary ($(( $(date +%s) - START ))s total; logs in $OUT)"
  printf '%-12s %-22s %6s\n' step status seconds
  printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT/summary.txt"
exit $FAILED
