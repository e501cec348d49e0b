#!/usr/bin/env python3
"""COCO bbox evaluation fixtures for tests/eval.rs, computed by pycocotools' COCOeval.

    python3 tools/make_eval_fixtures.py                  # writes tests/fixtures/eval/
    python3 tools/make_eval_fixtures.py --out /tmp/eval  # elsewhere

Each case is a folder with `gt.json` (COCO instances: images, annotations, categories),
`dets.json` (COCO results: a JSON array of {image_id, category_id, bbox, score}) and
`expected.json`: pycocotools' 12 `COCOeval.stats` (iouType='bbox', default parameters) as
`stats` (in `names` order) and the 12 lines `summarize()` prints as `summary`. `meta.json` at the
top records the versions, numpy's IoU and recall thresholds, and what each case covers.

Cases (all seeded, deterministic: rerunning reproduces the files byte for byte):

- `mixed`: 14 images (ids unsorted in the file, three without ground truth), 5 categories with
  non-contiguous ids (one with no ground truth at all, one with ground truth but no detection),
  tiny / small / medium / large objects, crowd regions, segmentation-like `area` values that
  differ from w * h, jittered true positives, duplicates, score ties, false positives,
  detections of categories absent from their image, a detection of a category that is not in
  `categories` (left out), scores at full float precision.
- `perfect`: the detections are the non-crowd ground truth boxes (AP 1.0).
- `crowd`: many detections inside, across and around crowd regions that overlap ordinary ground
  truth (the crowd-IoU rule, the "stop at the first ignored ground truth" rule, several
  detections absorbed by one crowd), and an `"ignore": true` annotation (which pycocotools
  overwrites with iscrowd, so it counts as ordinary ground truth).
- `many`: images with 100-260 detections of one category, scores on a 0.01 grid so ties fall on
  the 1 / 10 / 100 cuts (stable order decides), plus ties across images.
- `edge`: hand-made boxes: IoU exactly 0.5, 0.75 and 0.95 (matches at `>=`), areas exactly
  32^2 and 96^2 (in both neighbouring ranges), zero-size detections and ground truth, touching
  boxes, an annotation with id 0 (pycocotools counts a detection matched to it as a false
  positive), ground truth of a category not in `categories` (left out), annotations without
  `area` (pycocotools needs it; the Rust evaluator uses w * h, which is what this script gives
  pycocotools for them).
- `no_detections`: an empty results array. pycocotools' `loadRes` crashes on `[]`, so the
  expected stats come from an empty results COCO object built directly (AP 0 where there is
  ground truth, -1 elsewhere).
"""

import argparse
import contextlib
import copy
import importlib.metadata
import io
import json
import random
import sys
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
CATEGORIES = [
    {"id": 1, "name": "person"},
    {"id": 3, "name": "car"},
    {"id": 7, "name": "train"},
    {"id": 18, "name": "dog"},
    {"id": 90, "name": "toothbrush"},
]


def dumps_list(items):
    """A JSON array with one element per line (readable diffs, small files)."""
    if not items:
        return "[]"
    return "[\n" + ",\n".join(json.dumps(x, separators=(",", ":")) for x in items) + "\n]"


def dumps_gt(gt):
    parts = [f'"{k}":{dumps_list(gt[k])}' for k in ("images", "annotations", "categories")]
    return "{" + ",\n".join(parts) + "}\n"


def r2(v):
    return round(v, 2)


