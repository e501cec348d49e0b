#!/usr/bin/env bash
# Smoke test of the whole plugin with no input file: a synthetic test pattern through effdet,
# effdetoverlay and effdetjson; prints one JSON line per frame on standard output.
#
# Usage: pipelines/test-source.sh [N_FRAMES]
#   N_FRAMES  number of frames (default 30), 640x480
#
# Environment:
#   MODEL             effdet-named safetensors weights. Default:
#                     models/effdet-d0-shapes256.safetensors, the model trained here on the
#                     synthetic shapes (6 classes). Bring COCO or your own weights for other
#                     objects.
#   EFFDET_OPTS       extra effdet properties, e.g. "score-threshold=0.1"
#   EFFDET_PLUGIN_DIR directory holding libgsteffdet.so (default: target/release, built if missing)
#
# Pipeline:
#   videotestsrc num-buffers=N ! video/x-raw,width=640,height=480 ! videoconvert
#     ! effdet ! effdetoverlay ! effdetjson ! fakesink
#
# Standard output carries only the JSON lines (gst-launch runs with -q; messages go to stderr).
#
# Example:
#   pipelines/test-source.sh 30 > frames.jsonl
set -euo pipefail
. "$(dirname "$0")/common.sh"

[ $# -le 1 ] || usage "expected at most 1 argument, got $#"
N="${1:-30}"
[[ "$N" =~ ^[1-9][0-9]*$ ]] || usage "N_FRAMES must be a positive integer, got '$N'"
setup

run_gst -q videotestsrc "num-buffers=$N" ! video/x-raw,width=640,height=480 ! videoconvert \
  ! effdet "model=$MODEL" "${EFFDET_OPTS[@]}" \
  ! effdetoverlay ! effdetjson ! fakesink sync=false
