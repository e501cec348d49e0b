"""PyTorch effdet peer for `bench/cpu_vs_pytorch.sh`.

Times effdet's tf_efficientdet_d0 on the CPU with the same weights, image and thread count as the
Rust engine: the network alone (raw per-level outputs) and end to end (effdet's eval transforms:
PIL resize + pad + normalise, the model, and DetBenchPredict's post-processing).
Prints one JSON object with the same fields as `effdet bench --json`.
"""
import argparse
import importlib.metadata
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

import effdet
from effdet.bench import DetBenchPredict
from effdet.data.transforms import transforms_coco_eval
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    model = effdet.create_model("tf_efficientdet_d0", pretrained=False,
                                pretrained_backbone=False, bench_task="")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(a.weights).items()}
    model.load_state_dict(sd, strict=True)
    model.eval()
    bench = DetBenchPredict(model).eval()

    tf = transforms_coco_eval(512, interpolation="bilinear", use_prefetcher=True, fill_color="mean")
    mean = torch.tensor([x * 255 for x in IMAGENET_DEFAULT_MEAN]).view(1, 3, 1, 1)
    std = torch.tensor([x * 255 for x in IMAGENET_DEFAULT_STD]).view(1, 3, 1, 1)
    img = Image.open(a.image).convert("RGB")

    def preprocess():
        arrs, scales, sizes = [], [], []
        for _ in range(a.batch):
            arr, anno = tf(img, {})
            arrs.append(torch.from_numpy(arr))
            scales.append(anno["img_scale"])
            sizes.append(img.size)
        x = (torch.stack(arrs).float() - mean) / std
        info = {"img_scale": torch.tensor(scales, dtype=torch.float32),
                "img_size": torch.tensor(sizes, dtype=torch.float32)}
        return x, info

    x, info = preprocess()

    def timed(fn):
        for _ in range(a.warmup):
            fn()
        ts = []
        for _ in range(a.iters):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1000.0 / a.batch)
        ts.sort()
        return ts

    with torch.inference_mode():
        network = timed(lambda: model(x))

        def e2e():
            xx, ii = preprocess()
            return bench(xx, img_info=ii)
        end_to_end = timed(e2e)

    def p(ts, q):
        return ts[min(len(ts) - 1, round((len(ts) - 1) * q))]

    print(json.dumps({
        "backend": "pytorch-effdet-cpu",
        "torch": torch.__version__,
        "effdet": importlib.metadata.version("effdet"),
        "batch": a.batch,
        "threads": a.threads,
        "network_ms_median": statistics.median(network),
        "network_ms_p90": p(network, 0.9),
        "end_to_end_ms_median": statistics.median(end_to_end),
        "end_to_end_ms_p90": p(end_to_end, 0.9),
    }))


if __name__ == "__main__":
    main()
