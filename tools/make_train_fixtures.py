#!/usr/bin/env python3
"""Generate the fixtures for tests/train_loss.rs from effdet 0.4.1 (AnchorLabeler, DetectionLoss).

Usage (from the repository root, with a Python that has torch, numpy, safetensors and effdet):

    python tools/make_train_fixtures.py [OUT_DIR]

OUT_DIR defaults to tests/fixtures/train/. Files written:

- train_128.safetensors: the `tf_efficientdet_d0` config with image_size (128, 128) (levels
  16, 8, 4, 2, 1; 3069 anchors) and num_classes overridden to 8 so that the class logits and
  their gradients stay small. Two images with hand-placed ground truth (a well-matched box,
  overlapping boxes, tiny boxes that are only force-matched with IoU < 0.5, two boxes whose
  forced matches fall on the same anchor, duplicate boxes, a zero-size box, boxes partly or far
  outside the image so that every level has positives, padding rows with class -1). Keys:
    gt_boxes [2, G, 4] f32 (yxyx, padded with -1), gt_classes [2, G] f32 (1-based, -1 = padding)
    cls_out_{l} [2, A*K, H, W] f16, box_out_{l} [2, A*4, H, W] f16: seeded random head outputs
        (stored as f16; the f32 values effdet saw are exactly these f16 values widened)
    cls_target_{l} [2, H, W, A] i32, box_target_{l} [2, H, W, A*4] f32, num_positives [2] f32:
        effdet's `AnchorLabeler.batch_label_anchors` output
    losses [3] f32: (loss, class_loss, box_loss) of `DetectionLoss` (default: new focal loss)
    grad_cls_{l}, grad_box_{l} f32: d loss / d head outputs from torch autograd
    losses_legacy [3], grad_cls_1_legacy: the same with legacy_focal=True
    losses_smooth [3], grad_cls_1_smooth: the same with label_smoothing=0.1
    cls_target_1_ignore [2, H, W, A] i32: level-1 class targets with some entries set to -2
        (ignored), losses_ignore [3], grad_cls_1_ignore: the loss with those targets
- train_512.safetensors: the real D0 config (512x512, 49104 anchors), one image, one gt box.
    gt_boxes [1, 4] f32, gt_classes [1] f32, num_positives [1] f32,
    pos_index [P] i64 (flat anchor indices whose class target is not -1),
    pos_cls [P] i32, pos_box [P, 4] f32 (their targets)

Deterministic (fixed seed, 2 torch threads); re-running reproduces the same files.
"""
import os
import sys
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")

from safetensors.numpy import save_file  # noqa: E402
from effdet.anchors import Anchors, AnchorLabeler  # noqa: E402
from effdet.config import get_efficientdet_config  # noqa: E402
from effdet.loss import DetectionLoss  # noqa: E402

SEED = 20240611
NUM_CLASSES_128 = 8

# yxyx in network pixels; class -1 rows are padding (effdet's collate pads with -1).
GT_128 = [
    [
        ([21.0, 19.0, 53.0, 50.0], 3),     # close to a level-3 anchor (IoU >= 0.5)
        ([20.0, 24.0, 60.0, 70.0], 1),     # overlapping pair
        ([30.0, 30.0, 70.0, 80.0], 2),
        ([100.0, 100.0, 104.0, 103.0], 5),  # tiny: only force-matched, IoU < 0.5
        ([99.0, 99.0, 105.0, 105.0], 6),   # tiny, same best anchor as the previous one
        ([10.0, 5.0, 14.0, 120.0], 8),     # thin and long: forced match with IoU < 0.5
        ([-90.0, -100.0, 150.0, 170.0], 2),  # huge: level-6 anchors (2x2 map)
        ([-180.0, -200.0, 300.0, 330.0], 6),  # huger: the level-7 anchors (1x1 map)
        ([-1.0, -1.0, -1.0, -1.0], -1),   # padding
        ([-1.0, -1.0, -1.0, -1.0], -1),
    ],
    [
        ([0.0, 0.0, 128.0, 128.0], 4),     # whole image
        ([-10.0, 50.0, 40.0, 140.0], 7),   # partly outside the image
        ([64.0, 20.0, 96.0, 52.0], 2),     # centred on level-3 anchors: some codes exactly 0
        ([64.0, 20.0, 96.0, 52.0], 8),     # duplicate box, another class
        ([60.0, 60.0, 60.0, 60.0], 1),     # zero size: IoU 0 everywhere, forced onto anchor 0
        ([76.5, 90.25, 118.75, 111.0], 3),
        ([-1.0, -1.0, -1.0, -1.0], -1),   # padding
        ([-1.0, -1.0, -1.0, -1.0], -1),
        ([-1.0, -1.0, -1.0, -1.0], -1),
        ([-1.0, -1.0, -1.0, -1.0], -1),
    ],
]

