#!/usr/bin/env bash
# The main job: build the effdet CLI in release mode and detect objects in an image.
#
# Usage: scripts/demo.sh [IMAGE] [WEIGHTS]
#   IMAGE    PNG or JPEG (default: the bundled sample image)
#   WEIGHTS  effdet-named safetensors (default: the bundled golden-test weights, see below)
# Leaves out/detections.json and out/annotated.png.
#
# No trained model ships yet: the bundled weights are the seeded random, BN-calibrated
# weights of the golden tests, so the boxes are real network output but meaningless as
# objects. For real detections convert the official tf_efficientdet_d0 checkpoint with
# tools/pth_to_safetensors.py and pass it as WEIGHTS.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${1:-tests/fixtures/golden/img0.png}"
WEIGHTS="${2:-tests/fixtures/golden/weights_f16.safetensors}"

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v curl >/dev/null 2>&1 || need_apt+=(curl ca-certificates)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95
  . "$HOME/.cargo/env"
fi

echo "== building effdet (release)"
cargo build --release --locked --bin effdet
mkdir -p out
BIN=target/release/effdet

if [ "$WEIGHTS" = "tests/fixtures/golden/weights_f16.safetensors" ]; then
  echo "== NOTE: using the golden-test weights (seeded random, BN-calibrated): boxes are not meaningful objects"
fi
echo "== detecting objects in $IMAGE"
start=$(date +%s.%N)
"$BIN" detect --weights "$WEIGHTS" --image "$IMAGE" --score-threshold 0.3 --json \
  --out out/annotated.png > out/detections.json
end=$(date +%s.%N)
"$BIN" detect --weights "$WEIGHTS" --image "$IMAGE" --score-threshold 0.3
python3 - "$start" "$end" <<'PY'
import json, sys
dets = json.load(open("out/detections.json"))
print(f"{len(dets)} detections written to out/detections.json; boxes drawn in out/annotated.png")
print(f"wall time including model load: {float(sys.argv[2]) - float(sys.argv[1]):.2f} s")
PY
