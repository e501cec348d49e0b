#!/usr/bin/env python3
"""The arithmetic and memory-traffic floor of EfficientDet-D0 inference, per image.

Usage (from the repository root, with the packages of tools/requirements.txt):

    python3 tools/d0_floor.py [--size 512] [--classes 90] [--out bench/results/d0_floor]

Runs effdet 0.4.1's `tf_efficientdet_d0` once on the CPU with forward hooks on every leaf
module and counts, per image:

  * FLOPs (2 per multiply-add) of every convolution (dense, depthwise, pointwise; bias adds
    included) and linear layer, and 1 per output element of every batch norm, activation,
    pooling, resampling and of the BiFPN's weighted fusions and the SE scaling;
  * bytes, three ways, at FP16 (2 bytes per value):
      - `weights`: every parameter once (read once per batch: divide by the batch size);
      - `io`: the network input (3 x S x S) and the raw outputs (all levels' class and box
        maps), which any implementation must read and write;
      - `layerwise`: each leaf module reads its inputs and writes its output once (what an
        unfused engine moves; BN folded into convs and activations fused into their producer
        are NOT counted, as a fused engine would not move them);
  * the share of the arithmetic in depthwise convolutions (low arithmetic intensity, so they
    run near the memory floor, not the compute floor).

Then, with the H200 figures measured on the GPU host (../shared/PLATFORM.md: ~790 TFLOP/s
dense FP16/BF16 GEMM, ~4.3 TB/s device copy), the time per image each bound allows and the
images/s ceiling at large batch (`max(arithmetic time, (io + layerwise) traffic time)` with the
weights amortised). Writes OUT.json and OUT.md.
"""
import argparse
import datetime
import json
import platform
import subprocess

import torch
import torch.nn as nn

BYTES = 2  # FP16
PEAK_FLOPS = 790e12  # measured dense FP16/BF16 GEMM on the H200 host
PEAK_BW = 4.3e12  # measured device-to-device copy on the H200 host


