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

echo "== models, the run script, the PyTorch peer's wheel"
cp models/*.safetensors models/*.txt "$pack/models/" 2>/dev/null || true
cp scripts/gpu/run.sh "$pack/run.sh"
if [ ! -f "$pack/wheels/effdet-0.4.1-py3-none-any.whl" ]; then
  # pure-Python effdet (torch and timm are on the GPU host already)
  python3 -m pip download -q --no-deps --dest "$pack/wheels" effdet==0.4.1 ||
    echo "   (could not fetch the effdet wheel: the PyTorch comparison will be skipped)"
fi
git rev-parse HEAD > "$pack/COMMIT"
du -sh "$pack"
