#!/usr/bin/env python3
"""effdet 0.4.1's training dynamics on a small dataset, to compare with `effdet train`.

Usage (from the repository root, with the packages of tools/requirements.txt):

    python3 tools/overfit_reference.py --annotations A.json --images DIR --size 256 \
        --steps 300 --lr 0.02 [--optimizer sgd|adamw] [--weight-decay WD] [--clip 10]

Trains `tf_efficientdet_d0` from scratch (no pretrained backbone, drop-path 0) with
`DetBenchTrain` on the images of a COCO file, without augmentation (each image letterboxed to
`--size` as effdet's eval transform does, normalised with ImageNet mean/std), batch 8 in a
seeded shuffled order, SGD momentum 0.9 (timm's two parameter groups: no weight decay on
biases and 1-d tensors) or AdamW, gradient clipping, 10 warm-up steps from a tenth of the LR
then cosine to 1e-5: the `effdet train` recipe with its augmentation off. Prints the mean
loss / class loss / box loss every 50 steps, so the curve can be set beside `effdet train
--config` with `scale_min = scale_max = 1`, `hflip_prob = 0`, `drop_path_rate = 0` on the
same data. Both start from different random weights, so only the shape of the curves is
comparable (how fast the loss falls), not the digits.
"""
import argparse
import json
import math
import os
import random

import numpy as np
import torch
from PIL import Image


def letterbox(img, size):
    w, h = img.size
    scale = min(size / w, size / h)
    sw, sh = int(w * scale), int(h * scale)
    img = img.resize((sw, sh), Image.BILINEAR)
    canvas = Image.new("RGB", (size, size), (124, 116, 104))
    canvas.paste(img, (0, 0))
    return canvas, scale


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--annotations", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    ap.add_argument("--weight-decay", type=float, default=4e-5)
    ap.add_argument("--clip", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from effdet import create_model_from_config, get_efficientdet_config

    torch.manual_seed(a.seed)
    random.seed(a.seed)
    torch.set_num_threads(a.threads)
    coco = json.load(open(a.annotations))
    cats = sorted(c["id"] for c in coco["categories"])
    cls_of = {c: i + 1 for i, c in enumerate(cats)}
    mean = np.array([0.485, 0.456, 0.406]) * 255
    std = np.array([0.229, 0.224, 0.225]) * 255
    samples = []
    for im in coco["images"]:
        img = Image.open(os.path.join(a.images, im["file_name"])).convert("RGB")
        img, scale = letterbox(img, a.size)
        x = (np.asarray(img, dtype=np.float32) - mean) / std
        boxes, classes = [], []
        for an in coco["annotations"]:
            if an["image_id"] != im["id"]:
                continue
            bx, by, bw, bh = an["bbox"]
            boxes.append([by * scale, bx * scale, (by + bh) * scale, (bx + bw) * scale])
            classes.append(cls_of[an["category_id"]])
        samples.append((torch.tensor(x, dtype=torch.float32).permute(2, 0, 1), boxes, classes))

    config = get_efficientdet_config("tf_efficientdet_d0")
    config.backbone_args = dict(drop_path_rate=0.0)
    model = create_model_from_config(
        config,
        bench_task="train",
        bench_labeler=True,
        num_classes=len(cats),
        image_size=(a.size, a.size),
        pretrained=False,
        pretrained_backbone=False,
    )
    model.train()
    decay, no_decay = [], []
    for name, p in model.model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": a.weight_decay},
    ]
    if a.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=a.lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW(groups, lr=a.lr)

    def lr_at(step):
        warm = 10
        if step < warm:
            return a.lr / 10 + (a.lr - a.lr / 10) * step / warm
        t = (step - warm) / max(1, a.steps - warm)
        return 1e-5 + 0.5 * (a.lr - 1e-5) * (1 + math.cos(math.pi * t))

    order = []
    acc = np.zeros(3)
    for step in range(a.steps):
        if len(order) < a.batch:
            perm = list(range(len(samples)))
            random.shuffle(perm)
            order += perm
        idx, order = order[: a.batch], order[a.batch :]
        x = torch.stack([samples[i][0] for i in idx])
        n = max(len(samples[i][1]) for i in idx)
        bbox = torch.full((len(idx), n, 4), -1.0)
        cls = torch.full((len(idx), n), -1.0)
        for j, i in enumerate(idx):
            k = len(samples[i][1])
            if k:
                bbox[j, :k] = torch.tensor(samples[i][1])
                cls[j, :k] = torch.tensor(samples[i][2], dtype=torch.float32)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(x, {"bbox": bbox, "cls": cls})
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        acc += [out["loss"].item(), out["class_loss"].item(), out["box_loss"].item()]
        if (step + 1) % 50 == 0:
            acc /= 50
            print(
                f"update {step + 1}/{a.steps} | loss {acc[0]:.4f} (class {acc[1]:.4f}, "
                f"box {acc[2]:.5f}) | lr {lr_at(step):.2e}",
                flush=True,
            )
            acc[:] = 0


if __name__ == "__main__":
    main()
