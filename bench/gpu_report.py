#!/usr/bin/env python3
"""Turns a GPU benchmark run (`scripts/gpu/run.sh` -> $OUT/bench/) into bench/results/.

Usage: python3 bench/gpu_report.py DIR [--out bench/results/gpu_vs_pytorch-<date>]

DIR holds ours.jsonl (`effdet bench --json`, one line per batch size), peer.jsonl
(bench/pytorch_gpu.py, one line per variant and batch size) and machine.txt (its `gpu` line
is nvidia-smi's; older runs had it in gpu.csv). Writes
OUT.json (everything, plus the ratios) and OUT.md: per batch size our images/s and PyTorch's
best variant's, network alone and end to end, the ratio ours / PyTorch, device memory, the
issue's targets (batch-1 end to end <= 1.0 ms, >= 15,000 images/s at batch >= 64, >= 3x
PyTorch at every batch size) marked met or not, and the distance from the D0 floor in
bench/results/d0_floor.json (tools/d0_floor.py).
"""
import argparse
import datetime
import json
import os
import sys


def read_jsonl(path):
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--out")
    ap.add_argument("--floor", default="bench/results/d0_floor.json")
    a = ap.parse_args()

    ours = [r for r in read_jsonl(os.path.join(a.dir, "ours.jsonl")) if "error" not in r]
    peer_all = read_jsonl(os.path.join(a.dir, "peer.jsonl"))
    peer = [r for r in peer_all if "error" not in r]
    if not ours:
        sys.exit(f"no results of ours in {a.dir}/ours.jsonl")
    text = lambda name: open(os.path.join(a.dir, name)).read().strip() if os.path.exists(os.path.join(a.dir, name)) else "unknown"
    machine = text("machine.txt")
    gpu = next((l[4:] for l in machine.splitlines() if l.startswith("gpu ")), None) or text("gpu.csv")
    floor = json.load(open(a.floor)) if os.path.exists(a.floor) else None
    date = datetime.date.today().isoformat()
    out = a.out or f"bench/results/gpu_vs_pytorch-{date}"

    rows = []
    for o in sorted(ours, key=lambda r: r["batch"]):
        b = o["batch"]
        cands = [p for p in peer if p["batch"] == b]
        best_net = max(cands, key=lambda p: p["network_images_per_s"], default=None)
        best_e2e = max(cands, key=lambda p: p["end_to_end_images_per_s"], default=None)
        row = {
            "batch": b,
            "ours_network_images_per_s": o["network_images_per_s"],
            "ours_end_to_end_images_per_s": o["end_to_end_images_per_s"],
            "ours_end_to_end_ms_per_image": o["end_to_end_ms_median"],
            "ours_device_memory_bytes": o.get("device_memory_bytes"),
            "peer_network_images_per_s": best_net and best_net["network_images_per_s"],
            "peer_network_variant": best_net and best_net["variant"],
            "peer_end_to_end_images_per_s": best_e2e and best_e2e["end_to_end_images_per_s"],
            "peer_end_to_end_variant": best_e2e and best_e2e["variant"],
            "peer_device_memory_bytes": best_e2e and best_e2e.get("device_memory_bytes"),
        }
        row["ratio_network"] = (row["ours_network_images_per_s"] / row["peer_network_images_per_s"]
                                if best_net else None)
        row["ratio_end_to_end"] = (row["ours_end_to_end_images_per_s"] / row["peer_end_to_end_images_per_s"]
                                   if best_e2e else None)
        if floor:
            ceiling = floor["images_per_s_ceiling_layerwise"]
            row["network_share_of_layerwise_ceiling"] = row["ours_network_images_per_s"] / ceiling
        rows.append(row)

    b1 = next((r for r in rows if r["batch"] == 1), None)
    big = [r for r in rows if r["batch"] >= 64]
    ratios = [r[k] for r in rows for k in ("ratio_network", "ratio_end_to_end") if r[k] is not None]
    targets = {
        "batch1_end_to_end_ms_le_1.0": None if b1 is None else b1["ours_end_to_end_ms_per_image"] <= 1.0,
        "ge_15000_images_per_s_at_batch_ge_64": None if not big else
            max(r["ours_network_images_per_s"] for r in big) >= 15000,
        "ge_3x_pytorch_every_batch": None if not ratios else min(ratios) >= 3.0,
    }
    res = {"date": date, "machine": machine, "gpu": gpu, "rows": rows, "targets": targets,
           "ours": ours, "peer": peer_all, "floor": floor,
           "command": "bash gpu-pack/run.sh (scripts/gpu/), then python3 bench/gpu_report.py " + a.dir}
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=1)

    fmt = lambda v, p=1: "-" if v is None else f"{v:,.{p}f}"
    mib = lambda v: "-" if v is None else f"{v / 1048576:,.0f}"
    md = [f"# GPU: effdet-rs CUDA engine vs PyTorch effdet ({date})", "",
          "- machine: " + machine.replace("\n", "; "), "- GPU: " + gpu.replace("\n", "; "),
          f"- command: `{res['command']}`",
          "- ours: `effdet bench --backend cuda` (FP16); network = input already on the GPU, outputs left there, synchronised;"
          " end to end = host RGB frame in, detections on the host",
          "- PyTorch: bench/pytorch_gpu.py, effdet 0.4.1, FP16 autocast, channels-last, best of eager / torch.compile per cell", "",
          "| batch | ours network img/s | PyTorch network img/s | ratio | ours end-to-end img/s | PyTorch end-to-end img/s | ratio | ours MiB | PyTorch MiB |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['batch']} | {fmt(r['ours_network_images_per_s'])} | {fmt(r['peer_network_images_per_s'])} ({r['peer_network_variant'] or '-'}) "
                  f"| {fmt(r['ratio_network'], 2)} | {fmt(r['ours_end_to_end_images_per_s'])} | {fmt(r['peer_end_to_end_images_per_s'])} "
                  f"| {fmt(r['ratio_end_to_end'], 2)} | {mib(r['ours_device_memory_bytes'])} | {mib(r['peer_device_memory_bytes'])} |")
    md += ["", "Targets (issue 4): " + ", ".join(f"{k}: {'met' if v else ('not met' if v is False else 'not measured')}"
                                              for k, v in targets.items())]
    if floor:
        md += ["", f"Floor (bench/results/d0_floor.md): compute {floor['us_per_image_compute_floor']:.1f} us/image, "
               f"layer-by-layer traffic {floor['us_per_image_layerwise_traffic']:.1f} us/image "
               f"(ceiling {floor['images_per_s_ceiling_layerwise']:,.0f} images/s for an unfused engine). Our network at each batch reaches "
               + ", ".join(f"{100 * r['network_share_of_layerwise_ceiling']:.1f}% (batch {r['batch']})" for r in rows) + " of that ceiling."]
    with open(out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