class GtBuilder:
    def __init__(self, images):
        self.images = [
            {"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in images
        ]
        self.annotations = []
        self.next_id = 1

    def add(self, image_id, category_id, bbox, area=None, iscrowd=0, **extra):
        a = {"id": self.next_id, "image_id": image_id, "category_id": category_id,
             "bbox": [r2(v) for v in bbox], "iscrowd": iscrowd}
        if area is not None:
            a["area"] = area
        a.update(extra)
        self.annotations.append(a)
        self.next_id += 1
        return a

    def file(self, categories=CATEGORIES):
        return {"images": self.images, "annotations": self.annotations,
                "categories": categories}


def random_box(rng, size):
    """A box of a size class inside 640x480: tiny, small, medium or large."""
    lo, hi = {"tiny": (2, 12), "small": (8, 31), "medium": (33, 95), "large": (97, 400)}[size]
    w, h = rng.uniform(lo, hi), rng.uniform(lo, hi)
    x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
    return [x, y, w, h]


def jitter(rng, box, amount):
    x, y, w, h = box
    return [x + rng.gauss(0, amount * w), y + rng.gauss(0, amount * h),
            max(0.0, w * (1 + rng.gauss(0, amount))), max(0.0, h * (1 + rng.gauss(0, amount)))]


def case_mixed():
    rng = random.Random(1)
    images = [42, 7, 3, 100, 15, 8, 23, 4, 16, 5, 77, 9, 12, 31]
    no_gt = {100, 9, 31}
    gt = GtBuilder(images)
    dets = []
    for im in images:
        if im in no_gt:
            continue
        for _ in range(rng.randint(1, 7)):
            cat = rng.choice([1, 1, 3, 7, 18])
            size = rng.choice(["tiny", "small", "medium", "medium", "large"])
            box = random_box(rng, size)
            crowd = 1 if rng.random() < 0.08 else 0
            seg_area = r2(box[2] * box[3] * rng.uniform(0.55, 1.0))
            gt.add(im, cat, box, area=seg_area, iscrowd=crowd)
    for a in gt.annotations:
        if a["category_id"] == 18:
            continue  # a category with ground truth but no detection
        for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
            d = {"image_id": a["image_id"], "category_id": a["category_id"],
                 "bbox": jitter(rng, a["bbox"], rng.choice([0.02, 0.05, 0.1, 0.3])),
                 "score": rng.random()}
            dets.append(d)
            if rng.random() < 0.1:
                dets.append(copy.deepcopy(d))  # exact duplicate
    # Score ties, within and across images.
    for d in rng.sample(dets, 12):
        d["score"] = 0.5
    # False positives, including categories absent from the image and images without ground
    # truth; category 90 has no ground truth anywhere.
    for _ in range(40):
        dets.append({"image_id": rng.choice(images), "category_id": rng.choice([1, 3, 7, 90]),
                     "bbox": random_box(rng, rng.choice(["tiny", "small", "medium", "large"])),
                     "score": rng.random() * 0.6})
    # A category that is not in `categories`: pycocotools leaves it out.
    dets.append({"image_id": 42, "category_id": 5, "bbox": [10, 10, 50, 50], "score": 0.99})
    rng.shuffle(dets)
    return gt.file(), dets


def case_perfect():
    rng = random.Random(2)
    images = [1, 2, 3, 4, 5, 6]
    gt = GtBuilder(images)
    for im in images:
        for _ in range(rng.randint(0, 5)):
            box = random_box(rng, rng.choice(["tiny", "small", "medium", "large"]))
            gt.add(im, rng.choice([1, 3, 7]), box, area=r2(box[2] * box[3] * 0.8),
                   iscrowd=1 if rng.random() < 0.1 else 0)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": round(rng.random(), 3)}
            for a in gt.annotations if not a["iscrowd"]]
    return gt.file(), dets


