#!/usr/bin/env python3
"""Generate the golden fixtures for tests/postprocess.rs from effdet 0.4.1 and torchvision.

Usage (from the repository root, with a Python that has torch, torchvision and effdet):

    python tools/make_postprocess_fixtures.py [OUT_DIR]

OUT_DIR defaults to tests/fixtures/postprocess/. Files written:

- anchors_100x150.bin: effdet `Anchors(3, 7, 3, D0 aspects, 4.0, (100, 150)).boxes` as raw
  little-endian f32 `[ymin, xmin, ymax, xmax]` rows (an image size not divisible by the strides,
  so numpy's float `arange` rule matters).
- nms.json: random clustered boxes (some with negative coordinates) in several classes, and the
  keep lists of torchvision `nms` / `batched_nms` (both CPU dispatch paths) and effdet
  `batched_soft_nms`.
- e2e.json: effdet `_post_process` + `_batch_detection` on synthetic head outputs for a 128x128
  input (levels 16, 8, 4, 2, 1), hard and soft NMS, with and without img_info. The head outputs
  are not stored: they come from a tiny integer hash that tests/postprocess.rs reimplements
  bit-exactly (`synthetic_level_outputs`), and a few sample values are stored to check that.

Everything is deterministic (fixed seeds); re-running reproduces the same files.
"""
import json
import math
import os
import sys
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")

import torchvision  # noqa: E402
from torchvision.ops import boxes as tv_boxes  # noqa: E402
from effdet.anchors import Anchors, generate_detections  # noqa: E402
from effdet.bench import _post_process, _batch_detection  # noqa: E402
from effdet.soft_nms import batched_soft_nms  # noqa: E402

