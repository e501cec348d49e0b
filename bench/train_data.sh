#!/usr/bin/env bash
# Training throughput on the synthetic dataset: the input pipeline alone (decode, augment,
# label, batch; `effdet bench-data`) against the training step it must keep fed
# (`effdet bench-train`), same input size and batch, one run.
#
# Usage: bench/train_data.sh [--size 256] [--batch 8] [--threads 2] [--data DIR]
# Generates the dataset with `effdet synth` if DIR (default data/shapes) has none. Writes
# bench/results/train_data-<date>.json and .md.
set -euo pipefail
cd "$(dirname "$0")/.."

CMD="$0 $*"
SIZE=256; BATCH=8; THREADS=2; DATA=data/shapes; WEIGHTS=tests/fixtures/golden/weights_f16.safetensors
while [ $# -gt 0 ]; do
  case "$1" in
    --size) SIZE="$2"; shift 2;;
    --batch) BATCH="$2"; shift 2;;
    --threads) THREADS="$2"; shift 2;;
    --data) DATA="$2"; shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done

cargo build --release --locked --bin effdet
if ! [ -f "$DATA/train/annotations.json" ]; then
  target/release/effdet synth --out "$DATA" --video-frames 0
fi
rows=()
for W in 1 2; do
  rows+=("$(target/release/effdet bench-data --annotations "$DATA/train/annotations.json" \
    --images "$DATA/train/images" --size "$SIZE" --batch "$BATCH" --workers "$W" --batches 40 --json)")
done
step=$(target/release/effdet bench-train --weights "$WEIGHTS" --size "$SIZE" --batch "$BATCH" \
  --threads "$THREADS" --iters 5 --json)

mkdir -p bench/results
out=bench/results/train_data-$(date -u +%Y-%m-%d)
joined=$(IFS=,; echo "[${rows[*]}]")
python3 - "$joined" "$step" "$out" "$CMD" <<'PY'
import json, os, platform, subprocess, sys, datetime
loader, step, out, cmd = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
def sh(c):
    try: return subprocess.check_output(c, shell=True, text=True).strip()
    except Exception: return "unknown"
cpu = sh("lscpu | sed -n 's/^Model name:[ ]*//p'")
train_ips = 1000.0 / step["step_ms_per_image_median"]
res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "commit": sh("git rev-parse --short HEAD") + ("-dirty" if sh("git status --porcelain --untracked-files=no") else ""), "command": cmd,
       "machine": {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform()},
       "loader": loader, "train_step": step, "train_images_per_s": train_ips}
json.dump(res, open(out + ".json", "w"), indent=2)
lines = [f"# Training input pipeline vs training step ({res['date']})", "",
         f"- machine: {cpu}, {os.cpu_count()} cores; commit {res['commit']}; command `{cmd}`",
         f"- synthetic dataset (`effdet synth`, 512x512 PNGs), input {step['size']}x{step['size']}, batch {step['batch']}",
         "- loader: decode + flip + scale jitter/crop + normalise + anchor labeling, timed over 40 batches after the first",
         f"- training step: `effdet bench-train`, {step['threads']} threads", "",
         "| what | images/s |", "|---|---|"]
for l in loader:
    lines.append(f"| input pipeline, {l['workers']} worker(s) | {l['images_per_s']:.0f} |")
lines.append(f"| training step (forward, backward, SGD) | {train_ips:.1f} |")
lines.append("")
lines.append(f"The pipeline is {loader[0]['images_per_s'] / train_ips:.0f}x faster than training with one worker: it never stalls the step (its workers share the same cores).")
open(out + ".md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
