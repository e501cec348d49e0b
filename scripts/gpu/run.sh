#!/usr/bin/env bash
# The GPU lane: runs on the GPU host (copied into gpu-pack/ by scripts/gpu/build.sh), inside
# ONE device call of at most 10 minutes, and returns everything worth knowing in at most 8
# files under $OUT (default gpu-pack/out):
#
#   run.log            versions, environment, each stage's outcome, the summary
#   tests.log          every GPU test, each in its own process (a failure rerun once with
#                      CUDA_LAUNCH_BLOCKING=1), and the NVRTC tests with the host's NVRTC
#   sanitizer.log      compute-sanitizer memcheck over the kernel tests, racecheck and
#                      synccheck over the post-processing test
#   tune.log           RUST_LOG=effdet=debug of the benchmark: module form and load times,
#                      registers and spills per kernel, cuBLAS found or not, the convolution
#                      path each shape chose and the times it was chosen by
#   ncu.txt            per-kernel GPU time of one batch-32 forward (ncu, --clock-control none)
#   bench/ours.jsonl   effdet bench --backend cuda, one line per batch size
#   bench/peer.jsonl   bench/pytorch_gpu.py: eager, then torch.compile while time remains
#   bench/machine.txt  commit, date, host, GPU (nvidia-smi), driver, NVRTC
#
# Nothing else is written under $OUT (scratch, the kernel cache and unpacked wheels live in
# $EFFDET_LANE_WORK, default /tmp/effdet-lane). A global deadline (EFFDET_LANE_BUDGET_S, 540 s
# from the start) and a `timeout` on every stage keep a hang from eating the call. On a
# machine without a GPU it stops within seconds, says why, and still leaves all 8 files.
# Knobs: EFFDET_BENCH_BATCHES (1,8,32,64,128), EFFDET_BENCH_ITERS (50), EFFDET_SKIP_BENCH=1,
# EFFDET_LANE_DRY=1 (run every stage even where no GPU is found: checks the script itself).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$here/out}"
work="${EFFDET_LANE_WORK:-/tmp/effdet-lane}"
mkdir -p "$out/bench" "$work"
start=$(date +%s)
deadline=$((start + ${EFFDET_LANE_BUDGET_S:-540}))
exec > >(tee "$out/run.log") 2>&1
tee_pid=$!
# Exit only once tee has written all of run.log (the device collects $OUT when we return).
finish() { exec 1>&- 2>&-; wait "$tee_pid" 2>/dev/null; exit "$1"; }

tests_log="$out/tests.log" san_log="$out/sanitizer.log" tune_log="$out/tune.log"
ncu_txt="$out/ncu.txt" ours="$out/bench/ours.jsonl" peer="$out/bench/peer.jsonl"
machine="$out/bench/machine.txt"
for f in "$tests_log" "$san_log" "$tune_log" "$ncu_txt" "$ours" "$peer" "$machine"; do : > "$f"; done

