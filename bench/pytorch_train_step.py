"""PyTorch effdet peer for `bench/train_vs_pytorch.sh`.

Times one effdet training step on the CPU with the same weights, input size, batch, boxes and
thread count as `effdet bench-train`: DetBenchTrain forward (training-mode BN, drop-path off, as
ours), loss, backward, gradient clipping (norm 10) and SGD (momentum 0.9, weight decay 4e-5 on
conv weights). Peak memory is the process's peak RSS (`ru_maxrss`), as ours reports VmHWM.
Prints one JSON object with the same fields as `effdet bench-train --json`.
"""
import argparse
import importlib.metadata
import json
import resource
import statistics
import time

import torch
from PIL import Image
from safetensors.torch import load_file

import effdet
from effdet.bench import DetBenchTrain
from effdet.data.transforms import transforms_coco_eval
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath

# Same list as BENCH_BOXES in src/main.rs: yxyx in a 512x512 frame, COCO category id.
BOXES = [
    ([20.0, 280.0, 108.0, 430.0], 1),
    ([0.0, 80.0, 200.0, 464.0], 3),
    ([156.0, 392.0, 262.0, 462.0], 18),
    ([334.0, 34.0, 384.0, 101.0], 44),
    ([206.0, 232.0, 216.0, 241.0], 62),
]


def synthetic_frame():
    """The 640x480 frame of `effdet bench` (src/main.rs synthetic_frame)."""
    w, h = 640, 480
    data = bytearray(w * h * 3)
    for y in range(h):
        for x in range(w):
            i = (y * w + x) * 3
            block = ((x // 80) + (y // 60)) % 3
            data[i] = x * 255 // w
            data[i + 1] = y * 255 // h
            data[i + 2] = (40, 140, 240)[block]
    return Image.frombytes("RGB", (w, h), bytes(data))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    model = effdet.create_model("tf_efficientdet_d0", pretrained=False, pretrained_backbone=False,
                                bench_task="", image_size=(a.size, a.size))
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(a.weights).items()}
    model.load_state_dict(sd, strict=True)
    for m in model.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
    bench = DetBenchTrain(model, create_labeler=True)
    bench.train()

    tf = transforms_coco_eval(a.size, interpolation="bilinear", use_prefetcher=True,
                              fill_color="mean")
    mean = torch.tensor([x * 255 for x in IMAGENET_DEFAULT_MEAN]).view(1, 3, 1, 1)
    std = torch.tensor([x * 255 for x in IMAGENET_DEFAULT_STD]).view(1, 3, 1, 1)
    arr, _ = tf(synthetic_frame(), {})
    x = ((torch.from_numpy(arr).unsqueeze(0).float() - mean) / std).repeat(a.batch, 1, 1, 1)
    k = a.size / 512.0
    bbox = torch.tensor([[c * k for c in b] for b, _ in BOXES], dtype=torch.float32)
    cls = torch.tensor([c for _, c in BOXES], dtype=torch.float32)
    target = {"bbox": bbox.unsqueeze(0).repeat(a.batch, 1, 1),
              "cls": cls.unsqueeze(0).repeat(a.batch, 1)}

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 4e-5},
                           {"params": no_decay, "weight_decay": 0.0}], lr=0.01, momentum=0.9)

    times = []
    loss = None
    for i in range(a.warmup + a.iters):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = bench(x, target)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        ms = (time.perf_counter() - t) * 1000.0
        loss = out["loss"].item()
        if i >= a.warmup:
            times.append(ms / a.batch)
    times.sort()

    def p(ts, q):
        return ts[min(len(ts) - 1, round((len(ts) - 1) * q))]

    print(json.dumps({
        "backend": "pytorch-effdet-cpu",
        "torch": torch.__version__,
        "effdet": importlib.metadata.version("effdet"),
        "size": a.size,
        "batch": a.batch,
        "threads": a.threads,
        "step_ms_per_image_median": statistics.median(times),
        "step_ms_per_image_min": times[0],
        "step_ms_per_image_p90": p(times, 0.9),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "last_loss": loss,
    }))


if __name__ == "__main__":
    main()
