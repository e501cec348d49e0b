#!/usr/bin/env python3
"""Golden fixtures for one EfficientDet-D0 training step (effdet 0.4.1 `DetBenchTrain`).

Usage (from the repository root, with the packages of tools/requirements.txt):

    python3 tools/make_train_step_fixtures.py [--out tests/fixtures/train_step]

Inputs (all committed): tests/fixtures/golden/weights_f16.safetensors (the golden D0 model,
effdet state_dict key names, f16 values loaded as f32) and tests/fixtures/golden/img0.png
(640x480), img1.png (333x500).

What it computes, exactly as effdet's training pipeline would for a batch of these two images:

  * annotations: the COCO file written here (annotations.json) is parsed like effdet's
    CocoParser (xywh -> yxyx float32, `ignore` and w<1 / h<1 skipped, iscrowd boxes go to
    bbox_ignore and are NOT training targets, class = category_id since the tf_ models use
    cat_ids_as_labels), then effdet's own `transforms_coco_eval` (ResizePad letterbox to 512:
    boxes *= scale in float32, clipped to [0, scaled_h] x [0, scaled_w], boxes without
    y0 < y1 and x0 < x1 dropped) and `DetectionFastCollate` (targets padded with -1 to
    MAX_NUM_INSTANCES rows, float32), then PrefetchLoader normalisation;
  * `DetBenchTrain(model, create_labeler=True)` in train() mode: training-mode BN (batch
    statistics; running statistics updated once, with each module's own momentum), drop-path
    disabled (drop_prob = 0 on every timm DropPath; there is no other stochastic op: asserted by
    checking that a forward of a deep copy and the real forward give bit-identical losses),
    AnchorLabeler targets, DetectionLoss;
  * loss.backward() once.

Files written (into --out):

  annotations.json         COCO annotations for img0.png / img1.png (what the Rust CLI reads).
  meta.json                versions, images, effdet-space targets, losses, num_positives, the
                           loss config, BN (momentum, eps), and for EVERY parameter: shape, grad
                           L2 norm, grad sum, projection sum_i g[i] * r(i) (float64,
                           r(i) = ((i * 2654435761) mod 2^32) / 2^32 - 0.5 over the flat index),
                           whether the full gradient is stored; plus the same norm / projection
                           from a float64 run of the same step, torch's own float32 gradient error
                           against it, and the list of structurally zero gradients (float32 noise).
  grads.safetensors        f32 full gradients for a subset covering every kind of parameter
                           (all tensors with <= SMALL_NUMEL elements, plus the whole modules in
                           EXPLICIT_PREFIXES); key = parameter name.
  running_stats.safetensors  f32 running_mean / running_var of every BN after the step
                           (key = BN prefix + '.running_mean' / '.running_var').

Deterministic (2 torch threads, deterministic algorithms, no RNG used): re-running gives
byte-identical files. Asserts its checks before writing. About 10 s on 2 idle cores (the float64
reference step is about half of it).
"""
import argparse
import copy
import importlib.metadata
import json
import math
import os
import re
import sys
import time
import warnings

import numpy as np
import torch
import PIL
from PIL import Image

warnings.filterwarnings('ignore', category=FutureWarning)  # torch.jit.script deprecation inside effdet
warnings.filterwarnings('ignore', message='.*__floordiv__.*')
import effdet  # noqa: E402
import timm  # noqa: E402
from effdet.bench import DetBenchTrain  # noqa: E402
from effdet.data.loader import DetectionFastCollate  # noqa: E402
from effdet.data.transforms import (  # noqa: E402
    transforms_coco_eval, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
from safetensors.torch import load_file, save_file  # noqa: E402

MODEL_NAME = 'tf_efficientdet_d0'
TARGET = 512
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, 'tests', 'fixtures', 'golden')