def case_crowd():
    rng = random.Random(3)
    images = [1, 2, 3]
    gt = GtBuilder(images)
    dets = []
    for im in images:
        crowd = gt.add(im, 1, [100, 100, 300, 200], area=40000.0, iscrowd=1)
        # Ordinary ground truth inside and overlapping the crowd region.
        for _ in range(4):
            box = [rng.uniform(80, 350), rng.uniform(80, 250), rng.uniform(20, 90),
                   rng.uniform(20, 90)]
            gt.add(im, 1, box, area=r2(box[2] * box[3]))
        gt.add(im, 3, [rng.uniform(0, 300), rng.uniform(0, 200), 120, 80], area=7000.0,
               iscrowd=1)
        # pycocotools overwrites `ignore` with `iscrowd`: this counts as ordinary ground truth.
        gt.add(im, 3, [400, 300, 60, 50], area=3000.0, ignore=True)
        for a in gt.annotations:
            if a["image_id"] != im:
                continue
            for _ in range(rng.randint(1, 4)):
                dets.append({"image_id": im, "category_id": a["category_id"],
                             "bbox": jitter(rng, a["bbox"], 0.15),
                             "score": round(rng.random(), 2)})
        x, y, w, h = crowd["bbox"]
        for _ in range(15):  # small detections inside or across the crowd region
            bw, bh = rng.uniform(5, 60), rng.uniform(5, 60)
            dets.append({"image_id": im, "category_id": 1,
                         "bbox": [rng.uniform(x - 30, x + w), rng.uniform(y - 30, y + h), bw, bh],
                         "score": round(rng.random(), 2)})
    return gt.file(), [{**d, "bbox": [r2(v) for v in d["bbox"]]} for d in dets]


def case_many():
    rng = random.Random(4)
    images = [10, 20, 30, 40]
    gt = GtBuilder(images)
    dets = []
    for im, n_det in zip(images, [260, 150, 101, 30]):
        for _ in range(rng.randint(3, 12)):
            box = random_box(rng, rng.choice(["small", "medium", "large"]))
            gt.add(im, 1, box, area=r2(box[2] * box[3]))
        gts = [a for a in gt.annotations if a["image_id"] == im]
        for _ in range(n_det):
            if rng.random() < 0.3:
                box = jitter(rng, rng.choice(gts)["bbox"], 0.08)
            else:
                box = random_box(rng, rng.choice(["small", "medium", "large"]))
            dets.append({"image_id": im, "category_id": 1, "bbox": [r2(v) for v in box],
                         "score": rng.randint(0, 99) / 100})
        # A second category with a handful of ground truth and detections.
        box = random_box(rng, "medium")
        gt.add(im, 3, box, area=r2(box[2] * box[3]))
        dets.append({"image_id": im, "category_id": 3, "bbox": [r2(v) for v in box],
                     "score": 0.5})
    rng.shuffle(dets)
    return gt.file(), dets


def case_edge():
    images = [1, 2, 3, 4]
    gt = GtBuilder(images)
    # IoU exactly 0.5, 0.75 and 0.95 with a 100x100 ground truth.
    gt.add(1, 1, [0, 0, 100, 100], area=10000.0)
    gt.add(1, 1, [200, 0, 100, 100], area=10000.0)
    gt.add(1, 1, [0, 200, 100, 100], area=10000.0)
    # Areas exactly on the range bounds (each in both neighbouring ranges).
    gt.add(2, 1, [0, 0, 32, 32], area=1024.0)
    gt.add(2, 1, [100, 0, 96, 96], area=9216.0)
    gt.add(2, 3, [300, 300, 40, 40])  # no `area`: w * h
    gt.add(2, 3, [400, 300, 10, 10])  # no `area`: w * h
    # Zero-size ground truth, and a category that is not in `categories`.
    gt.add(3, 1, [50, 50, 0, 10], area=0.0)
    gt.add(3, 5, [0, 0, 50, 50], area=2500.0)
    gt.add(3, 3, [10, 10, 20, 20], area=400.0)
    # An annotation with id 0: pycocotools stores matches as the matched id and tests it for
    # truthiness, so a detection matched to it is a false positive.
    zero = gt.add(4, 7, [10, 10, 50, 50], area=2500.0)
    zero["id"] = 0
    gt.add(4, 7, [300, 10, 50, 50], area=2500.0)
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 200], "score": 0.9},  # IoU 0.5
        {"image_id": 1, "category_id": 1, "bbox": [200, 0, 75, 100], "score": 0.8},  # IoU 0.75
        {"image_id": 1, "category_id": 1, "bbox": [0, 200, 95, 100], "score": 0.7},  # IoU 0.95
        {"image_id": 1, "category_id": 1, "bbox": [100, 0, 50, 50], "score": 0.6},  # touching
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 32, 32], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [100, 0, 96, 96], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [500, 400, 0, 0], "score": 0.95},  # empty
        {"image_id": 2, "category_id": 3, "bbox": [300, 300, 40, 40], "score": 0.4},
        {"image_id": 2, "category_id": 3, "bbox": [401, 301, 10, 10], "score": 0.4},
        {"image_id": 3, "category_id": 1, "bbox": [50, 50, 0, 10], "score": 0.5},  # zero width
        {"image_id": 3, "category_id": 5, "bbox": [0, 0, 50, 50], "score": 0.5},
        {"image_id": 3, "category_id": 3, "bbox": [10, 10, 20, 20], "score": 0.3},
        {"image_id": 3, "category_id": 3, "bbox": [10, 10, 20, 20], "score": 0.3},  # duplicate
        {"image_id": 4, "category_id": 7, "bbox": [10, 10, 50, 50], "score": 0.9},  # id 0
        {"image_id": 4, "category_id": 7, "bbox": [300, 10, 50, 50], "score": 0.8},
        {"image_id": 4, "category_id": 7, "bbox": [300, 12, 50, 50], "score": 0.85},
    ]
    return gt.file(), dets


