#!/usr/bin/env bash
# The main job: annotate a video with the effdet GStreamer plugin.
#
# Usage: scripts/demo.sh [INPUT_VIDEO] [WEIGHTS]
#   INPUT_VIDEO  any file GStreamer's decodebin reads (default: a synthetic test video made here)
#   WEIGHTS      effdet-named safetensors (default: the bundled golden-test weights, see below)
#
# Installs missing system packages (GStreamer 1.22 and plugins, a C toolchain) and Rust if cargo
# is missing, builds the plugin in release mode, runs
#   filesrc ! decodebin ! videoconvert ! effdet ! effdetjson ! effdetoverlay ! videoconvert ! x264enc ! mp4mux
# and leaves out/annotated.mp4, out/detections.jsonl and out/snapshot.png (one annotated frame).
#
# No trained model ships yet: the default weights are the golden tests' seeded random,
# BN-calibrated weights, so the boxes are real network output but not real objects. For real
# detections convert the official tf_efficientdet_d0 checkpoint (tools/pth_to_safetensors.py) and
# pass it as WEIGHTS.
set -euo pipefail
cd "$(dirname "$0")/.."

INPUT="${1:-}"
WEIGHTS="${2:-tests/fixtures/golden/weights_f16.safetensors}"

. scripts/ensure-deps.sh

echo "== building the GStreamer plugin (release)"
cargo build --release --locked -p gst-effdet
export GST_PLUGIN_PATH="$PWD/target/release${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"
gst-inspect-1.0 effdet >/dev/null

mkdir -p out
if [ -z "$INPUT" ]; then
  INPUT=out/input.mp4
  echo "== no input given: making a 5 s synthetic test video ($INPUT)"
  gst-launch-1.0 -q -e videotestsrc num-buffers=150 pattern=ball ! \
    video/x-raw,width=640,height=480,framerate=30/1 ! videoconvert ! \
    x264enc tune=zerolatency ! mp4mux ! filesink location="$INPUT"
fi
[ -f "$INPUT" ] || { echo "input video $INPUT not found" >&2; exit 2; }
[ -f "$WEIGHTS" ] || { echo "weights $WEIGHTS not found" >&2; exit 2; }
if [ "$WEIGHTS" = "tests/fixtures/golden/weights_f16.safetensors" ]; then
  echo "== NOTE: model = the golden-test weights (seeded random, BN-calibrated): the boxes are"
  echo "         real network output but do not mark real objects. See README > Weights."
fi

echo "== annotating $INPUT"
rm -f out/annotated.mp4 out/detections.jsonl out/snapshot.png
start=$(date +%s.%N)
# The overlay's output goes both to the encoder and, once per second of video, to a PNG
# (multifilesink keeps only the newest): the snapshot is the exact annotated frame, not a re-decode.
gst-launch-1.0 -q -e filesrc location="$INPUT" ! decodebin ! videoconvert ! \
  effdet model="$WEIGHTS" score-threshold=0.3 ! \
  effdetjson location=out/detections.jsonl ! \
  effdetoverlay ! tee name=t \
  t. ! queue ! videoconvert ! x264enc speed-preset=veryfast pass=quant quantizer=20 ! \
    mp4mux ! filesink location=out/annotated.mp4 \
  t. ! queue ! videorate drop-only=true ! video/x-raw,framerate=1/1 ! videoconvert ! pngenc ! \
    multifilesink location=out/frame-%03d.png max-files=1
end=$(date +%s.%N)
last=$(ls out/frame-*.png 2>/dev/null | tail -n 1 || true)
[ -n "$last" ] && mv "$last" out/snapshot.png
rm -f out/frame-*.png

python3 - "$start" "$end" <<'PY'
import collections, json, sys
frames = [json.loads(l) for l in open("out/detections.jsonl")]
secs = float(sys.argv[2]) - float(sys.argv[1])
dets = [d for f in frames for d in f["detections"]]
by_label = collections.Counter(d["label"] for d in dets)
print(f"frames processed: {len(frames)}")
print(f"frames per second: {len(frames) / secs:.1f} (wall time {secs:.1f} s, including decode and encode)")
print(f"detections: {len(dets)} in all, {len(dets) / max(1, len(frames)):.1f} per frame")
print("most frequent labels: " + ", ".join(f"{k} {v}" for k, v in by_label.most_common(5)))
print("outputs: out/annotated.mp4, out/detections.jsonl, out/snapshot.png")
PY
