#!/usr/bin/env bash
# CPU benchmark: our engine against ONNX Runtime running our own export of the same model
# (`effdet export`), same weights, batch sizes and threads, in one run.
#
# Usage: bench/cpu_vs_ort.sh [--threads N] [--iters K] [--batch 1,8] [--weights W] [--image IMG]
# Writes bench/results/cpu_vs_ort-<date>.json and .md (machine, commit, command, numbers, the
# ratio ours / ONNX Runtime: below 1.0 means we are faster). Network alone on both sides (the
# input already in the engine's layout, raw outputs back); ours also end to end.
# Needs a Python with onnxruntime and numpy: $EFFDET_PYTHON, else the test venv of
# scripts/test.sh ($HOME/.cache/effdet/nvrtc-venv).
set -euo pipefail
cd "$(dirname "$0")/.."

CMD="$0 $*"
THREADS=2; ITERS=20; BATCH=1,8; WEIGHTS=tests/fixtures/golden/weights_f16.safetensors
IMAGE=tests/fixtures/golden/img0.png
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) THREADS="$2"; shift 2;;
    --iters) ITERS="$2"; shift 2;;
    --batch) BATCH="$2"; shift 2;;
    --weights) WEIGHTS="$2"; shift 2;;
    --image) IMAGE="$2"; shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
PY="${EFFDET_PYTHON:-$HOME/.cache/effdet/nvrtc-venv/bin/python}"
"$PY" -c "import onnxruntime, numpy" 2>/dev/null || {
  echo "need a Python with onnxruntime and numpy (set EFFDET_PYTHON, or run scripts/test.sh once)" >&2
  exit 2
}

cargo build --release --locked --bin effdet
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
target/release/effdet export --weights "$WEIGHTS" --out "$tmp/model.onnx" >&2
ours=$(target/release/effdet bench --weights "$WEIGHTS" --backend cpu --threads "$THREADS" \
  --batch "$BATCH" --iters "$ITERS" --warmup 3 --image "$IMAGE" --json)
peer=$("$PY" bench/ort_cpu.py "$tmp/model.onnx" --batch "$BATCH" --threads "$THREADS" --iters "$ITERS")
# Where our time goes, per op kind (effdet bench --profile), at the same batch sizes.
prof=$(target/release/effdet bench --weights "$WEIGHTS" --backend cpu --threads "$THREADS" \
  --batch "$BATCH" --iters 5 --warmup 1 --image "$IMAGE" --profile --json | grep '"profile"')

mkdir -p bench/results
out=bench/results/cpu_vs_ort-$(date -u +%Y-%m-%d)
"$PY" - "$ours" "$peer" "$out" "$CMD" "$prof" <<'PY'
import json, os, platform, subprocess, sys, datetime
rows = lambda t: [json.loads(l) for l in t.splitlines() if l.startswith("{")]
ours, peer, out, cmd = rows(sys.argv[1]), rows(sys.argv[2]), sys.argv[3], sys.argv[4]
profiles = [r["profile"] for r in rows(sys.argv[5])]
def sh(c):
    try: return subprocess.check_output(c, shell=True, text=True).strip()
    except Exception: return "unknown"
cpu = sh("lscpu | sed -n 's/^Model name:[ ]*//p'")
flags = sh("grep -m1 -o -w -e avx2 -e avx512f /proc/cpuinfo | sort -u | tr '\\n' ' '")
table = []
for o in ours:
    p = next(p for p in peer if p["batch"] == o["batch"])
    table.append({"batch": o["batch"], "ours": o, "onnxruntime": p,
                  "ratio_network": o["network_ms_median"] / p["network_ms_median"]})
res = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": sh("git rev-parse --short HEAD") + ("-dirty" if sh("git status --porcelain --untracked-files=no") else ""),
    "command": cmd,
    "machine": {"cpu": cpu, "flags": flags, "cores": os.cpu_count(), "os": platform.platform()},
    "rows": table,
    "profile": profiles,
}
json.dump(res, open(out + ".json", "w"), indent=2)
md = [f"# CPU: effdet-rs vs ONNX Runtime on our own export ({res['date']})", "",
      f"- machine: {cpu} ({flags.strip()}), {os.cpu_count()} cores; {res['machine']['os']}",
      f"- commit: {res['commit']}; command: `{cmd}`",
      f"- the same weights (`effdet export` of them for ONNX Runtime {peer[0]['onnxruntime']}: CPU provider, all graph optimisations,"
      f" {peer[0]['threads']} intra-op threads); ours: `effdet bench --backend cpu --threads {ours[0]['threads']}`",
      "- network alone: normalised input batch in, raw head outputs out; median and p90 per image over the timed iterations after warm-up",
      "", "| batch | ours network ms | p90 | ONNX Runtime ms | p90 | ratio (ours / ORT) | ours end to end ms |",
      "|---|---|---|---|---|---|---|"]
for r in table:
    o, p = r["ours"], r["onnxruntime"]
    md.append(f"| {r['batch']} | {o['network_ms_median']:.1f} | {o['network_ms_p90']:.1f} | {p['network_ms_median']:.1f} | "
              f"{p['network_ms_p90']:.1f} | {r['ratio_network']:.2f} | {o['end_to_end_ms_median']:.1f} |")
md += ["", "Where our network's time goes (`effdet bench --profile`, 5 passes; ms per pass and share, by op kind):", ""]
for p in profiles:
    md += [f"Batch {p['batch']}: {p['ms_per_pass']:.1f} ms per pass in the ops", "", "| op kind | calls | ms | share |", "|---|---|---|---|"]
    for r in p["by_kind"]:
        md.append(f"| {r['name']} | {r['calls']} | {r['ms_per_pass']:.1f} | {100 * r['ms_per_pass'] / p['ms_per_pass']:.1f}% |")
    md.append("")
open(out + ".md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
