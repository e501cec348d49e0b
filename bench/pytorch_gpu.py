#!/usr/bin/env python3
"""PyTorch effdet peer for the GPU benchmark (`scripts/gpu/run.sh`, `bench/gpu_report.py`).

Times effdet 0.4.1's tf_efficientdet_d0 on the GPU with the same weights and frame as
`effdet bench --backend cuda`, the way a competent PyTorch user would run it:

  * FP16 autocast, channels-last memory format, inference mode, cudnn.benchmark on;
  * variants: `eager`, and `compile` (`torch.compile` in its default mode) if it compiles;
    max-autotune's kernel search takes longer than the GPU lane's 10-minute call allows;
  * the network alone: a normalised input batch already on the GPU -> raw per-level outputs,
    synchronised, per batch size;
  * end to end: the host RGB frame (uint8 HWC) in -> pinned copy -> GPU letterbox resize
    (bilinear, like effdet's PIL resize) and normalisation -> network -> effdet's own GPU
    post-processing (`DetBenchPredict`: top-k, decode, batched NMS) -> detections on the host.

Prints one JSON line per (variant, batch) with the fields of `effdet bench --json` plus
`variant`, `torch`, `effdet`, `max_memory_allocated_bytes` (torch's allocator peak for that
batch) and `device_memory_bytes` (the device's total minus free memory: comparable to ours).
`--device cpu` runs the same code on the CPU (a smoke test; no autocast there).

Every batch size is guarded: a failure (out of memory, a compile error) prints a JSON line
with `error` and the next batch size still runs. `--deadline T` (seconds since the epoch)
skips what would start after T, with a JSON line saying so, so the lane's time limit never
cuts a line in half.
"""
import argparse
import importlib.metadata
import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import effdet
from effdet.bench import DetBenchPredict

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


def percentile(ts, q):
    ts = sorted(ts)
    return ts[min(len(ts) - 1, round((len(ts) - 1) * q))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--image", help="RGB frame (default: a synthetic 640x480 frame)")
    ap.add_argument("--batch", default="1,8,32,64,128")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--variants", default="eager,compile")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--deadline", type=float, default=None)
    a = ap.parse_args()

    def out_of_time(what):
        if a.deadline is not None and time.time() > a.deadline:
            print(json.dumps({"variant": what, "error": "skipped: the lane's deadline has passed"}), flush=True)
            return True
        return False

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    if a.image:
        frame = np.asarray(Image.open(a.image).convert("RGB"))
    else:
        rng = np.random.default_rng(0)
        frame = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    h, w = frame.shape[:2]
    scale = min(a.size / w, a.size / h)
    sw, sh = int(w * scale), int(h * scale)

    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(a.weights).items()}
    num_classes = sd["class_net.predict.conv_pw.bias"].numel() // 9
    mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=dev).view(1, 3, 1, 1)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def autocast():
        return torch.autocast("cuda", dtype=torch.float16) if cuda else torch.autocast("cpu", enabled=False)

    for variant in a.variants.split(","):
        if out_of_time(variant):
            break
        config = effdet.get_efficientdet_config("tf_efficientdet_d0")
        config.num_classes = num_classes
        config.image_size = (a.size, a.size)
        model = effdet.create_model_from_config(config, pretrained=False, pretrained_backbone=False)
        model.load_state_dict(sd, strict=True)
        model = model.eval().to(dev).to(memory_format=torch.channels_last)
        bench = DetBenchPredict(model).eval()
        net = model
        if variant == "compile":
            try:
                net = torch.compile(model)
                with torch.inference_mode(), autocast():
                    net(torch.zeros(1, 3, a.size, a.size, device=dev).contiguous(memory_format=torch.channels_last))
                bench.model = net
            except Exception as e:  # report, do not fail the whole run
                print(json.dumps({"variant": variant, "error": f"torch.compile failed: {e!r}"[:500]}), flush=True)
                continue
        elif variant != "eager":
            sys.exit(f"unknown variant {variant}")

        for batch in [int(b) for b in a.batch.split(",")]:
            if out_of_time(variant):
                break
            host = torch.from_numpy(np.repeat(frame[None], batch, axis=0))
            if cuda:
                host = host.pin_memory()
            x = torch.randn(batch, 3, a.size, a.size, device=dev).contiguous(memory_format=torch.channels_last)
            info = {
                "img_scale": torch.full((batch,), 1.0 / scale, device=dev),
                "img_size": torch.tensor([[w, h]] * batch, dtype=torch.float32, device=dev),
            }

            def network():
                with torch.inference_mode(), autocast():
                    return net(x)

            def end_to_end():
                with torch.inference_mode(), autocast():
                    g = host.to(dev, non_blocking=True).permute(0, 3, 1, 2).float()
                    g = F.interpolate(g, size=(sh, sw), mode="bilinear", align_corners=False)
                    g = (g - mean) / std
                    inp = torch.zeros(batch, 3, a.size, a.size, device=dev)
                    inp[:, :, :sh, :sw] = g
                    inp = inp.contiguous(memory_format=torch.channels_last)
                    dets = bench(inp, img_info=info)
                    return dets.cpu()

            def timed(fn):
                for _ in range(a.warmup):
                    fn()
                sync()
                ts = []
                for _ in range(a.iters):
                    t = time.perf_counter()
                    fn()
                    sync()
                    ts.append((time.perf_counter() - t) * 1000.0 / batch)
                return ts

            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                net_ms = timed(network)
                e2e_ms = timed(end_to_end)
            except torch.OutOfMemoryError as e:
                print(json.dumps({"variant": variant, "batch": batch, "error": f"out of memory: {e}"[:300]}), flush=True)
                torch.cuda.empty_cache() if cuda else None
                continue
            except Exception as e:  # one batch size's failure must not lose the others
                print(json.dumps({"variant": variant, "batch": batch, "error": f"{e!r}"[:500]}), flush=True)
                continue
            row = {
                "backend": f"pytorch-effdet-{dev.type}",
                "variant": variant,
                "torch": torch.__version__,
                "effdet": importlib.metadata.version("effdet"),
                "batch": batch,
                "network_ms_median": statistics.median(net_ms),
                "network_ms_p90": percentile(net_ms, 0.9),
                "network_images_per_s": 1000.0 / statistics.median(net_ms),
                "end_to_end_ms_median": statistics.median(e2e_ms),
                "end_to_end_ms_p90": percentile(e2e_ms, 0.9),
                "end_to_end_images_per_s": 1000.0 / statistics.median(e2e_ms),
                "max_memory_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                "device_memory_bytes": (lambda fm: fm[1] - fm[0])(torch.cuda.mem_get_info()) if cuda else None,
            }
            print(json.dumps(row), flush=True)
        del model, net, bench
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
