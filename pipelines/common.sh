# Shared set-up for the pipelines/*.sh scripts; sourced, not run.
#
# Provides:
#   REPO            the repository root
#   MODEL           weights for `effdet model=...` (env MODEL, default: the bundled shapes model)
#   EFFDET_OPTS     extra `effdet` properties as an array (env EFFDET_OPTS, split on spaces),
#                   e.g. EFFDET_OPTS="score-threshold=0.5 interval=2"
#   GST_PLUGIN_PATH with the directory holding libgsteffdet.so prepended
#   usage / show_help / die / info / setup / source_for / run_gst helpers
#
# A script sources this, checks its arguments (usage MESSAGE exits 2), then calls setup.
#
# Environment:
#   EFFDET_PLUGIN_DIR  directory with libgsteffdet.so; when set it must contain the plugin.
#                      Default: ${CARGO_TARGET_DIR:-$REPO/target}/release, built with
#                      `cargo build --release -p gst-effdet` when the library is missing.
#   MODEL, EFFDET_OPTS as above.
#
# All messages go to stderr, so a script's standard output carries only what its pipeline
# writes there (effdetjson without location= writes JSON lines to standard output).

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEFAULT_MODEL="$REPO/models/effdet-d0-shapes256.safetensors"

info() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() { info "error: $*"; exit 1; }

# show_help: print the script's header comment (its documentation) and exit 0.
show_help() {
  sed -n '2,/^set -euo pipefail/{/^#/s/^# \{0,1\}//p}' "$0"
  exit 0
}

# usage MESSAGE: print the header comment and MESSAGE to stderr, exit 2.
usage() {
  sed -n '2,/^set -euo pipefail/{/^#/s/^# \{0,1\}//p}' "$0" >&2
  printf '\n%s: %s\n' "$(basename "$0")" "$*" >&2
  exit 2
}

# Any script: -h / --help shows its documentation.
case "${1:-}" in -h | --help) show_help ;; esac

# setup: find (or build) the plugin, check the model, read EFFDET_OPTS.
setup() {
  # The plugin: use EFFDET_PLUGIN_DIR, or target/release (building it when missing).
  if [ -n "${EFFDET_PLUGIN_DIR:-}" ]; then
    [ -f "$EFFDET_PLUGIN_DIR/libgsteffdet.so" ] ||
      die "EFFDET_PLUGIN_DIR=$EFFDET_PLUGIN_DIR has no libgsteffdet.so"
  else
    EFFDET_PLUGIN_DIR="${CARGO_TARGET_DIR:-$REPO/target}/release"
    if [ ! -f "$EFFDET_PLUGIN_DIR/libgsteffdet.so" ]; then
      info "building the GStreamer plugin (cargo build --release -p gst-effdet)"
      (cd "$REPO" && cargo build --release -p gst-effdet) >&2 ||
        die "could not build the plugin"
    fi
  fi
  export GST_PLUGIN_PATH="$EFFDET_PLUGIN_DIR${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"
  info "plugin: $EFFDET_PLUGIN_DIR/libgsteffdet.so"

  command -v gst-launch-1.0 >/dev/null 2>&1 ||
    die "gst-launch-1.0 not found (Debian: apt-get install gstreamer1.0-tools)"

  MODEL="${MODEL:-$DEFAULT_MODEL}"
  [ -f "$MODEL" ] || { info "error: model file $MODEL not found (set MODEL=...)"; exit 2; }
  info "model: $MODEL"
  if [ "$(realpath "$MODEL")" = "$(realpath "$DEFAULT_MODEL")" ]; then
    info "NOTE: the bundled model detects the 6 synthetic shape classes of \`effdet synth\`"
    info "      (circle, square, ...), not everyday objects. Set MODEL=your.safetensors for"
    info "      COCO weights or your own trained model (see the README, 'Weights')."
  fi
  read -r -a EFFDET_OPTS <<<"${EFFDET_OPTS:-}"
}

# source_for ARRAY INPUT: set ARRAY to the gst-launch words that decode INPUT into raw video.
# A URI (anything with "://": file://, rtsp://, http://, ...) goes through uridecodebin, a
# path through filesrc ! decodebin; a missing file is a usage error (exit 2).
source_for() {
  local -n words="$1"
  local input="$2"
  if [[ "$input" == *://* ]]; then
    words=(uridecodebin "uri=$input")
  else
    [ -f "$input" ] || usage "input file $input not found"
    words=(filesrc "location=$input" '!' decodebin)
  fi
}

# run_gst WORD...: show the pipeline, then run it with -e (Ctrl-C sends EOS, so files are
# finalised). Each WORD is one gst-launch argument; gst-launch escapes each, so paths with
# spaces are safe.
run_gst() {
  info "gst-launch-1.0 -e $*"
  gst-launch-1.0 -e "$@"
}
