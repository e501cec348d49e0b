#!/usr/bin/env bash
# CPU training-step benchmark: `effdet bench-train` vs a PyTorch effdet training step, same
# weights, input size, batch, boxes, optimizer and threads, in one run, at 512 and 256.
#
# Usage: bench/train_vs_pytorch.sh [--threads N] [--iters K] [--batch B] [--sizes "512 256"]
# Writes bench/results/train_vs_pytorch-<date>.json and .md (machine, commit, command, numbers,
# ratio = ours / PyTorch per image; below 1.0 means we are faster).
set -euo pipefail
cd "$(dirname "$0")/.."

CMD="$0 $*"
THREADS=2; ITERS=5; BATCH=2; SIZES="512 256"; WEIGHTS=tests/fixtures/golden/weights_f16.safetensors
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) THREADS="$2"; shift 2;;
    --iters) ITERS="$2"; shift 2;;
    --batch) BATCH="$2"; shift 2;;
    --sizes) SIZES="$2"; shift 2;;
    --weights) WEIGHTS="$2"; shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done

# The PyTorch peer: sets PY.
source bench/peer_python.sh

cargo build --release --locked --bin effdet
rows=()
for S in $SIZES; do
  # Alternate the two so that drift of the machine's speed hits both alike.
  ours=$(target/release/effdet bench-train --weights "$WEIGHTS" --threads "$THREADS" \
    --size "$S" --batch "$BATCH" --iters "$ITERS" --json)
  peer=$("$PY" bench/pytorch_train_step.py --weights "$WEIGHTS" --threads "$THREADS" \
    --size "$S" --batch "$BATCH" --iters "$ITERS" 2>/dev/null | tail -n 1)
  rows+=("{\"ours\": $ours, \"pytorch\": $peer}")
done

mkdir -p bench/results
stamp=$(date -u +%Y-%m-%d)
out=bench/results/train_vs_pytorch-$stamp
joined=$(IFS=,; echo "[${rows[*]}]")
"$PY" - "$joined" "$out" "$CMD" <<'PY'
import json, os, platform, subprocess, sys, datetime
rows, out, cmd = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
def sh(c):
    try: return subprocess.check_output(c, shell=True, text=True).strip()
    except Exception: return "unknown"
cpu = sh("lscpu | sed -n 's/^Model name:[ ]*//p'")
for r in rows:
    r["ratio_step"] = r["ours"]["step_ms_per_image_median"] / r["pytorch"]["step_ms_per_image_median"]
    r["ratio_peak_rss"] = r["ours"]["peak_rss_bytes"] / r["pytorch"]["peak_rss_bytes"]
res = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": sh("git rev-parse --short HEAD") + ("-dirty" if sh("git status --porcelain --untracked-files=no") else ""),
    "command": cmd,
    "machine": {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform()},
    "rows": rows,
}
json.dump(res, open(out + ".json", "w"), indent=2)
mib = lambda b: b / 2**20
p0 = rows[0]["pytorch"]
lines = [f"""# CPU training step: effdet-rs vs PyTorch effdet ({res['date']})

- machine: {cpu}, {os.cpu_count()} cores; {res['machine']['os']}
- commit: {res['commit']}; command: `{cmd}`
- both: D0, same weights, synthetic image and boxes, batch {rows[0]['ours']['batch']}, {rows[0]['ours']['threads']} threads;
  step = forward (training-mode BN, drop-path off) + focal/Huber loss + backward + clip (10) + SGD (momentum 0.9, wd 4e-5)
- time: median per image over timed steps after one warm-up step; memory: peak RSS of the process
  (ours also reports the autograd tape's peak tensor bytes)
- PyTorch {p0['torch']}, effdet {p0['effdet']}

| input | ours ms/image | PyTorch ms/image | ratio (ours / PyTorch) | ours peak RSS | PyTorch peak RSS | ours tape peak |
|---|---|---|---|---|---|---|"""]
for r in rows:
    o, p = r["ours"], r["pytorch"]
    lines.append(f"| {o['size']}x{o['size']} | {o['step_ms_per_image_median']:.0f} | {p['step_ms_per_image_median']:.0f} | "
                 f"{r['ratio_step']:.2f} | {mib(o['peak_rss_bytes']):.0f} MiB | {mib(p['peak_rss_bytes']):.0f} MiB | "
                 f"{mib(o['peak_tape_bytes']):.0f} MiB |")
md = "\n".join(lines) + "\n"
open(out + ".md", "w").write(md)
print(md)
PY
