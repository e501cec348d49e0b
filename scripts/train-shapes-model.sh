#!/usr/bin/env bash
# Trains (or continues training) the bundled shapes model and scores it on the held-out set.
#
# Usage: scripts/train-shapes-model.sh OUT_DIR [extra `effdet train` flags...]
#   e.g. scripts/train-shapes-model.sh runs/more --weights models/effdet-d0-shapes256.safetensors --epochs 6
#
# Renders the training data (data/shapes256: 5000 + 300 images at 256x256, seed 0) and the
# held-out set (data/heldout256: 500 images, --val-seed 1) when missing, trains with
# models/effdet-d0-shapes256.train.json (flags given here win), then prints the held-out COCO
# metrics of OUT_DIR/model_f16.safetensors as JSON (also saved as OUT_DIR/heldout.json).
# To ship the result: copy OUT_DIR/model_f16.safetensors to models/effdet-d0-shapes256.safetensors
# and update models/README.md with the printed numbers. Runs at a low CPU priority (nice), so a
# session can keep working beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,15p' "$0"; exit 2; }
out="$1"; shift
effdet=target/release/effdet
cargo build --release --locked --bin effdet
[ -f data/shapes256/train/annotations.json ] ||
  "$effdet" synth --out data/shapes256 --train 5000 --val 300 --size 256 --video-frames 0
[ -f data/heldout256/val/annotations.json ] ||
  "$effdet" synth --out data/heldout256 --train 0 --val 500 --val-seed 1 --size 256 --video-frames 0
nice -n 10 "$effdet" train --config models/effdet-d0-shapes256.train.json \
  --train-annotations data/shapes256/train/annotations.json --train-images data/shapes256/train/images \
  --val-annotations data/shapes256/val/annotations.json --val-images data/shapes256/val/images \
  --out "$out" --f16 "$@"
"$effdet" eval --weights "$out/model_f16.safetensors" --images data/heldout256/val/images \
  --annotations data/heldout256/val/annotations.json --json | tee "$out/heldout.json"
