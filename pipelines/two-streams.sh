#!/usr/bin/env bash
# Two inputs in one process, each branch with its own effdet: shown on screen, or written to
# annotated MP4 files plus JSON Lines when OUT_DIR is given.
#
# Usage: pipelines/two-streams.sh IN1 IN2 [OUT_DIR]
#   IN1, IN2  video files or URIs (file://, rtsp://, http://, ...)
#   OUT_DIR   write OUT_DIR/stream1.mp4, stream1.jsonl, stream2.mp4, stream2.jsonl instead of
#             showing two windows
#
# Environment:
#   MODEL             effdet-named safetensors weights (both branches). Default:
#                     models/effdet-d0-shapes256.safetensors, the model trained here on the
#                     synthetic shapes (6 classes). Bring COCO or your own weights for other
#                     objects.
#   EFFDET_OPTS       extra effdet properties for both branches, e.g. "threads=2"
#   EFFDET_PLUGIN_DIR directory holding libgsteffdet.so (default: target/release, built if missing)
#
# Pipeline, per branch K (each effdet loads the model once and runs in its branch's thread):
#   SOURCE_K ! queue ! videoconvert ! effdet name=detK ! effdetoverlay ! videoconvert
#     ! autovideosink
#   or with OUT_DIR:
#   ... ! effdet ! effdetjson location=OUT_DIR/streamK.jsonl ! effdetoverlay ! videoconvert
#     ! x264enc ! mp4mux ! filesink location=OUT_DIR/streamK.mp4
#
# Example:
#   pipelines/two-streams.sh left.mp4 right.mp4
#   pipelines/two-streams.sh rtsp://cam1/stream rtsp://cam2/stream
#   pipelines/two-streams.sh a.mp4 b.mp4 out/
set -euo pipefail
. "$(dirname "$0")/common.sh"

[ $# -eq 2 ] || [ $# -eq 3 ] || usage "expected 2 or 3 arguments, got $#"
OUT_DIR="${3:-}"
source_for SRC1 "$1"
source_for SRC2 "$2"
setup
[ -z "$OUT_DIR" ] || mkdir -p "$OUT_DIR"

# branch K SOURCE_WORDS...: the gst-launch words of one branch.
branch() {
  local k="$1"
  shift
  BRANCH=("$@" ! queue ! videoconvert ! effdet "name=det$k" "model=$MODEL" "${EFFDET_OPTS[@]}")
  if [ -z "$OUT_DIR" ]; then
    BRANCH+=(! effdetoverlay ! videoconvert ! autovideosink)
  else
    BRANCH+=(! effdetjson "location=$OUT_DIR/stream$k.jsonl" ! effdetoverlay ! videoconvert
      ! x264enc speed-preset=veryfast pass=quant quantizer=20 ! mp4mux ! filesink "location=$OUT_DIR/stream$k.mp4")
  fi
}
branch 1 "${SRC1[@]}"
B1=("${BRANCH[@]}")
branch 2 "${SRC2[@]}"
B2=("${BRANCH[@]}")

run_gst "${B1[@]}" "${B2[@]}"
[ -z "$OUT_DIR" ] || info "wrote $OUT_DIR/stream{1,2}.{mp4,jsonl}"