def numel(t):
    if isinstance(t, torch.Tensor):
        return t.numel()
    if isinstance(t, (list, tuple)):
        return sum(numel(x) for x in t)
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--classes", type=int, default=90)
    ap.add_argument("--out", default="bench/results/d0_floor")
    a = ap.parse_args()

    from effdet import create_model_from_config, get_efficientdet_config
    from effdet.efficientdet import FpnCombine
    from timm.models._efficientnet_blocks import SqueezeExcite

    config = get_efficientdet_config("tf_efficientdet_d0")
    config.num_classes = a.classes
    config.image_size = (a.size, a.size)
    model = create_model_from_config(config, pretrained=False, pretrained_backbone=False).eval()

    stats = {"conv_flops": 0, "dw_flops": 0, "other_flops": 0, "layer_bytes": 0, "convs": 0}
    folded = (nn.BatchNorm2d, nn.SiLU, nn.ReLU, nn.Identity, nn.Dropout)

    def hook(mod, inp, out):
        n_out = numel(out)
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            macs = n_out * (mod.in_channels // mod.groups) * k
            f = 2 * macs + (n_out if mod.bias is not None else 0)
            stats["conv_flops"] += f
            stats["convs"] += 1
            if mod.groups > 1 and mod.groups == mod.in_channels:
                stats["dw_flops"] += f
            stats["layer_bytes"] += (numel(inp) + n_out) * BYTES
        elif isinstance(mod, nn.Linear):
            stats["conv_flops"] += 2 * n_out * mod.in_features
            stats["layer_bytes"] += (numel(inp) + n_out) * BYTES
        elif isinstance(mod, folded):
            stats["other_flops"] += n_out  # fused into the producing conv: no traffic
        elif isinstance(mod, FpnCombine):
            # Weighted fusion of the (already resampled) inputs: a multiply-add per input
            # and output element; reads every input, writes the sum.
            n_in = len(mod.inputs_offsets)
            stats["other_flops"] += 2 * n_in * n_out
            stats["layer_bytes"] += (n_in + 1) * n_out * BYTES
        elif isinstance(mod, SqueezeExcite):
            # x * gate (the gate's convolutions are counted as convolutions).
            stats["other_flops"] += n_out
            stats["layer_bytes"] += 2 * n_out * BYTES
        elif len(list(mod.children())) == 0:
            stats["other_flops"] += n_out
            stats["layer_bytes"] += (numel(inp) + n_out) * BYTES

    for m in model.modules():
        if len(list(m.children())) == 0 or isinstance(m, (FpnCombine, SqueezeExcite)):
            m.register_forward_hook(hook)

    x = torch.randn(1, 3, a.size, a.size)
    with torch.inference_mode():
        cls, box = model(x)
    out_values = numel(cls) + numel(box)
    weights = sum(p.numel() for p in model.parameters())
    flops = stats["conv_flops"] + stats["other_flops"]
    io_bytes = (3 * a.size * a.size + out_values) * BYTES
    res = {
        "model": "tf_efficientdet_d0",
        "input": [a.size, a.size],
        "classes": a.classes,
        "parameters": weights,
        "convolutions": stats["convs"],
        "gflops_per_image": flops / 1e9,
        "conv_gflops_per_image": stats["conv_flops"] / 1e9,
        "depthwise_share_of_flops": stats["dw_flops"] / flops,
        "weights_mb_fp16": weights * BYTES / 1e6,
        "io_mb_per_image_fp16": io_bytes / 1e6,
        "layerwise_mb_per_image_fp16": stats["layer_bytes"] / 1e6,
        "peak_flops": PEAK_FLOPS,
        "peak_bytes_per_s": PEAK_BW,
    }
    t_compute = flops / PEAK_FLOPS
    t_io = io_bytes / PEAK_BW
    t_layer = (io_bytes + stats["layer_bytes"]) / PEAK_BW
    res["us_per_image_compute_floor"] = t_compute * 1e6
    res["us_per_image_io_floor"] = t_io * 1e6
    res["us_per_image_layerwise_traffic"] = t_layer * 1e6
    res["images_per_s_ceiling_compute"] = 1 / t_compute
    res["images_per_s_ceiling_layerwise"] = 1 / max(t_compute, t_layer)
    res["batch1_us_weights_read"] = weights * BYTES / PEAK_BW * 1e6
    res["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        res["commit"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        res["commit"] = "unknown"
    res["machine"] = f"{platform.processor() or platform.machine()} ({platform.platform()}), counted on the CPU; peaks from the H200 host"
    res["command"] = "python3 tools/d0_floor.py " + " ".join(
        f"--{k} {v}" for k, v in vars(a).items())
    with open(a.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    md = f"""# EfficientDet-D0 floor on the H200 ({res['date']})

- counted by `{res['command']}` (effdet 0.4.1 `tf_efficientdet_d0`, forward hooks), commit {res['commit']}
- peaks: {PEAK_FLOPS/1e12:.0f} TFLOP/s dense FP16 GEMM and {PEAK_BW/1e12:.1f} TB/s copy, both measured on the H200 host (../shared/PLATFORM.md)

| per image, input {a.size}x{a.size}, FP16 | value |
|---|---|
| arithmetic | {res['gflops_per_image']:.3f} GFLOP ({res['conv_gflops_per_image']:.3f} in convolutions; {100*res['depthwise_share_of_flops']:.1f}% in depthwise convolutions) |
| parameters | {weights/1e6:.2f} M = {res['weights_mb_fp16']:.1f} MB (read once per batch) |
| input + raw outputs | {res['io_mb_per_image_fp16']:.2f} MB |
| layer-by-layer activations (BN folded, activations fused) | {res['layerwise_mb_per_image_fp16']:.1f} MB |
| compute floor | {res['us_per_image_compute_floor']:.2f} us -> {res['images_per_s_ceiling_compute']:,.0f} images/s |
| input/output traffic floor | {res['us_per_image_io_floor']:.2f} us |
| layer-by-layer traffic | {res['us_per_image_layerwise_traffic']:.2f} us -> {res['images_per_s_ceiling_layerwise']:,.0f} images/s |
| batch 1: reading the weights once | {res['batch1_us_weights_read']:.2f} us |

Reading: D0 is memory-bound on the H200. Its arithmetic would take {res['us_per_image_compute_floor']:.1f} us per image at
the GEMM peak, but an engine that writes every layer's output to memory and reads it back
moves {res['layerwise_mb_per_image_fp16']:.0f} MB per image, {res['us_per_image_layerwise_traffic']:.0f} us at full bandwidth: the
throughput ceiling for such an engine is about {res['images_per_s_ceiling_layerwise']:,.0f} images/s; only fusion
(keeping the depthwise/SE/activation chains on chip) can go past it. At batch 1 the floor is
set by latency ({stats['convs']} convolutions, and an unfused engine launches more kernels than that, each
with a few microseconds of launch and tail), not by either bound, which is why the forward is
captured in a CUDA graph.
"""
    with open(a.out + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
