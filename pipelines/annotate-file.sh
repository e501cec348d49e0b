#!/usr/bin/env bash
# Detect objects in a video file and write a copy with the boxes drawn (H.264 in MP4).
#
# Usage: pipelines/annotate-file.sh IN OUT.mp4
#   IN       a video file GStreamer can decode (MP4, MKV, WebM, ...) or a URI (file://, http://...)
#   OUT.mp4  the annotated video to write (overwritten)
#
# Environment:
#   MODEL             effdet-named safetensors weights. Default:
#                     models/effdet-d0-shapes256.safetensors, the model trained here on the
#                     synthetic shapes (6 classes). Bring COCO or your own weights for other
#                     objects.
#   EFFDET_OPTS       extra effdet properties, e.g. "score-threshold=0.5 interval=2 threads=4"
#   EFFDET_PLUGIN_DIR directory holding libgsteffdet.so (default: target/release, built if missing)
#
# Pipeline:
#   filesrc ! decodebin ! queue ! videoconvert ! effdet ! queue ! effdetoverlay
#     ! videoconvert ! x264enc ! mp4mux ! filesink
#
# Example:
#   pipelines/annotate-file.sh street.mp4 street-annotated.mp4
#   MODEL=models/tf_efficientdet_d0.safetensors EFFDET_OPTS="score-threshold=0.4" \
#     pipelines/annotate-file.sh street.mp4 out.mp4
set -euo pipefail
. "$(dirname "$0")/common.sh"

[ $# -eq 2 ] || usage "expected 2 arguments, got $#"
IN="$1"
OUT="$2"
source_for SRC "$IN"
setup

run_gst "${SRC[@]}" ! queue ! videoconvert \
  ! effdet "model=$MODEL" "${EFFDET_OPTS[@]}" ! queue \
  ! effdetoverlay ! videoconvert \
  ! x264enc speed-preset=veryfast pass=quant quantizer=20 ! mp4mux ! filesink "location=$OUT"
info "wrote $OUT"
