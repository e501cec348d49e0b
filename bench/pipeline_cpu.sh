#!/usr/bin/env bash
# GStreamer benchmark on this machine (CPU engine):
#   1. frames per second of the annotation pipeline on a 1080p H.264 file, end to end
#      (filesrc ! decodebin ! videoconvert ! effdet ! effdetoverlay ! videoconvert ! x264enc ! mp4mux);
#   2. the effdet element's overhead over the bare library Detector on the same decoded frames
#      (plugins/gst-effdet/examples/element_overhead.rs; target: under 5%).
#
# Usage: bench/pipeline_cpu.sh [--frames N] [--threads T] [--weights W]
# Writes bench/results/pipeline_cpu-<date>.json and .md.
set -euo pipefail
cd "$(dirname "$0")/.."
CMD="$0 $*"
FRAMES=60; THREADS=2; WEIGHTS=tests/fixtures/golden/weights_f16.safetensors
while [ $# -gt 0 ]; do
  case "$1" in
    --frames) FRAMES="$2"; shift 2;;
    --threads) THREADS="$2"; shift 2;;
    --weights) WEIGHTS="$2"; shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done

cargo build --release --locked -p gst-effdet --example element_overhead
export GST_PLUGIN_PATH="$PWD/target/release"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
video="$work/in1080.mp4"
gst-launch-1.0 -q -e videotestsrc num-buffers="$FRAMES" pattern=ball ! \
  video/x-raw,width=1920,height=1080,framerate=30/1 ! videoconvert ! \
  x264enc speed-preset=ultrafast ! mp4mux ! filesink location="$video"

start=$(date +%s.%N)
gst-launch-1.0 -q -e filesrc location="$video" ! decodebin ! videoconvert ! \
  effdet model="$WEIGHTS" threads="$THREADS" ! effdetoverlay ! videoconvert ! \
  x264enc speed-preset=ultrafast ! mp4mux ! filesink location="$work/out.mp4"
end=$(date +%s.%N)
overhead=$(target/release/examples/element_overhead "$video" "$WEIGHTS" "$FRAMES" "$THREADS")

mkdir -p bench/results
out=bench/results/pipeline_cpu-$(date -u +%Y-%m-%d)
python3 - "$start" "$end" "$FRAMES" "$overhead" "$out" "$CMD" "$THREADS" <<'PY'
import datetime, json, os, platform, subprocess, sys
start, end, frames, overhead, out, cmd, threads = sys.argv[1:8]
secs = float(end) - float(start)
o = json.loads(overhead)
def sh(c):
    try: return subprocess.check_output(c, shell=True, text=True).strip()
    except Exception: return "unknown"
res = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": sh("git rev-parse --short HEAD") + ("-dirty" if sh("git status --porcelain --untracked-files=no") else ""),
    "command": cmd,
    "machine": {"cpu": sh("lscpu | sed -n 's/^Model name:[ ]*//p'"), "cores": os.cpu_count(),
                "os": platform.platform(), "gstreamer": sh("gst-launch-1.0 --version | sed -n 2p")},
    "pipeline": {"frames": int(frames), "input": "1920x1080 H.264 (videotestsrc ball, x264 ultrafast)",
                 "wall_s": secs, "fps": int(frames) / secs, "threads": int(threads)},
    "element_overhead": o,
}
json.dump(res, open(out + ".json", "w"), indent=2)
md = f"""# GStreamer pipeline on the CPU ({res['date']})

- machine: {res['machine']['cpu']}, {res['machine']['cores']} cores; {res['machine']['os']}; {res['machine']['gstreamer']}
- commit: {res['commit']}; command: `{cmd}`

| measure | value |
|---|---|
| annotation pipeline, 1080p H.264 in -> annotated H.264 MP4 out | {res['pipeline']['fps']:.2f} frames/s ({frames} frames in {secs:.1f} s) |
| bare `Detector::detect` on decoded NV12 frames | {o['detector_ms_per_frame']:.1f} ms/frame |
| same frames through `appsrc ! effdet ! fakesink` | {o['element_ms_per_frame']:.1f} ms/frame |
| element overhead over the bare detector | {o['overhead_percent']:.1f}% |
"""
open(out + ".md", "w").write(md)
print(md)
PY
