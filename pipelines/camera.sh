#!/usr/bin/env bash
# Live detection on a V4L2 camera: boxes drawn on screen and, optionally, recorded to MP4.
#
# Usage: pipelines/camera.sh [DEVICE] [OUT.mp4]
#   DEVICE   V4L2 device (default /dev/video0)
#   OUT.mp4  also record the annotated video here (H.264 in MP4); Ctrl-C stops and finalises it
#
# Environment:
#   MODEL             effdet-named safetensors weights. Default:
#                     models/effdet-d0-shapes256.safetensors, the model trained here on the
#                     synthetic shapes (6 classes). Bring COCO or your own weights for other
#                     objects.
#   EFFDET_OPTS       extra effdet properties, e.g. "interval=3" to detect on every 3rd frame
#   EFFDET_PLUGIN_DIR directory holding libgsteffdet.so (default: target/release, built if missing)
#
# Pipeline (the leaky queue drops camera frames while effdet is busy instead of falling behind):
#   v4l2src ! queue leaky=downstream max-size-buffers=1 ! videoconvert ! effdet ! effdetoverlay
#     ! tee name=t  t. ! queue ! videoconvert ! autovideosink sync=false
#                   t. ! queue ! videoconvert ! x264enc tune=zerolatency ! mp4mux ! filesink
#
# Example:
#   pipelines/camera.sh                          # /dev/video0 to the screen
#   pipelines/camera.sh /dev/video2 desk.mp4     # and record
set -euo pipefail
. "$(dirname "$0")/common.sh"

[ $# -le 2 ] || usage "expected at most 2 arguments, got $#"
DEVICE="${1:-/dev/video0}"
OUT="${2:-}"
[ -c "$DEVICE" ] || usage "$DEVICE is not a video device"
setup

PIPE=(v4l2src "device=$DEVICE" ! queue leaky=downstream max-size-buffers=1 ! videoconvert
  ! effdet "model=$MODEL" "${EFFDET_OPTS[@]}" ! effdetoverlay)
if [ -z "$OUT" ]; then
  run_gst "${PIPE[@]}" ! videoconvert ! autovideosink sync=false
else
  run_gst "${PIPE[@]}" ! tee name=t \
    t. ! queue ! videoconvert ! autovideosink sync=false \
    t. ! queue ! videoconvert ! x264enc tune=zerolatency speed-preset=veryfast pass=quant quantizer=20 \
    ! mp4mux ! filesink "location=$OUT"
  info "wrote $OUT"
fi