# Parameters whose full gradient is stored: every tensor with at most SMALL_NUMEL elements (all
# BN weights/biases, conv biases, edge_weights, the stem, small SE/depthwise convs), plus these
# whole modules (prefix match on the parameter name):
SMALL_NUMEL = 2000
EXPLICIT_PREFIXES = [
    'backbone.conv_stem.', 'backbone.bn1.',            # stem (Conv2dSame, stride 2) + BN
    'backbone.blocks.1.0.',                            # MBConv, stage 1: k3 s2 (Conv2dSame dw), expand 6, SE
    'backbone.blocks.5.0.',                            # MBConv, stage 5: k5 s2 (Conv2dSame dw), 112 -> 672 -> 192
    'fpn.resample.3.',                                 # P5 (320 ch) -> P6: 1x1 conv + BN + max-pool
    'fpn.cell.0.fnode.5.',                             # cell 0, P5 bottom-up node: 3 inputs incl. resample conv 320->64
    'fpn.cell.2.fnode.5.',                             # cell 2, same node
    'fpn.cell.2.fnode.0.',                             # cell 2, P6 top-down node (2 inputs)
    'class_net.conv_rep.0.', 'class_net.bn_rep.0.0.', 'class_net.bn_rep.0.4.',
    'class_net.bn_rep.1.0.', 'class_net.bn_rep.1.4.', 'class_net.bn_rep.2.0.', 'class_net.bn_rep.2.4.',
    'class_net.predict.', 'box_net.predict.', 'box_net.conv_rep.0.',
]
EXPLICIT_SUBSTRINGS = ['edge_weights']

# COCO-format ground truth, in ORIGINAL image pixels (x, y, w, h). Written to annotations.json in
# this order (annotation ids 1..); effdet keeps this order in its targets.
# (image file, width, height, [(category_id, [x, y, w, h], iscrowd, comment)])
ANNOTATIONS = [
    ('img0.png', 640, 480, [
        (1, [353, 25, 185, 110], 0, 'cyan ellipse'),
        (3, [100, 0, 480, 250], 0, 'large box around the upper group of shapes (P6-sized)'),
        (18, [490.5, 196, 88, 131.5], 0, 'teal rectangle (half-pixel coordinates)'),
        (44, [43, 418, 84, 80], 0, 'dark square, extends past the bottom border (y1 = 498 > 480): clipped'),
        (62, [290, 258, 12, 12], 0, 'small 12x12 box on the pink shape'),
        (90, [130, 265, 90, 75], 1, 'checkerboard patch, iscrowd = 1: ignored'),
    ]),
    ('img1.png', 333, 500, [
        (2, [149, 86, 87, 53], 0, 'magenta ellipse'),
        (27, [202, 168, 109, 104], 0, 'dark green rectangle'),
        (77, [270, 92, 70, 137], 0, 'lilac rectangle, extends past the right border (x1 = 340 > 333): clipped'),
        (33, [5, 5, 320, 485], 0, 'nearly the whole image (P6/P7-sized)'),
        (50, [336, 200, 20, 30], 0, 'entirely right of the image (x0 = 336 > 333): empty after clipping, dropped'),
        (85, [252, 337, 50, 45], 1, 'green square, iscrowd = 1: ignored'),
    ]),
]


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def proj_weights(n):
    """r(i) = ((i * 2654435761) mod 2^32) / 2^32 - 0.5, exact in float64."""
    i = np.arange(n, dtype=np.uint64)
    return ((i * np.uint64(2654435761)) % np.uint64(2 ** 32)).astype(np.float64) / 2.0 ** 32 - 0.5


def coco_json():
    images, anns = [], []
    ann_id = 1
    for img_id, (fname, w, h, boxes) in enumerate(ANNOTATIONS, start=1):
        images.append(dict(id=img_id, file_name=fname, width=w, height=h))
        for cat, bbox, crowd, _ in boxes:
            anns.append(dict(id=ann_id, image_id=img_id, category_id=cat, bbox=bbox,
                             area=bbox[2] * bbox[3], iscrowd=crowd))
            ann_id += 1
    cats = [dict(id=i, name=f'class{i}', supercategory='synthetic') for i in range(1, 91)]
    return dict(info=dict(description='effdet-rs train-step fixture (synthetic images)'),
                images=images, annotations=anns, categories=cats)