ASPECTS = [(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]
MASK24 = 0xFFFFFF
CLASS_SEED = 12345
BOX_SEED = 777777


def f(x):
    """An f32 value as the Python float holding it exactly (JSON round-trips it)."""
    return float(np.float32(x))


# ----------------------------------------------------------------------------------------------
# Synthetic head outputs (mirrored bit-exactly in tests/postprocess.rs)
# ----------------------------------------------------------------------------------------------
def perm24(x):
    """A bijection on [0, 2^24): odd multiplications and xor-shifts modulo 2^24."""
    x = x.astype(np.uint64) & MASK24
    x = (x * np.uint64(0x9E3B5)) & MASK24
    x ^= x >> np.uint64(12)
    x = (x * np.uint64(0xC2B2AF)) & MASK24
    x ^= x >> np.uint64(11)
    x = (x * np.uint64(0x2C1B3D)) & MASK24
    x ^= x >> np.uint64(13)
    return x


def unit(idx, seed):
    """u = perm24((idx + seed) mod 2^24) / 2^24, exact in f32, distinct for distinct idx."""
    p = perm24((idx.astype(np.uint64) + np.uint64(seed)) & MASK24)
    return p.astype(np.float32) * np.float32(2.0 ** -24)


# Synthetic "objects": (0-based class, x0, y0, x1, y1) in network pixels. Logits of that class
# at anchors whose centre lies in [x0, x1) x [y0, y1) get OBJECT_BONUS added (once per object),
# so same-class candidates cluster spatially and NMS has real work to do.
OBJECTS = [(0, 10, 10, 60, 50), (0, 40, 30, 100, 90), (2, 60, 0, 128, 40), (5, 0, 60, 70, 128),
           (17, 20, 20, 110, 110), (5, 50, 70, 90, 110), (44, 0, 0, 128, 128)]
OBJECT_BONUS = 7.0


def synthetic_levels(feat_sizes, strides, num_anchors, num_classes):
    """Per level (class [A*K, H, W], boxes [A*4, H, W]) f32 arrays.

    class logit: x = 1 - u (exact), s = sqrt(sqrt(x)) (f32, correctly rounded), logit = 0 - 20 * s
    (heavy upper tail: the top few thousand spread over about [-7, 0]), plus OBJECT_BONUS for
    each object of the element's class containing the anchor centre ((2 * col + 1) * stride / 2).
    box code for channel ch (= anchor * 4 + j): (u - 0.5) * 0.25 for j in {0, 1} (ty, tx),
    (u - 0.5) * 0.5 for j in {2, 3} (th, tw). Every step is an exactly rounded f32 operation.
    """
    cls_base = 0
    box_base = 0
    out = []
    for (h, w), stride in zip(feat_sizes, strides):
        n_cls = num_anchors * num_classes * h * w
        u = unit(np.arange(cls_base, cls_base + n_cls), CLASS_SEED)
        x = (np.float32(1.0) - u).astype(np.float32)
        s = np.sqrt(np.sqrt(x)).astype(np.float32)
        logits = (np.float32(0.0) - (np.float32(20.0) * s).astype(np.float32)).astype(np.float32)
        p = np.arange(n_cls)
        cls_idx = (p // (h * w)) % num_classes
        col2 = (2 * (p % w) + 1) * stride  # twice the anchor centre
        row2 = (2 * ((p // w) % h) + 1) * stride
        for (oc, x0, y0, x1, y1) in OBJECTS:
            inside = ((cls_idx == oc) & (col2 >= 2 * x0) & (col2 < 2 * x1)
                      & (row2 >= 2 * y0) & (row2 < 2 * y1))
            logits = np.where(inside, (logits + np.float32(OBJECT_BONUS)).astype(np.float32),
                              logits).astype(np.float32)
        cls = logits.reshape(num_anchors * num_classes, h, w)
        cls_base += n_cls

        n_box = num_anchors * 4 * h * w
        u = unit(np.arange(box_base, box_base + n_box), BOX_SEED)
        centred = (u - np.float32(0.5)).astype(np.float32)
        chan = (np.arange(n_box) // (h * w)) % 4
        scale = np.where(chan < 2, np.float32(0.25), np.float32(0.5)).astype(np.float32)
        codes = (centred * scale).astype(np.float32).reshape(num_anchors * 4, h, w)
        box_base += n_box
        out.append((cls, codes))
    return out


# ----------------------------------------------------------------------------------------------
# Anchors
# ----------------------------------------------------------------------------------------------
def make_anchors(out_dir):
    a = Anchors(3, 7, 3, ASPECTS, 4.0, (100, 150))
    boxes = a.boxes.numpy().astype("<f4")
    boxes.tofile(os.path.join(out_dir, "anchors_100x150.bin"))
    d0 = Anchors(3, 7, 3, ASPECTS, 4.0, (512, 512)).boxes.numpy().astype("<f4")
    # FNV-1a 64 of the raw bytes, for the Rust test's hard-coded checksum.
    h = 0xCBF29CE484222325
    for byte in d0.tobytes():
        h ^= byte
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    print("D0 anchors:", d0.shape[0], "fnv1a64 = 0x%016x" % h)
    for i in [0, 1, 2, 4, 8, 9, 1000, 36863, 36864, 45000, 49103]:
        print("  anchor", i, [repr(float(v)) for v in d0[i]])
    print("100x150:", boxes.shape[0], "anchors; feat sizes", a.feat_sizes[3:])


# ----------------------------------------------------------------------------------------------
# NMS
# ----------------------------------------------------------------------------------------------
def clustered_boxes(gen, n, num_classes):
    """Boxes in clusters (so IoUs spread around the thresholds), coordinates multiples of 1/8,
    some negative; distinct scores."""
    boxes = []
    n_clusters = n // 12
    centres = torch.rand(n_clusters, 2, generator=gen) * 300 - 20
    sizes = torch.rand(n_clusters, 2, generator=gen) * 60 + 8
    assign = torch.randint(0, n_clusters, (n,), generator=gen)
    jitter = torch.randn(n, 4, generator=gen) * 0.15
    c = centres[assign]
    s = sizes[assign]
    x1 = c[:, 0] - s[:, 0] / 2 + jitter[:, 0] * s[:, 0]
    y1 = c[:, 1] - s[:, 1] / 2 + jitter[:, 1] * s[:, 1]
    x2 = c[:, 0] + s[:, 0] / 2 + jitter[:, 2] * s[:, 0]
    y2 = c[:, 1] + s[:, 1] / 2 + jitter[:, 3] * s[:, 1]
    boxes = torch.stack([x1, y1, torch.maximum(x2, x1 + 1), torch.maximum(y2, y1 + 1)], 1)
    boxes = torch.round(boxes * 8) / 8
    # Classes mostly follow the cluster (so same-class overlaps are common), some random.
    classes = assign % num_classes
    flip = torch.rand(n, generator=gen) < 0.2
    classes[flip] = torch.randint(0, num_classes, (int(flip.sum()),), generator=gen)
    while True:
        scores = torch.rand(n, generator=gen)
        if len(torch.unique(scores)) == n:
            break
    return boxes.float(), scores.float(), classes.long()


def make_nms(out_dir):
    gen = torch.Generator().manual_seed(20240607)
    n = 1200
    boxes, scores, classes = clustered_boxes(gen, n, 6)
    small = 500
    b5, s5, c5 = boxes[:small], scores[:small], classes[:small]

    cases = []

    def add(name, kind, count, keep, **extra):
        case = {"name": name, "kind": kind, "count": count, "keep": [int(i) for i in keep]}
        case.update(extra)
        cases.append(case)

    # batched_nms on CPU: > 4000 coordinates -> per-class ("vanilla") path.
    for thr in (0.5, 0.3):
        keep = torchvision.ops.batched_nms(boxes, scores, classes, thr)
        assert torch.equal(keep, tv_boxes._batched_nms_vanilla(boxes, scores, classes, thr))
        add("batched_nms_vanilla_%g" % thr, "hard", n, keep, iou_threshold=thr)
    # <= 4000 coordinates -> coordinate-offset trick.
    for thr in (0.5, 0.7):
        keep = torchvision.ops.batched_nms(b5, s5, c5, thr)
        assert torch.equal(keep, tv_boxes._batched_nms_coordinate_trick(b5, s5, c5, thr))
        add("batched_nms_offset_%g" % thr, "hard_offset", small, keep, iou_threshold=thr)
    # The per-class path forced on the small set, and class-agnostic nms.
    keep = tv_boxes._batched_nms_vanilla(b5, s5, c5, 0.5)
    add("batched_nms_vanilla_small_0.5", "hard", small, keep, iou_threshold=0.5)
    keep = torchvision.ops.nms(b5, s5, 0.6)
    add("nms_single_0.6", "single", small, keep, iou_threshold=0.6)
    # effdet's Gaussian soft-NMS.
    for (cnt, sigma, min_score) in ((n, 0.5, 0.001), (small, 0.3, 0.05)):
        idx, sc = batched_soft_nms(
            boxes[:cnt], scores[:cnt], classes[:cnt], method_gaussian=True, sigma=sigma,
            iou_threshold=0.3, score_threshold=min_score)
        add("soft_nms_%d_sigma%g_min%g" % (cnt, sigma, min_score), "soft", cnt, idx,
            sigma=sigma, min_score=min_score, scores=[f(x) for x in sc.tolist()])

    data = {
        "generator": "tools/make_postprocess_fixtures.py (torch %s, torchvision %s)"
        % (torch.__version__, torchvision.__version__),
        "boxes": [[float(v) for v in b] for b in boxes.tolist()],
        "scores": [f(x) for x in scores.tolist()],
        "classes": [int(c) for c in classes.tolist()],
        "cases": cases,
    }
    with open(os.path.join(out_dir, "nms.json"), "w") as fh:
        json.dump(data, fh, separators=(",", ":"))
    for c in cases:
        print("nms case", c["name"], "kept", len(c["keep"]), "of", c["count"])


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------
def make_e2e(out_dir):
    image_size = (128, 128)
    num_classes = 90
    anchors = Anchors(3, 7, 3, ASPECTS, 4.0, image_size)
    feat_sizes = anchors.feat_sizes[3:8]
    strides = [image_size[1] // w for (_, w) in feat_sizes]
    levels = synthetic_levels(feat_sizes, strides, 9, num_classes)
    cls_out = [torch.from_numpy(c).unsqueeze(0) for c, _ in levels]
    box_out = [torch.from_numpy(b).unsqueeze(0) for _, b in levels]

    all_logits = np.concatenate([c.transpose(1, 2, 0).reshape(-1) for c, _ in levels])
    top = np.sort(all_logits)[::-1][:5001]
    assert len(np.unique(top)) == len(top), "tied logits in the top-k: change the generator"

    img_scale = 150.0 / 128.0
    info = {"img_scale": img_scale, "orig_width": 150.0, "orig_height": 100.0}
    cases = []
    topk_indices = None
    for (name, soft, use_info, mdp) in (
        ("hard_info", False, True, 5000),
        ("soft_info", True, True, 5000),
        ("hard_noinfo", False, False, 5000),
        ("soft_noinfo", True, False, 5000),
        ("hard_info_offset_path", False, True, 800),
        ("soft_info_50_points", True, True, 50),
    ):
        c_k, b_k, idx, cls = _post_process(cls_out, box_out, num_levels=5,
                                           num_classes=num_classes, max_detection_points=mdp)
        if mdp == 5000:
            flat = (idx * num_classes + cls)[0]
            topk_indices = flat.tolist() if topk_indices is None else topk_indices
        if use_info:
            s = torch.tensor([img_scale], dtype=torch.float32)
            sz = torch.tensor([[150.0, 100.0]], dtype=torch.float32)
        else:
            s, sz = None, None
        det = _batch_detection(1, c_k, b_k, anchors.boxes, idx, cls, s, sz,
                               max_det_per_image=100, soft_nms=soft)
        ref = generate_detections(c_k[0], b_k[0], anchors.boxes, idx[0], cls[0],
                                  None if s is None else s[0], None if sz is None else sz[0],
                                  max_det_per_image=100, soft_nms=soft)
        assert torch.equal(det[0], ref), "scripted and eager generate_detections differ"
        det = det[0]
        det = det[det[:, 5] > 0]  # drop effdet's zero padding rows (real classes are >= 1)
        sc = det[:, 4]
        assert len(torch.unique(sc)) == len(sc), "tied scores among detections"
        cand = torch.sigmoid(c_k[0, :, 0])
        if not soft:
            assert len(torch.unique(cand)) == len(cand), "tied candidate scores"
        cases.append({
            "name": name,
            "nms": "soft" if soft else "hard",
            "max_detection_points": mdp,
            "img_info": info if use_info else None,
            "detections": [[f(v) for v in row[:5]] + [int(row[5])] for row in det.tolist()],
        })
        print("e2e case", name, len(det), "detections; score range",
              float(sc.min()), float(sc.max()))

    samples = []
    for li, (c, b) in enumerate(levels):
        flat_c = c.reshape(-1)
        flat_b = b.reshape(-1)
        for p in (0, 1, len(flat_c) // 2, len(flat_c) - 1):
            samples.append({"level": li, "tensor": "class", "index": p, "value": f(flat_c[p])})
        for p in (0, 5, len(flat_b) - 1):
            samples.append({"level": li, "tensor": "boxes", "index": p, "value": f(flat_b[p])})
    data = {
        "generator": "tools/make_postprocess_fixtures.py (torch %s, torchvision %s)"
        % (torch.__version__, torchvision.__version__),
        "image_size": list(image_size),
        "num_classes": num_classes,
        "feat_sizes": [list(s) for s in feat_sizes],
        "input_samples": samples,
        "topk_flat_indices": topk_indices,
        "cases": cases,
    }
    with open(os.path.join(out_dir, "e2e.json"), "w") as fh:
        json.dump(data, fh, separators=(",", ":"))


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        root, "tests", "fixtures", "postprocess")
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(1)
    make_anchors(out_dir)
    make_nms(out_dir)
    make_e2e(out_dir)
    for name in sorted(os.listdir(out_dir)):
        print("%-24s %8d bytes" % (name, os.path.getsize(os.path.join(out_dir, name))))


if __name__ == "__main__":
    main()
