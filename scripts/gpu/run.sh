#!/usr/bin/env bash
# Runs on the GPU host (copied into gpu-pack/ by scripts/gpu/build.sh): finds the CUDA
# libraries, runs the GPU tests (a missing GPU fails them: EFFDET_REQUIRE_GPU=1), and writes
# logs and results under $OUT (default: gpu-pack/out).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$here/out}"
mkdir -p "$out"
exec > >(tee "$out/run.log") 2>&1

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "commit $(cat "$here/COMMIT" 2>/dev/null)"; date -u +%FT%TZ

# CUDA libraries: the driver's libcuda (/usr/local/nvidia or the system) and pip's NVIDIA
# wheels (nvrtc, cudnn, cublas) under the host Python's site-packages.
libs=""
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu; do
  [ -e "$d/libcuda.so.1" ] && libs="$libs:$d"
done
site=$(python3 -c "import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))" 2>/dev/null || true)
if [ -n "$site" ]; then
  while read -r d; do libs="$libs:$d"; done < <(find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' | sort -u)
fi
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export EFFDET_REQUIRE_GPU=1 EFFDET_REQUIRE_NVRTC=1
export EFFDET_KERNEL_CACHE="$here/kernel-cache"
# The test binaries were built elsewhere: fixtures are found through the repository copy the
# device runs in (its root is the working directory).
export EFFDET_REPO="$PWD"

status=0
for t in "$here"/bin/cuda_*; do
  [ -x "$t" ] || continue
  echo "== $(basename "$t")"
  "$t" --test-threads=1 2>&1 | tee "$out/$(basename "$t").log" || status=1
done
# The benchmark (issue 4): our CUDA engine and PyTorch effdet on the same GPU, weights and
# frame, in this one run. JSON lines into $out/bench/; bench/gpu_report.py (on the build
# machine) turns them into bench/results/gpu_vs_pytorch-<date>.{json,md}.
if [ "${EFFDET_SKIP_BENCH:-0}" != 1 ]; then
  echo "== benchmark"
  mkdir -p "$out/bench"
  weights="$PWD/tests/fixtures/golden/weights_f16.safetensors"
  image="$PWD/tests/fixtures/golden/img0.png"
  batches="${EFFDET_BENCH_BATCHES:-1,8,32,64,128}"
  iters="${EFFDET_BENCH_ITERS:-50}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/bench/gpu.csv" 2>&1 || true
  { echo "commit $(cat "$here/COMMIT" 2>/dev/null)"; date -u +%FT%TZ; nproc; uname -a; } > "$out/bench/machine.txt"
  "$here/bin/effdet" bench --backend cuda --weights "$weights" --image "$image" \
    --batch "$batches" --iters "$iters" --warmup 10 --json > "$out/bench/ours.jsonl" ||
    { echo "our benchmark failed"; status=1; }
  cat "$out/bench/ours.jsonl"
  # The peer's packages: unpack the wheels the host's Python lacks.
  pydir="$here/py"; mkdir -p "$pydir"
  for pair in effdet:effdet omegaconf:omegaconf antlr4:antlr4_python3_runtime \
              pycocotools:pycocotools yaml:pyyaml safetensors:safetensors; do
    mod="${pair%%:*}"; whl="${pair#*:}"
    if ! python3 -c "import $mod" 2>/dev/null; then
      for w in "$here"/wheels/"$whl"-*.whl; do
        [ -f "$w" ] && python3 -m zipfile -e "$w" "$pydir"
      done
    fi
  done
  PYTHONPATH="$pydir${PYTHONPATH:+:$PYTHONPATH}" python3 "$here/pytorch_gpu.py" \
    --weights "$weights" --image "$image" --batch "$batches" --iters "$iters" \
    > "$out/bench/peer.jsonl" 2> "$out/bench/peer.err" ||
    { echo "PyTorch peer failed:"; tail -5 "$out/bench/peer.err"; status=1; }
  cat "$out/bench/peer.jsonl"
fi
echo "== done (status $status)"
exit $status
