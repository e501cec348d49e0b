#!/usr/bin/env bash
# Live detection on a network stream (RTSP camera or server), boxes drawn on screen.
#
# Usage: pipelines/rtsp.sh URL
#   URL  rtsp://[user:pass@]host[:port]/path (any URI uridecodebin plays works too: http://,
#        file://, ...)
#
# Environment:
#   MODEL             effdet-named safetensors weights. Default:
#                     models/effdet-d0-shapes256.safetensors, the model trained here on the
#                     synthetic shapes (6 classes). Bring COCO or your own weights for other
#                     objects.
#   EFFDET_OPTS       extra effdet properties, e.g. "interval=2 score-threshold=0.5"
#   EFFDET_PLUGIN_DIR directory holding libgsteffdet.so (default: target/release, built if missing)
#
# Pipeline (the leaky queue drops frames while effdet is busy, so the picture stays live):
#   uridecodebin uri=URL ! queue leaky=downstream max-size-buffers=1 ! videoconvert
#     ! effdet ! effdetoverlay ! videoconvert ! autovideosink sync=false
#
# Example:
#   pipelines/rtsp.sh rtsp://192.168.1.20:554/stream1
set -euo pipefail
. "$(dirname "$0")/common.sh"

[ $# -eq 1 ] || usage "expected 1 argument, got $#"
URL="$1"
[[ "$URL" =~ ^[A-Za-z][A-Za-z0-9+.-]*:// ]] || usage "'$URL' is not a URL (rtsp://...)"
setup

run_gst uridecodebin "uri=$URL" ! queue leaky=downstream max-size-buffers=1 ! videoconvert \
  ! effdet "model=$MODEL" "${EFFDET_OPTS[@]}" ! effdetoverlay \
  ! videoconvert ! autovideosink sync=false
