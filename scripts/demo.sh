#!/usr/bin/env bash
# The main job: annotate a video with the effdet GStreamer plugin and the bundled model.
#
# Usage: scripts/demo.sh [INPUT_VIDEO] [WEIGHTS]
#   INPUT_VIDEO  any file GStreamer's decodebin reads (default: the synthetic shapes test video,
#                rendered here by `effdet synth`, with its ground truth)
#   WEIGHTS      effdet-named safetensors (default: models/effdet-d0-shapes256.safetensors, the
#                EfficientDet-D0 this repository trained on synthetic shapes; see models/README.md)
#
# Installs missing system packages (GStreamer 1.22 and plugins, a C toolchain) and Rust if cargo
# is missing, builds the plugin and the CLI in release mode, runs
#   filesrc ! decodebin ! videoconvert ! effdet ! effdetjson ! effdetoverlay ! videoconvert ! x264enc ! mp4mux
# and leaves out/annotated.mp4, out/detections.jsonl and out/snapshot.png (one annotated frame).
# On the synthetic video it also scores the detections against the ground truth (COCO AP).
set -euo pipefail
cd "$(dirname "$0")/.."

INPUT="${1:-}"
WEIGHTS="${2:-models/effdet-d0-shapes256.safetensors}"

. scripts/ensure-deps.sh

echo "== building the GStreamer plugin and the effdet CLI (release)"
cargo build --release --locked -p gst-effdet -p effdet
export GST_PLUGIN_PATH="$PWD/target/release${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"
gst-inspect-1.0 effdet >/dev/null

mkdir -p out
GROUND_TRUTH=""
if [ -z "$INPUT" ]; then
  echo "== no input given: rendering the synthetic shapes test video (effdet synth)"
  target/release/effdet synth --out out/synth --train 0 --val 0 --val-seed 1 --force >/dev/null
  INPUT=out/synth/video/test.y4m
  GROUND_TRUTH=out/synth/video/annotations.json
fi
[ -f "$INPUT" ] || { echo "input video $INPUT not found" >&2; exit 2; }
[ -f "$WEIGHTS" ] || { echo "weights $WEIGHTS not found" >&2; exit 2; }

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

python3 - "$start" "$end" "$GROUND_TRUTH" <<'PY'
import collections, json, sys
frames = [json.loads(l) for l in open("out/detections.jsonl")]
secs = float(sys.argv[2]) - float(sys.argv[1])
dets = [d for f in frames for d in f["detections"]]
by_label = collections.Counter(d["label"] for d in dets)
print(f"frames processed: {len(frames)}")
print(f"frames per second: {len(frames) / secs:.1f} (wall time {secs:.1f} s, including decode and encode)")
print(f"detections: {len(dets)} in all, {len(dets) / max(1, len(frames)):.1f} per frame")
print("most frequent labels: " + ", ".join(f"{k} {v}" for k, v in by_label.most_common(6)))
print("outputs: out/annotated.mp4, out/detections.jsonl, out/snapshot.png")
if sys.argv[3]:
    # COCO results for `effdet eval`: frame index = image id, class id = category id.
    results = [{"image_id": f["frame"], "category_id": d["class_id"],
                "bbox": [d["x1"], d["y1"], d["x2"] - d["x1"], d["y2"] - d["y1"]],
                "score": d["score"]} for f in frames for d in f["detections"]]
    json.dump(results, open("out/detections_coco.json", "w"))
PY
if [ -n "$GROUND_TRUTH" ]; then
  echo "== scoring against the video's ground truth (detections with score >= 0.3)"
  target/release/effdet eval --detections out/detections_coco.json --annotations "$GROUND_TRUTH" |
    sed -n '1,4p'
fi