GT_512 = ([100.0, 200.0, 180.0, 330.0], 17)


def make_config(image_size, num_classes=None):
    config = get_efficientdet_config("tf_efficientdet_d0")
    config.image_size = image_size
    if num_classes is not None:
        config.num_classes = num_classes
    return config


def run_loss(config, cls_np, box_np, cls_targets, box_targets, num_positives):
    """DetectionLoss forward + backward; returns (losses [3], cls grads, box grads)."""
    cls_outs = [torch.from_numpy(c.astype(np.float32)).requires_grad_(True) for c in cls_np]
    box_outs = [torch.from_numpy(b.astype(np.float32)).requires_grad_(True) for b in box_np]
    loss_fn = DetectionLoss(config)
    loss, class_loss, box_loss = loss_fn(cls_outs, box_outs, cls_targets, box_targets, num_positives)
    loss.backward()
    losses = np.array([loss.item(), class_loss.item(), box_loss.item()], dtype=np.float32)
    return (
        losses,
        [c.grad.numpy().astype(np.float32) for c in cls_outs],
        [b.grad.numpy().astype(np.float32) for b in box_outs],
    )


def fixtures_128():
    config = make_config((128, 128), NUM_CLASSES_128)
    anchors = Anchors.from_config(config)
    labeler = AnchorLabeler(anchors, config.num_classes, match_threshold=0.5)
    gt_boxes = torch.tensor([[b for b, _ in img] for img in GT_128], dtype=torch.float32)
    gt_classes = torch.tensor([[float(c) for _, c in img] for img in GT_128], dtype=torch.float32)
    cls_targets, box_targets, num_positives = labeler.batch_label_anchors(gt_boxes, gt_classes)

    rng = np.random.default_rng(SEED)
    a = anchors.get_anchors_per_location()
    k = config.num_classes
    cls_np, box_np = [], []
    for level in range(config.min_level, config.max_level + 1):
        h, w = anchors.feat_sizes[level]
        # Logits around -3 (scores spread, a few saturated); codes around the targets' scale so
        # both Huber regions (|err| < 0.1 and > 0.1) occur.
        cls = rng.normal(-3.0, 2.5, size=(2, a * k, h, w)).astype(np.float16)
        box = rng.normal(0.0, 0.25, size=(2, a * 4, h, w)).astype(np.float16)
        cls_np.append(cls)
        box_np.append(box)

    out = {
        "gt_boxes": gt_boxes.numpy(),
        "gt_classes": gt_classes.numpy(),
        "num_positives": num_positives.numpy().astype(np.float32),
    }
    for l in range(len(cls_np)):
        out[f"cls_out_{l}"] = cls_np[l]
        out[f"box_out_{l}"] = box_np[l]
        out[f"cls_target_{l}"] = cls_targets[l].numpy().astype(np.int32)
        out[f"box_target_{l}"] = box_targets[l].numpy().astype(np.float32)
        assert np.array_equal(out[f"cls_target_{l}"].astype(np.int64), cls_targets[l].numpy())

    losses, gcls, gbox = run_loss(config, cls_np, box_np, cls_targets, box_targets, num_positives)
    out["losses"] = losses
    for l in range(len(cls_np)):
        out[f"grad_cls_{l}"] = gcls[l]
        out[f"grad_box_{l}"] = gbox[l]

    legacy = make_config((128, 128), NUM_CLASSES_128)
    legacy.legacy_focal = True
    losses, gcls, _ = run_loss(legacy, cls_np, box_np, cls_targets, box_targets, num_positives)
    out["losses_legacy"] = losses
    out["grad_cls_1_legacy"] = gcls[1]

    smooth = make_config((128, 128), NUM_CLASSES_128)
    smooth.label_smoothing = 0.1
    losses, gcls, _ = run_loss(smooth, cls_np, box_np, cls_targets, box_targets, num_positives)
    out["losses_smooth"] = losses
    out["grad_cls_1_smooth"] = gcls[1]

    ignore_targets = [t.clone() for t in cls_targets]
    flat = ignore_targets[1].view(-1)
    flat[::7] = -2
    flat[flat.numel() // 2] = -2
    out["cls_target_1_ignore"] = ignore_targets[1].numpy().astype(np.int32)
    losses, gcls, _ = run_loss(config, cls_np, box_np, ignore_targets, box_targets, num_positives)
    out["losses_ignore"] = losses
    out["grad_cls_1_ignore"] = gcls[1]

    # Sanity: the fixture exercises what it claims to.
    npos = num_positives.numpy()
    assert npos[0] > 0 and npos[1] > 0, npos
    all_cls = torch.cat([t.reshape(2, -1) for t in cls_targets], dim=1)
    for i in range(2):
        assert set(all_cls[i].unique().tolist()) <= set(range(-1, NUM_CLASSES_128)), all_cls[i].unique()
    all_box = torch.cat([t.reshape(2, -1, 4) for t in box_targets], dim=1)
    pos = all_cls >= 0
    assert ((all_box[pos] == 0).sum() > 0), "expected some positive box codes to be exactly 0"
    for l in range(len(cls_targets)):
        assert (cls_targets[l] >= 0).sum() > 0, f"no positives at level index {l}"
    # Image 1: the zero-size box is force-matched onto anchor 0 with class 0 (1-based 1).
    assert all_cls[1, 0].item() == 0, all_cls[1, :3]
    return out


def fixtures_512():
    config = make_config((512, 512))
    anchors = Anchors.from_config(config)
    labeler = AnchorLabeler(anchors, config.num_classes, match_threshold=0.5)
    box, cls = GT_512
    gt_boxes = torch.tensor([box], dtype=torch.float32)
    gt_classes = torch.tensor([float(cls)], dtype=torch.float32)
    cls_targets, box_targets, num_positives = labeler.label_anchors(gt_boxes, gt_classes)
    all_cls = torch.cat([t.reshape(-1) for t in cls_targets])
    all_box = torch.cat([t.reshape(-1, 4) for t in box_targets])
    assert all_cls.numel() == 49104
    pos_index = torch.nonzero(all_cls != -1).flatten()
    assert len(pos_index) == int(num_positives.item())
    assert bool((all_box[all_cls == -1] == 0).all())
    return {
        "gt_boxes": gt_boxes.numpy(),
        "gt_classes": gt_classes.numpy(),
        "num_positives": np.array([num_positives.item()], dtype=np.float32),
        "pos_index": pos_index.numpy().astype(np.int64),
        "pos_cls": all_cls[pos_index].numpy().astype(np.int32),
        "pos_box": all_box[pos_index].numpy().astype(np.float32),
    }


def main():
    torch.set_num_threads(2)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests", "fixtures", "train")
    os.makedirs(out_dir, exist_ok=True)
    f128 = fixtures_128()
    save_file({k: np.ascontiguousarray(v) for k, v in f128.items()}, os.path.join(out_dir, "train_128.safetensors"))
    f512 = fixtures_512()
    save_file({k: np.ascontiguousarray(v) for k, v in f512.items()}, os.path.join(out_dir, "train_512.safetensors"))
    print("num_positives 128:", f128["num_positives"], "losses:", f128["losses"])
    print("legacy:", f128["losses_legacy"], "smooth:", f128["losses_smooth"], "ignore:", f128["losses_ignore"])
    print("512: num_positives", f512["num_positives"], "positives", f512["pos_index"].tolist())
    total = 0
    for name in ("train_128.safetensors", "train_512.safetensors"):
        size = os.path.getsize(os.path.join(out_dir, name))
        total += size
        print(f"{name}: {size} bytes")
    assert total < 1_000_000, total


if __name__ == "__main__":
    main()
