#!/usr/bin/env bash
# Builds here (the Debian build machine, no GPU) everything a GPU run needs and packs it into
# gpu-pack/ (ignored by git through .git/info/exclude): the GPU test binaries, the effdet CLI,
# the bundled models and the PyTorch peer's wheel. Then one device call runs it:
#
#   scripts/gpu/build.sh
#   device run:  carry ["gpu-pack"], command "bash gpu-pack/run.sh"
#
# The GPU host has no Rust, GStreamer or network; its Python has torch/timm and pip's NVIDIA
# libraries, which gpu-pack/run.sh finds. Results come back under $OUT (see run.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
pack=gpu-pack
grep -qx "/$pack/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$pack/" >> .git/info/exclude; }
rm -rf "$pack"
mkdir -p "$pack/bin" "$pack/wheels" "$pack/models"

echo "== building the CLI (release) and the GPU test binaries"
cargo build --release --locked --bin effdet
cp target/release/effdet "$pack/bin/"
# Test binaries: their paths come from cargo's JSON messages.
cargo test --locked --no-run --message-format=json --test cuda_gpu --test cuda_nvrtc 2>/dev/null |
  python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], sys.argv[1] + "/bin/" + m["target"]["name"])
        print("  test binary", m["target"]["name"])
' "$pack"

# Debug info is most of their size; the device's carry limit is 64 MiB in all.
strip "$pack"/bin/*

echo "== models, the run script, the PyTorch peer and its wheels"
cp models/*.safetensors models/*.txt "$pack/models/" 2>/dev/null || true
cp scripts/gpu/run.sh "$pack/run.sh"
cp bench/pytorch_gpu.py bench/ncu_summary.py "$pack/"
# The PyTorch peer: effdet and the pure-Python / cp312 packages it imports that the GPU host's
# Python (3.12, with torch, torchvision and timm) may lack. run.sh unpacks only the missing ones.
py=python3
$py -m pip --version >/dev/null 2>&1 || py="${HOME}/.cache/effdet/nvrtc-venv/bin/python"
plat="--only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64"
# shellcheck disable=SC2086
$py -m pip download -q --no-deps --dest "$pack/wheels" $plat effdet==0.4.1 omegaconf==2.3.0 \
    pycocotools==2.0.11 safetensors pyyaml &&
  $py -m pip wheel -q --no-deps -w "$pack/wheels" antlr4-python3-runtime==4.9.3 ||
  echo "   (could not fetch the peer's wheels: the PyTorch comparison will be skipped)"
git rev-parse HEAD > "$pack/COMMIT"
du -sh "$pack"
