#!/usr/bin/env bash
# Runs the whole test suite, installing what a fresh Debian 12 machine lacks.
# Usage: scripts/test.sh            (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/ensure-deps.sh

# A Python venv with NVRTC (no GPU needed) so that tests/cuda_nvrtc.rs compiles every CUDA kernel
# for sm_75..sm_90, and ONNX + ONNX Runtime for tests/onnx_export.rs; EFFDET_REQUIRE_NVRTC=1 and
# EFFDET_REQUIRE_ORT=1 turn their absence into test failures instead of skips.
nvrtc_venv="${EFFDET_NVRTC_VENV:-$HOME/.cache/effdet/nvrtc-venv}"
if ! find "$nvrtc_venv" -name 'libnvrtc.so.13' 2>/dev/null | grep -q .; then
  echo "== installing NVRTC (pip nvidia-cuda-nvrtc) into $nvrtc_venv"
  python3 -m venv "$nvrtc_venv"
  "$nvrtc_venv/bin/pip" install -q 'nvidia-cuda-nvrtc==13.5.37'
fi
# ONNX's checker and ONNX Runtime (tests/onnx_export.rs runs our exported models with them).
if ! "$nvrtc_venv/bin/python" -c "import onnx, onnxruntime, numpy" 2>/dev/null; then
  echo "== installing onnx, onnxruntime and numpy (pip) into $nvrtc_venv"
  "$nvrtc_venv/bin/pip" install -q 'onnx==1.23.2' 'onnxruntime==1.32.0' 'numpy==2.4.6'
fi
export EFFDET_PYTHON="$nvrtc_venv/bin/python" EFFDET_REQUIRE_ORT=1
nvrtc_lib=$(dirname "$(find "$nvrtc_venv" -name 'libnvrtc.so.13' | head -1)")
export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export EFFDET_REQUIRE_NVRTC=1

echo "== compile check: gst-effdet's GstAnalytics output (feature analytics, GStreamer >= 1.24)"
if pkg-config --exists 'gstreamer-analytics-1.0 >= 1.24'; then
  cargo check --locked -p gst-effdet --features analytics
else
  # Debian 12 ships GStreamer 1.22 without the analytics library: type-check against the Rust
  # bindings only (nothing links, so nothing runs; run-time behaviour needs GStreamer >= 1.24).
  SYSTEM_DEPS_GSTREAMER_ANALYTICS_1_0_NO_PKG_CONFIG=1 SYSTEM_DEPS_GSTREAMER_ANALYTICS_1_0_LIB=gstanalytics-1.0 \
    cargo check --locked -p gst-effdet --features analytics
fi

echo "== cargo test (workspace; tests build with opt-level 3, see Cargo.toml)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "all tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