def parse_like_effdet(coco, img_id):
    """effdet.data.parsers.parser_coco.CocoParser._parse_img_ann with bbox_yxyx=True,
    cat_ids_as_labels=True (pycocotools returns a image's annotations in file order)."""
    bboxes, bboxes_ignore, cls = [], [], []
    for ann in coco['annotations']:
        if ann['image_id'] != img_id or ann.get('ignore', False):
            continue
        x1, y1, w, h = ann['bbox']
        if w < 1 or h < 1:
            continue
        bbox = [y1, x1, y1 + h, x1 + w]
        if ann.get('iscrowd', False):
            bboxes_ignore.append(bbox)
        else:
            bboxes.append(bbox)
            cls.append(ann['category_id'])
    bboxes = np.array(bboxes, ndmin=2, dtype=np.float32) if bboxes else np.zeros((0, 4), np.float32)
    cls = np.array(cls, dtype=np.int64)
    return dict(bbox=bboxes, cls=cls), bboxes_ignore


def build_model():
    model = effdet.create_model(MODEL_NAME, pretrained=False, pretrained_backbone=False, bench_task='')
    w = load_file(os.path.join(GOLDEN, 'weights_f16.safetensors'))
    model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in w.items()}, strict=True)
    n_dp = 0
    for m in model.modules():
        if isinstance(m, timm.layers.DropPath):
            m.drop_prob = 0.0
            n_dp += 1
        assert not isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d, torch.nn.AlphaDropout)), m
    return model, n_dp


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default=os.path.join(ROOT, 'tests', 'fixtures', 'train_step'))
    args = ap.parse_args()
    out_dir = os.path.normpath(args.out)
    os.makedirs(out_dir, exist_ok=True)

    t_start = time.time()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)  # nothing random is used; set anyway

    # ---- annotations -> effdet targets ---------------------------------------------------------
    coco = coco_json()
    tf = transforms_coco_eval(TARGET, interpolation='bilinear', use_prefetcher=True, fill_color='mean')
    batch, meta_images = [], []
    for img_id, (fname, w, h, boxes) in enumerate(ANNOTATIONS, start=1):
        img = Image.open(os.path.join(GOLDEN, fname))
        assert img.mode == 'RGB' and img.size == (w, h), (img.mode, img.size)
        anno, ignore = parse_like_effdet(coco, img_id)
        raw = anno['bbox'].copy()
        np_img, anno = tf(img, anno)  # effdet ResizePad: scale, clip, filter, img_scale
        scale = min(TARGET / h, TARGET / w)
        sh, sw = int(h * scale), int(w * scale)
        # the rule, restated (and checked against effdet's output bit for bit)
        mine = raw * np.float32(scale)
        mine = np.clip(mine, 0, np.array([sh, sw, sh, sw], np.float32))
        keep = (mine[:, :2] < mine[:, 2:]).all(axis=1)
        assert np.array_equal(mine[keep], anno['bbox']), (mine[keep], anno['bbox'])
        assert len(ignore) == 1 and keep.sum() >= 4
        batch.append((np_img, {'bbox': anno['bbox'], 'cls': anno['cls'], 'img_scale': anno['img_scale']}))
        meta_images.append(dict(
            file=fname, image_id=img_id, width=w, height=h, resize_scale=scale, img_scale=anno['img_scale'],
            resized_width=sw, resized_height=sh,
            coco_boxes_yxyx_f32=[[float(v) for v in b] for b in raw],
            kept=[bool(k) for k in keep],
            target_bbox_yxyx=[[float(v) for v in b] for b in anno['bbox']],
            target_cls=[int(c) for c in anno['cls']],
            ignored_crowd_boxes_yxyx=[[float(v) for v in b] for b in ignore]))
    img_u8, target = DetectionFastCollate()(batch)  # pads bbox / cls with -1 to 100 rows, float32
    mean = torch.tensor([x * 255 for x in IMAGENET_DEFAULT_MEAN]).view(1, 3, 1, 1)
    std = torch.tensor([x * 255 for x in IMAGENET_DEFAULT_STD]).view(1, 3, 1, 1)
    x = img_u8.float().sub_(mean).div_(std)  # PrefetchLoader normalisation
    assert x.shape == (2, 3, TARGET, TARGET)
    assert target['bbox'].dtype == torch.float32 and target['cls'].dtype == torch.float32
    golden = load_file(os.path.join(GOLDEN, 'golden.safetensors'))
    for i in range(2):  # same pre-processing as make_golden.py's preprocess()
        s = x[i].double().sum().item()
        assert s == golden[f'img{i}.input_sum'][0].item(), (s, golden[f'img{i}.input_sum'])
        meta_images[i]['input_sum'] = s
    bench_target = {'bbox': target['bbox'], 'cls': target['cls']}

    # ---- model ---------------------------------------------------------------------------------
    model, n_droppath = build_model()
    bench = DetBenchTrain(model, create_labeler=True)
    bench.train()
    assert all(m.training for m in bench.modules())
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    before = {n: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for n, m in bns.items()}

    # determinism / no-stochastic-op check on a deep copy (so the real model's running stats are
    # updated exactly once)
    t0 = time.time()
    # (the twin's forward is the first of the two passes, the real training step the second)
    twin = copy.deepcopy(bench)
    with torch.no_grad():
        o1 = twin(x, bench_target)
    del twin
    t_check = time.time() - t0

    # hooks: BN input batch statistics, to check the running-stat update rule per module
    batch_stats = {}

    def make_hook(name):
        def hook(mod, inp):
            with torch.no_grad():
                a = inp[0].detach().double()
                batch_stats[name] = (a.mean(dim=(0, 2, 3)), a.var(dim=(0, 2, 3), unbiased=True))
        return hook
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in bns.items()]

    t0 = time.time()
    out = bench(x, bench_target)
    for h in handles:
        h.remove()
    loss = out['loss']
    loss.backward()
    t_step = time.time() - t0
    for k in ('loss', 'class_loss', 'box_loss'):
        assert out[k].item() == o1[k].item(), (k, out[k].item(), o1[k].item())

    # labeler output again (cheap, deterministic) for num_positives and per-level counts
    with torch.no_grad():
        cls_t, box_t, num_pos = bench.anchor_labeler.batch_label_anchors(bench_target['bbox'], bench_target['cls'])
    assert num_pos.shape == (2,)
    pos_per_level = [[int((c[i] >= 0).sum()) for c in cls_t] for i in range(2)]
    for i in range(2):
        meta_images[i]['num_positives'] = float(num_pos[i])
        meta_images[i]['positives_per_level_P3_P7'] = pos_per_level[i]
        assert sum(pos_per_level[i]) == int(num_pos[i])
        cls_vals = torch.cat([c[i].flatten() for c in cls_t])
        meta_images[i]['positive_class_indices_0based'] = sorted(set(int(v) for v in cls_vals[cls_vals >= 0]))
        assert set(meta_images[i]['positive_class_indices_0based']) <= {c - 1 for c in meta_images[i]['target_cls']}

    # ---- running-stat update check ------------------------------------------------------------------
    bn_modules, groups = {}, {}
    max_err = 0.0
    for n, m in bns.items():
        mom, eps = float(m.momentum), float(m.eps)
        bn_modules[n] = [mom, eps]
        groups.setdefault((mom, eps), []).append(n)
        rm0, rv0, nbt0 = before[n]
        bm, bv = batch_stats[n]
        exp_m = (1 - mom) * rm0.double() + mom * bm
        exp_v = (1 - mom) * rv0.double() + mom * bv
        for got, exp in ((m.running_mean, exp_m), (m.running_var, exp_v)):
            err = ((got.double() - exp).abs() / (exp.abs() + 1e-3)).max().item()
            max_err = max(max_err, err)
        assert int(m.num_batches_tracked) == nbt0 + 1
        assert not torch.equal(m.running_mean, rm0)
    assert max_err < 1e-5, max_err
    nbt_before = sorted({v[2] for v in before.values()})

    # ---- float64 reference run ---------------------------------------------------------------------
    # Same step with the model in float64 (a fresh model, so the running stats match the f32 run's
    # starting point). effdet's loss casts the head outputs to float32 (`.float()` in loss_fn), so
    # the loss itself stays float32; everything else is float64. Used to tell how precise torch's
    # own float32 gradients are, and which gradients are structurally zero (float32 noise).
    t0 = time.time()
    model64, _ = build_model()
    model64 = model64.double()
    bench64 = DetBenchTrain(model64, create_labeler=True)
    bench64.train()
    out64 = bench64(x.double(), bench_target)
    out64['loss'].backward()
    grads64 = {n: p.grad.detach().double().flatten().numpy() for n, p in model64.named_parameters()}
    t_f64 = time.time() - t0
    for k in ('loss', 'class_loss', 'box_loss'):
        assert rel(out64[k].item(), out[k].item()) < 1e-5, (k, out64[k].item(), out[k].item())

    # ---- gradients -----------------------------------------------------------------------------
    named = list(model.named_parameters())
    no_grad = [n for n, p in named if p.grad is None]
    zero_grad = [n for n, p in named if p.grad is not None and not bool(p.grad.abs().max() > 0)]
    stored = {}
    params = {}
    structural, ill_conditioned = [], []
    for n, p in named:
        assert p.requires_grad
        store = (p.numel() <= SMALL_NUMEL or any(n.startswith(s) for s in EXPLICIT_PREFIXES)
                 or any(s in n for s in EXPLICIT_SUBSTRINGS))
        entry = dict(shape=list(p.shape), numel=p.numel())
        if p.grad is None:
            entry.update(grad=None, stored=False)
        else:
            g = p.grad.detach().contiguous()
            assert torch.isfinite(g).all(), n
            g64 = g.double().flatten().numpy()
            r = proj_weights(g64.size)
            ref = grads64[n]
            l2 = math.sqrt(math.fsum((g64 * g64).tolist()))
            l2_ref = math.sqrt(math.fsum((ref * ref).tolist()))
            diff = g64 - ref
            err = math.sqrt(math.fsum((diff * diff).tolist())) / max(l2_ref, 1e-300)
            structural_zero = l2_ref < 1e-4 * l2
            entry.update(
                grad_l2=l2,
                grad_proj=math.fsum((g64 * r).tolist()),
                proj_r_l2=math.sqrt(math.fsum((r * r).tolist())),
                grad_sum=math.fsum(g64.tolist()),
                grad_absmax=float(np.abs(g64).max()),
                grad_zeros=int((g64 == 0).sum()),
                f64_grad_l2=l2_ref,
                f64_grad_proj=math.fsum((ref * r).tolist()),
                f32_rel_l2_err=err,
                structural_zero=structural_zero,
                stored=store)
            if structural_zero:
                structural.append(n)
            elif err > 1e-4:
                ill_conditioned.append(n)
            if store:
                stored[n] = g.float().clone()
        params[n] = entry
    # every kind of parameter in the stored subset
    for pat in (r'conv_stem', r'\.bn1\.', r'conv_dw', r'conv_pw\.', r'conv_pwl', r'se\.conv_reduce\.weight',
                r'se\.conv_expand\.bias', r'edge_weights', r'resample\.\d\.conv\.conv\.weight',
                r'resample\.\d\.conv\.bn\.bias', r'after_combine\.conv\.conv_pw\.bias', r'bn_rep',
                r'predict\.conv_pw\.weight', r'predict\.conv_pw\.bias', r'predict\.conv_dw'):
        assert any(re.search(pat, k) for k in stored), pat
    assert all(p.grad is not None for _, p in named), no_grad

    running = {}
    for n, m in bns.items():
        running[f'{n}.running_mean'] = m.running_mean.detach().float().contiguous().clone()
        running[f'{n}.running_var'] = m.running_var.detach().float().contiguous().clone()

    # ---- write -----------------------------------------------------------------------------------
    with open(os.path.join(out_dir, 'annotations.json'), 'w') as f:
        json.dump(coco, f, indent=1)
        f.write('\n')
    save_file(stored, os.path.join(out_dir, 'grads.safetensors'))
    save_file(running, os.path.join(out_dir, 'running_stats.safetensors'))
    for fn in ('grads.safetensors', 'running_stats.safetensors'):
        os.chmod(os.path.join(out_dir, fn), 0o644)  # safetensors creates files as 0600

    cfg = model.config
    num_pos_sum = float(num_pos.sum())
    meta = dict(
        generator='tools/make_train_step_fixtures.py',
        command='python3 tools/make_train_step_fixtures.py',
        model=MODEL_NAME,
        weights='tests/fixtures/golden/weights_f16.safetensors (f16 values loaded as f32)',
        versions=dict(effdet=importlib.metadata.version('effdet'), timm=importlib.metadata.version('timm'),
                      torch=torch.__version__, torchvision=importlib.metadata.version('torchvision'),
                      safetensors=importlib.metadata.version('safetensors'), numpy=np.__version__,
                      pillow=PIL.__version__, python=sys.version.split()[0]),
        annotations='annotations.json',
        annotation_comments=[[c for _, _, _, c in boxes] for _, _, _, boxes in ANNOTATIONS],
        pipeline=dict(
            batch=['img0.png', 'img1.png'],
            parse='CocoParser: [x, y, w, h] -> [y, x, y + h, x + w] as float32; anns with ignore=true or '
                  'w < 1 or h < 1 skipped; iscrowd=1 -> bbox_ignore (not a training target); '
                  'class = category_id (cat_ids_as_labels).',
            resize_pad='transforms_coco_eval(512, bilinear, fill mean): s = min(512/h, 512/w); '
                       'scaled_h = int(h*s), scaled_w = int(w*s); bbox = float32(bbox) * float32(s) (float32 '
                       'arithmetic); clipped to y in [0, scaled_h], x in [0, scaled_w]; rows kept iff '
                       'y0 < y1 and x0 < x1; img_scale = 1/s.',
            collate='DetectionFastCollate: bbox [B, 100, 4], cls [B, 100] float32, padded with -1.',
            normalise='float32: (x - float32(255*mean)) / float32(255*std), same as make_golden.py.',
            bench='DetBenchTrain(model, create_labeler=True).train(); target = {bbox, cls}; the labeler '
                  'drops rows with cls <= -1; class targets = cls - 1 (0-based index into the 90 logits).',
            drop_path=f'drop_prob = 0 on all {n_droppath} timm DropPath modules (checked: a deep copy\'s forward and the '
                      'real forward give bit-identical losses); no Dropout modules.',
            batch_norm='training mode: batch statistics (biased variance) normalise; running stats updated '
                       'once: r = (1 - momentum) * r + momentum * batch_stat, running_var with the unbiased '
                       'batch variance; num_batches_tracked += 1.'),
        loss_config=dict(num_classes=cfg.num_classes, alpha=cfg.alpha, gamma=cfg.gamma, delta=cfg.delta,
                         box_loss_weight=cfg.box_loss_weight, label_smoothing=cfg.label_smoothing,
                         legacy_focal=cfg.legacy_focal, jit_loss=cfg.jit_loss, match_threshold=0.5),
        images=meta_images,
        loss=float(out['loss'].item()),
        class_loss=float(out['class_loss'].item()),
        box_loss=float(out['box_loss'].item()),
        num_positives=num_pos_sum,
        num_positives_note='sum over the batch of AnchorLabeler num_positives (matched anchors, '
                           'match_results > -1); DetectionLoss normalises by num_positives + 1 '
                           '(class loss) and 4 * (num_positives + 1) (box loss).',
        loss_normalizer=num_pos_sum + 1.0,
        bn=dict(
            groups=[dict(momentum=mom, eps=eps, count=len(names),
                         prefixes=sorted({re.sub(r'\..*', '', nm) for nm in names}))
                    for (mom, eps), names in sorted(groups.items())],
            modules=bn_modules,
            num_batches_tracked_before=nbt_before,
            num_batches_tracked_after=[v + 1 for v in nbt_before],
            running_update_max_rel_err=max_err),
        grads=dict(
            file='grads.safetensors',
            rule=f'all parameters with <= {SMALL_NUMEL} elements, plus prefixes {EXPLICIT_PREFIXES}, '
                 f'plus names containing {EXPLICIT_SUBSTRINGS}',
            stored=len(stored), stored_elements=int(sum(v.numel() for v in stored.values())),
            proj_rule='grad_proj = sum_i g[i] * r(i) over the C-order flat index i, '
                      'r(i) = ((i * 2654435761) mod 2^32) / 2^32 - 0.5 (exact in float64); sums exactly '
                      'rounded (math.fsum) over the float32 gradient widened to float64. proj_r_l2 = ||r||, '
                      'so |proj(a) - proj(b)| <= ||a - b|| * proj_r_l2 (Cauchy-Schwarz).',
            params_without_grad=no_grad,
            params_with_all_zero_grad=zero_grad,
            f64_reference=dict(
                loss=float(out64['loss'].item()), class_loss=float(out64['class_loss'].item()),
                box_loss=float(out64['box_loss'].item()),
                note='f64_grad_l2 / f64_grad_proj / f32_rel_l2_err: the same step with the model in '
                     'float64 (effdet still computes the loss itself in float32: loss_fn casts the head '
                     'outputs with .float()). f32_rel_l2_err = ||g_f32 - g_f64|| / ||g_f64||, i.e. the '
                     'precision of torch\'s own float32 gradient; a float32 implementation cannot be '
                     'expected to match g_f32 much closer than about that plus its own error of the same '
                     'size.'),
            structural_zero=structural,
            structural_zero_note='mathematically zero gradients (||g_f64|| < 1e-4 ||g_f32||): the float32 '
                                 'values are rounding noise, compare them with an absolute tolerance, not a '
                                 'relative one. They are the biases of convs followed by a training-mode BN '
                                 '(after_combine conv_pw.bias, resample conv.bias, head conv_rep conv_pw.bias) '
                                 'and the last BN bias of backbone blocks whose output only feeds 1x1 convs '
                                 'followed by training-mode BN (a per-channel constant is removed by the '
                                 'batch mean).',
            ill_conditioned=ill_conditioned,
            ill_conditioned_note='not structurally zero, but torch\'s float32 gradient is off by more than '
                                 '1e-4 relative L2 from the float64 one (see f32_rel_l2_err).'),
        running_stats=dict(file='running_stats.safetensors',
                           content='running_mean / running_var (f32) of all BN modules after the step'),
        params=params,
    )
    with open(os.path.join(out_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)
        f.write('\n')

    # ---- summary ---------------------------------------------------------------------------------
    print(f'loss {meta["loss"]:.8g}  class_loss {meta["class_loss"]:.8g}  box_loss {meta["box_loss"]:.8g}  '
          f'num_positives {num_pos.tolist()} (sum {num_pos_sum:g})')
    for im in meta_images:
        print(f'  {im["file"]}: {len(im["target_cls"])} targets, classes {im["target_cls"]}, '
              f'positives per level {im["positives_per_level_P3_P7"]}')
    print(f'BN (momentum, eps) groups: ' + ', '.join(f'({g["momentum"]}, {g["eps"]}) x{g["count"]} {g["prefixes"]}'
                                                      for g in meta['bn']['groups']))
    print(f'running-stat update check: max rel err {max_err:.2e}')
    print(f'{len(named)} parameters, {sum(p.numel() for _, p in named)} elements; stored {len(stored)} full '
          f'gradients ({meta["grads"]["stored_elements"]} elements); no grad: {no_grad}; all-zero grad: {zero_grad}')
    total = 0
    for fn in sorted(os.listdir(out_dir)):
        sz = os.path.getsize(os.path.join(out_dir, fn))
        total += sz
        print(f'  {fn:28s} {sz:10d} bytes')
    print(f'  {"total":28s} {total:10d} bytes')
    assert total < 3_000_000, total
    print(f'float64 reference: loss {meta["grads"]["f64_reference"]["loss"]:.10g}; structurally zero gradients: '
          f'{len(structural)}; float32 gradient off by > 1e-4 rel L2: '
          + ', '.join(f'{n} ({params[n]["f32_rel_l2_err"]:.2e})' for n in ill_conditioned))
    print(f'time: determinism check {t_check:.1f}s, train step {t_step:.1f}s, float64 step {t_f64:.1f}s, '
          f'total {time.time() - t_start:.1f}s')


if __name__ == '__main__':
    main()