left() { echo $((deadline - $(date +%s))); }
# limit CAP: a stage's timeout, at most CAP seconds and never past the deadline (minus 5 s).
limit() { local l; l=$(( $(left) - 5 )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
declare -a summary=()
note() { summary+=("$1"); echo ">> $1"; }
status=0

echo "== effdet GPU lane, commit $(cat "$here/COMMIT" 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
echo "   budget $(left) s; output in $out; scratch in $work"

# --- CUDA libraries -----------------------------------------------------------------------
# The driver's libcuda.so.1 (/usr/local/nvidia or the system) and pip's NVIDIA wheels (nvrtc,
# cublas, cudnn, nccl) under the host Python's site-packages. (Our cudarc opens the sonames
# libcuda.so.1 and libnccl.so.2 first, so neither a toolkit's stub libcuda.so nor NCCL's
# missing libnccl.so link matters.)
real_cuda=""
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib; do
  if [ -e "$d/libcuda.so.1" ]; then real_cuda="$d/libcuda.so.1"; break; fi
done
libs=""
[ -n "$real_cuda" ] && libs="$(dirname "$real_cuda")"
site=$(python3 -c "import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))" 2>/dev/null || true)
if [ -n "$site" ]; then
  while read -r d; do libs="$libs:$d"; done < <(find "$site/nvidia" -name 'lib*.so*' -not -path '*/stubs/*' -printf '%h\n' 2>/dev/null | sort -u)
fi
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export EFFDET_REQUIRE_GPU=1 EFFDET_REQUIRE_NVRTC=1 RUST_BACKTRACE=1
export EFFDET_KERNEL_CACHE="$work/kernel-cache"
# The test binaries were built elsewhere: fixtures and models are found through the
# repository copy the device runs in (its root is the working directory).
export EFFDET_REPO="$PWD"

nvrtc_version=$(python3 - <<'EOF' 2>/dev/null || echo unknown
import ctypes
lib = ctypes.CDLL("libnvrtc.so.13")
a, b = ctypes.c_int(), ctypes.c_int()
lib.nvrtcVersion(ctypes.byref(a), ctypes.byref(b))
print(f"{a.value}.{b.value}")
EOF
)
{
  echo "commit $(cat "$here/COMMIT" 2>/dev/null || echo unknown)"
  echo "date $(date -u +%FT%TZ)"
  echo "host $(uname -srm); $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "gpu $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv,noheader 2>&1 | head -1)"
  echo "cuda_driver $(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' | head -1)"
  echo "libcuda ${real_cuda:-not found} -> $( [ -n "$real_cuda" ] && readlink -f "$real_cuda")"
  echo "nvrtc $nvrtc_version"
  echo "python $(python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -1)"
} > "$machine"
cat "$machine"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# --- No GPU: stop now, with the reason in every file -----------------------------------------
if { [ -z "$real_cuda" ] || ! nvidia-smi -L >/dev/null 2>&1; } && [ "${EFFDET_LANE_DRY:-0}" != 1 ]; then
  why="no usable NVIDIA GPU here: $( [ -z "$real_cuda" ] && echo 'no libcuda.so.1 found' || echo 'nvidia-smi fails')"
  for f in "$tests_log" "$san_log" "$tune_log" "$ncu_txt"; do echo "not run: $why" > "$f"; done
  for f in "$ours" "$peer"; do echo "{\"error\": \"not run: $why\"}" > "$f"; done
  echo "== FAILED: $why (the lane needs the GPU host; see scripts/gpu/README.md)"
  finish 2
fi
nvidia-smi -L 2>&1

# --- Tests ---------------------------------------------------------------------------------
# run_test BIN NAME: one test in its own process; on failure once more with
# CUDA_LAUNCH_BLOCKING=1, so an asynchronous fault is reported by the launch that caused it.
run_test() {
  local bin=$1 name=$2 t0 rc
  t0=$(date +%s)
  echo "==== $(basename "$bin") $name" >> "$tests_log"
  EFFDET_CUDA_POISON=1 timeout -k 5 "$(limit 120)" "$bin" --exact "$name" --nocapture --test-threads=1 >> "$tests_log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "==== $(basename "$bin") $name: exit $rc; again with CUDA_LAUNCH_BLOCKING=1" >> "$tests_log"
    EFFDET_CUDA_POISON=1 CUDA_LAUNCH_BLOCKING=1 timeout -k 5 "$(limit 120)" "$bin" --exact "$name" --nocapture --test-threads=1 >> "$tests_log" 2>&1
    local rc2=$?
    note "FAIL $(basename "$bin") $name (exit $rc; rerun blocking: exit $rc2) $(( $(date +%s) - t0 )) s"
    status=1
  else
    note "ok   $(basename "$bin") $name $(( $(date +%s) - t0 )) s"
  fi
}
# The tests of BIN, the ones matching RISKY (whole-network runs) last, in that order.
list_tests() {
  local bin=$1 risky=$2
  "$bin" --list --format=terse 2>/dev/null | sed -n 's/: test$//p' > "$work/tests.txt"
  grep -vE "$risky" "$work/tests.txt"
  for r in ${risky//|/ }; do grep -E "$r" "$work/tests.txt"; done | awk '!seen[$0]++'
}

echo "== tests ($(left) s left)"
if [ -x "$here/bin/cuda_nvrtc" ]; then
  for t in $(list_tests "$here/bin/cuda_nvrtc" '^$'); do run_test "$here/bin/cuda_nvrtc" "$t"; done
fi
risky='the_network_gives|detect_batch_of_128|fp16_network'
if [ -x "$here/bin/cuda_gpu" ]; then
  for t in $(list_tests "$here/bin/cuda_gpu" "$risky"); do run_test "$here/bin/cuda_gpu" "$t"; done
else
  note "FAIL bin/cuda_gpu missing (run scripts/gpu/build.sh)"; status=1
fi

# --- compute-sanitizer ---------------------------------------------------------------------
san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
echo "== compute-sanitizer memcheck ($(left) s left)"
if [ -n "$san" ] && [ -x "$here/bin/cuda_gpu" ]; then
  for t in gpu_preprocessing_is_bit_identical_to_the_cpu gpu_postprocessing_matches_the_cpu \
           pointwise_convolutions_match_the_cpu_on_every_path fp16_network_matches_the_cpu_on_the_golden_images; do
    [ "$(left)" -lt 150 ] && { note "skip memcheck $t (time)"; continue; }
    echo "==== memcheck $t" >> "$san_log"
    if timeout -k 5 "$(limit 90)" "$san" --tool memcheck --error-exitcode 99 --print-limit 50 \
         "$here/bin/cuda_gpu" --exact "$t" --nocapture --test-threads=1 >> "$san_log" 2>&1; then
      note "ok   memcheck $t"
    else
      note "FAIL memcheck $t (exit $?; see sanitizer.log)"; status=1
    fi
  done
  # The block-cooperative kernels (shared memory, barriers): shared-memory races and barrier
  # misuse, on the post-processing test (topk_histogram, nms_reduce).
  for tool in racecheck synccheck; do
    [ "$(left)" -lt 120 ] && { note "skip $tool (time)"; continue; }
    echo "==== $tool gpu_postprocessing_matches_the_cpu" >> "$san_log"
    if timeout -k 5 "$(limit 60)" "$san" --tool "$tool" --error-exitcode 99 --print-limit 50 \
         "$here/bin/cuda_gpu" --exact gpu_postprocessing_matches_the_cpu --nocapture --test-threads=1 >> "$san_log" 2>&1; then
      note "ok   $tool gpu_postprocessing_matches_the_cpu"
    else
      note "FAIL $tool gpu_postprocessing_matches_the_cpu (exit $?; see sanitizer.log)"; status=1
    fi
  done
else
  echo "compute-sanitizer not found" >> "$san_log"; note "skip memcheck (no compute-sanitizer)"
fi

weights="$PWD/tests/fixtures/golden/weights_f16.safetensors"
image="$PWD/tests/fixtures/golden/img0.png"
batches="${EFFDET_BENCH_BATCHES:-1,8,32,64,128}"
iters="${EFFDET_BENCH_ITERS:-50}"
if [ "${EFFDET_SKIP_BENCH:-0}" != 1 ]; then
  # --- Our benchmark, with the tuning log -------------------------------------------------
  # One process per batch size: a failure at one size does not lose the others.
  echo "== benchmark, ours ($(left) s left)"
  for b in ${batches//,/ }; do
    echo "==== batch $b" >> "$tune_log"
    if RUST_LOG=effdet=debug EFFDET_NVRTC_VERBOSE=1 timeout -k 5 "$(limit 90)" "$here/bin/effdet" bench --backend cuda \
         --weights "$weights" --image "$image" --batch "$b" --iters "$iters" --warmup 10 --json \
         >> "$ours" 2>> "$tune_log"; then
      note "ok   bench ours batch $b: $(tail -1 "$ours" | cut -c1-160)"
    else
      rc=$?; echo "{\"batch\": $b, \"error\": \"exit $rc (see tune.log)\"}" >> "$ours"
      note "FAIL bench ours batch $b (exit $rc)"; status=1
    fi
  done

  # --- ncu: per-kernel time of one batch-32 forward ----------------------------------------
  ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  echo "== ncu ($(left) s left)"
  if [ -n "$ncu" ] && [ "$(left)" -gt 60 ]; then
    EFFDET_CUDA_PROFILE=1 timeout -k 5 "$(limit 120)" "$ncu" --clock-control none \
      --profile-from-start off --metrics gpu__time_duration.sum,dram__bytes.sum --csv --print-units base \
      "$here/bin/effdet" bench --backend cuda --weights "$weights" --image "$image" \
      --batch 32 --iters 1 --warmup 0 --json > "$work/ncu.csv" 2> "$work/ncu.err"
    rc=$?
    python3 "$here/ncu_summary.py" "$work/ncu.csv" --images 32 > "$ncu_txt" 2>&1
    { echo; echo "ncu exit $rc; its stderr:"; tail -20 "$work/ncu.err"; } >> "$ncu_txt"
    if [ $rc -eq 0 ] && [ -s "$work/ncu.csv" ]; then note "ok   ncu batch 32"; else note "FAIL ncu (exit $rc)"; fi
  else
    echo "ncu not found or no time left" >> "$ncu_txt"; note "skip ncu"
  fi

  # --- The PyTorch peer: eager first, torch.compile only while time remains ----------------
  pydir="$work/py"; mkdir -p "$pydir"
  for pair in effdet:effdet omegaconf:omegaconf antlr4:antlr4_python3_runtime \
              pycocotools:pycocotools yaml:pyyaml safetensors:safetensors; do
    mod="${pair%%:*}"; whl="${pair#*:}"
    if ! python3 -c "import $mod" 2>/dev/null; then
      for w in "$here"/wheels/"$whl"-*.whl; do
        [ -f "$w" ] && python3 -m zipfile -e "$w" "$pydir"
      done
    fi
  done
  for variant in eager compile; do
    echo "== benchmark, PyTorch $variant ($(left) s left)"
    if [ "$(left)" -lt 45 ]; then note "skip PyTorch $variant (time)"; continue; fi
    PYTHONPATH="$pydir${PYTHONPATH:+:$PYTHONPATH}" timeout -k 5 "$(limit 240)" python3 \
      "$here/pytorch_gpu.py" --weights "$weights" --image "$image" --batch "$batches" \
      --iters "$iters" --variants "$variant" --deadline "$((deadline - 10))" \
      >> "$peer" 2> "$work/peer-$variant.err"
    rc=$?
    if [ $rc -eq 0 ]; then note "ok   PyTorch $variant"; else
      note "FAIL PyTorch $variant (exit $rc)"; tail -5 "$work/peer-$variant.err"
      [ "$variant" = eager ] && status=1
    fi
  done
  cat "$ours" "$peer"
fi

echo "== summary ($(( $(date +%s) - start )) s)"
printf '%s\n' "${summary[@]}"
echo "== done (status $status)"
finish $status
