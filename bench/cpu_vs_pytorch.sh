#!/usr/bin/env bash
# CPU benchmark: our engine vs PyTorch effdet, same weights, image, batch and threads, one run.
#
# Usage: bench/cpu_vs_pytorch.sh [--threads N] [--iters K] [--weights W] [--image IMG]
# Writes bench/results/cpu_vs_pytorch-<date>.json and .md (machine, commit, command, numbers,
# ratio = ours / PyTorch; below 1.0 means we are faster).
set -euo pipefail
cd "$(dirname "$0")/.."

CMD="$0 $*"
THREADS=2; ITERS=20; WEIGHTS=tests/fixtures/golden/weights_f16.safetensors
IMAGE=tests/fixtures/golden/img0.png
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) THREADS="$2"; shift 2;;
    --iters) ITERS="$2"; shift 2;;
    --weights) WEIGHTS="$2"; shift 2;;
    --image) IMAGE="$2"; shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done

# The PyTorch peer: sets PY.
source bench/peer_python.sh

cargo build --release --locked --bin effdet
ours=$(target/release/effdet bench --weights "$WEIGHTS" --backend cpu --threads "$THREADS" \
  --batch 1 --iters "$ITERS" --image "$IMAGE" --json)
peer=$("$PY" bench/pytorch_effdet.py --weights "$WEIGHTS" --image "$IMAGE" --threads "$THREADS" \
  --batch 1 --iters "$ITERS" 2>/dev/null | tail -n 1)

mkdir -p bench/results
stamp=$(date -u +%Y-%m-%d)
out=bench/results/cpu_vs_pytorch-$stamp
"$PY" - "$ours" "$peer" "$out" "$CMD" <<'PY'
import json, os, platform, subprocess, sys, datetime
ours, peer, out, cmd = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
def sh(c):
    try: return subprocess.check_output(c, shell=True, text=True).strip()
    except Exception: return "unknown"
cpu = sh("lscpu | sed -n 's/^Model name:[ ]*//p'")
res = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": sh("git rev-parse --short HEAD") + ("-dirty" if sh("git status --porcelain --untracked-files=no") else ""),
    "command": cmd,
    "machine": {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform()},
    "ours": ours, "pytorch": peer,
    "ratio_end_to_end": ours["end_to_end_ms_median"] / peer["end_to_end_ms_median"],
    "ratio_network": ours["network_ms_median"] / peer["network_ms_median"],
}
json.dump(res, open(out + ".json", "w"), indent=2)
md = f"""# CPU: effdet-rs vs PyTorch effdet ({res['date']})

- machine: {cpu}, {os.cpu_count()} cores; {res['machine']['os']}
- commit: {res['commit']}; command: `{cmd}`
- both: batch 1, {ours['threads']} threads, same weights and image; median and p90 over timed iterations after warm-up
- network = raw per-level outputs from a normalised input; end to end = decoded RGB image in, detections out
  (ours: letterbox + network + NMS; PyTorch: effdet's eval transforms (PIL) + model + DetBenchPredict)
- PyTorch {peer['torch']}, effdet {peer['effdet']}

| per image (ms) | ours median | ours p90 | PyTorch median | PyTorch p90 | ratio (ours / PyTorch) |
|---|---|---|---|---|---|
| network | {ours['network_ms_median']:.1f} | {ours['network_ms_p90']:.1f} | {peer['network_ms_median']:.1f} | {peer['network_ms_p90']:.1f} | {res['ratio_network']:.3f} |
| end to end | {ours['end_to_end_ms_median']:.1f} | {ours['end_to_end_ms_p90']:.1f} | {peer['end_to_end_ms_median']:.1f} | {peer['end_to_end_ms_p90']:.1f} | {res['ratio_end_to_end']:.3f} |
"""
open(out + ".md", "w").write(md)
print(md)
PY