def case_no_detections():
    gt, _ = case_perfect()
    return gt, []


def evaluate(gt_file, dets):
    """pycocotools' stats and printed summary for one case."""
    gt_file = copy.deepcopy(gt_file)
    for a in gt_file["annotations"]:
        # The Rust evaluator's documented fallback; pycocotools itself needs `area`.
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_gt = COCO()
        coco_gt.dataset = gt_file
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        else:  # loadRes crashes on an empty list
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(gt_file["images"]), "annotations": [],
                               "categories": copy.deepcopy(gt_file["categories"])}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        out.truncate(0)
        out.seek(0)
        ev.summarize()
    summary = [line for line in out.getvalue().splitlines() if line.startswith(" Average")]
    assert len(summary) == 12, out.getvalue()
    return [float(s) for s in ev.stats], summary


CASES = {
    "mixed": case_mixed,
    "perfect": case_perfect,
    "crowd": case_crowd,
    "many": case_many,
    "edge": case_edge,
    "no_detections": case_no_detections,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent.parent / "tests/fixtures/eval")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    p = COCOeval(iouType="bbox").params
    meta = {
        "pycocotools": importlib.metadata.version("pycocotools"),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "iou_thrs": [float(v) for v in p.iouThrs],
        "rec_thrs": [float(v) for v in p.recThrs],
        "cases": {},
    }
    for name, make in CASES.items():
        gt, dets = make()
        stats, summary = evaluate(gt, dets)
        d = args.out / name
        d.mkdir(exist_ok=True)
        (d / "gt.json").write_text(dumps_gt(gt))
        (d / "dets.json").write_text(dumps_list(dets) + "\n")
        (d / "expected.json").write_text(
            json.dumps({"names": NAMES, "stats": stats, "summary": summary}, indent=1) + "\n")
        meta["cases"][name] = {"images": len(gt["images"]), "annotations": len(gt["annotations"]),
                               "detections": len(dets), "stats": dict(zip(NAMES, stats))}
        print(f"{name:14s} {len(gt['annotations']):4d} gt {len(dets):5d} dets  "
              + " ".join(f"{v:.4f}" for v in stats))
    # Sanity checks on what the cases are meant to cover.
    assert meta["cases"]["perfect"]["stats"]["AP"] == 1.0
    assert meta["cases"]["perfect"]["stats"]["APm"] == -1.0  # no medium ground truth
    assert all(v in (0.0, -1.0) for v in meta["cases"]["no_detections"]["stats"].values())
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
