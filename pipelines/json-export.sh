#!/usr/bin/env bash
# Detect objects in a video file and write every frame's detections as JSON Lines.
#
# Usage: pipelines/json-export.sh IN OUT.jsonl
#   IN         a video file GStreamer can decode (MP4, MKV, WebM, ...) or a URI
#   OUT.jsonl  one line per frame (overwritten):
#              {"frame":N,"pts":NS,"width":W,"height":H,"detections":[{"x1":..,"y1":..,
#               "x2":..,"y2":..,"score":..,"class_id":..,"label":".."}]}
#              detections use the same fields as `effdet detect --json`; pts is in nanoseconds.
#
# Environment:
#   MODEL             effdet-named safetensors weights. Default:
#                     models/effdet-d0-shapes256.safetensors, the model trained here on the
#                     synthetic shapes (6 classes). Bring COCO or your own weights for other
#                     objects.
#   EFFDET_OPTS       extra effdet properties, e.g. "score-threshold=0.5 max-detections=20"
#   EFFDET_PLUGIN_DIR directory holding libgsteffdet.so (default: target/release, built if missing)
#
# Pipeline:
#   filesrc ! decodebin ! queue ! videoconvert ! effdet ! effdetjson location=OUT ! fakesink
#
# Example:
#   pipelines/json-export.sh street.mp4 street.jsonl
#   jq -c '[.frame, (.detections | length)]' street.jsonl
set -euo pipefail
. "$(dirname "$0")/common.sh"

[ $# -eq 2 ] || usage "expected 2 arguments, got $#"
IN="$1"
OUT="$2"
source_for SRC "$IN"
setup

run_gst "${SRC[@]}" ! queue ! videoconvert \
  ! effdet "model=$MODEL" "${EFFDET_OPTS[@]}" \
  ! effdetjson "location=$OUT" ! fakesink sync=false
info "wrote $OUT"
