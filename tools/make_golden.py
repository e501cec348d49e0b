#!/usr/bin/env python3
"""Generate golden reference fixtures for effdet-rs from the PyTorch `effdet` package.

Usage:
    python3 tools/make_golden.py [--out tests/fixtures/golden]

Requires the packages in tools/requirements.txt (effdet 0.4.1, torch, timm,
torchvision, numpy, pillow, safetensors). Runs on the CPU, offline: the model is
built with pretrained=False, pretrained_backbone=False, and its weights are
seeded random weights generated here (no download of any kind).

What it writes (into --out):
    weights_f16.safetensors  the full effdet state_dict (784 entries, exact
                             state_dict key names; float tensors as float16,
                             num_batches_tracked as int64). These f16 values ARE
                             the weights the goldens were computed with
                             (upcast to f32).
    img0.png, img1.png, img2.png
                             synthetic RGB test images (640x480, 333x500, 512x512).
    golden.safetensors       all reference numbers (pre-processing intermediates,
                             sampled raw head outputs, whole-tensor sums,
                             final detections with hard NMS and soft-NMS).
    meta.json                sizes, scales, seed, versions and a description
                             of every key in golden.safetensors.

The weights are random but constructed to make a meaningful test:
  * conv weights ~ N(0, 1/fan_in), conv biases ~ N(0, 0.2);
  * BN weight ~ U(0.5, 1.5), bias ~ N(0.5, 0.3); running mean/var are CALIBRATED
    (cumulative average over synthetic calibration images, train-mode BN with
    everything else in eval mode), so they are non-trivial and BN folding bugs show;
  * BiFPN edge_weights ~ U(-0.2, 1.5) (some negative, so the ReLU matters), with
    at least one clearly positive edge per node;
  * class / box predictor (class_net.predict.conv_pw, box_net.predict.conv_pw)
    rescaled per output channel so that logits have mean about -4 and std about
    1.5 (sigmoid scores
    spread over (0, 1), not saturated) and box codes have std about 0.4;
  * finally every float tensor is rounded to float16 and back, so the f16 file
    is exactly the model that produced the goldens.

Everything is deterministic: fixed seeds, torch.set_num_threads(2), CPU only.
Sanity checks are asserted before anything is written.
"""
import argparse
import importlib.metadata
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import PIL
from PIL import Image, ImageDraw

warnings.filterwarnings('ignore', category=FutureWarning)  # torch.jit.script deprecation inside effdet
warnings.filterwarnings('ignore', message='.*__floordiv__.*')
import effdet  # noqa: E402
from effdet.bench import DetBenchPredict, _post_process, _batch_detection
from effdet.data.transforms import (
    transforms_coco_eval, resolve_fill_color, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file as torch_save_file

SEED = 20240517
MODEL_NAME = 'tf_efficientdet_d0'
IMAGE_SPECS = [('img0.png', 640, 480), ('img1.png', 333, 500), ('img2.png', 512, 512)]  # (name, width, height)
NUM_CALIB_BATCHES = 4
CALIB_BATCH = 2
# Position subset of the raw head outputs: p_k = (k * POS_STRIDE) mod (H*W), k = 0..63,
# or all positions when H*W <= 64. 67 is odd and co-prime with every level size (powers of
# two), and hits the last row and the last column on P3, P4 and P5.
POS_COUNT = 64
POS_STRIDE = 67
# Predictor calibration targets. The logits of a random network have a heavier-than-Gaussian
# upper tail (the top logit of the ~4.4M per image sits 6-7 std above the mean), so mean -4 /
# std 1.5 (close to effdet's own prior bias -4.6) keeps the best score below ~0.998.
CLASS_LOGIT_MEAN = -4.0
CLASS_LOGIT_STD = 1.5
BOX_CODE_STD = 0.4
# BN affine init. A positive mean bias keeps the activations partly in swish's near-linear
# region: with zero-mean biases the random network amplifies per-image contrast differences
# layer after layer (head output amplitude varied 5-20x between images), which makes it
# impossible to hit one logit range on every image. With N(0.5, 0.3) it varies ~10%.
BN_WEIGHT_RANGE = (0.5, 1.5)
BN_BIAS_MEAN = 0.5
BN_BIAS_STD = 0.3
# Texture strength of the synthetic images. A random network responds far more strongly to
# fine high-contrast texture than to shapes/gradients, so strong texture makes the response
# amplitude swing by 10x between images; these mild settings keep it consistent.
NOISE_STD = 6.0
CHECKER_CELL = (6, 17)
CHECKER_AMP = (30, 80)
STRIPE_PERIOD = (8, 20)
STRIPE_AMP = (15, 40)
TARGET_CONTRAST = 55.0


# ----------------------------------------------------------------------------------------------
# Synthetic images
# ----------------------------------------------------------------------------------------------

def _rand_color(rng):
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def make_image(rng, width, height):
    """Synthetic RGB image with real structure: gradient background, low-frequency
    waves, filled/outlined shapes of many colours, a few noisy/textured patches."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    # Background: linear gradient between two colours in a random direction.
    ang = rng.uniform(0, 2 * math.pi)
    t = (xx * math.cos(ang) + yy * math.sin(ang))
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    c0 = rng.uniform(0, 255, size=3)
    c1 = rng.uniform(0, 255, size=3)
    bg = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    # Low-frequency waves.
    fx, fy = rng.uniform(0.01, 0.05, size=2)
    bg += 25.0 * np.sin(xx * fx + yy * fy)[..., None] * rng.uniform(-1, 1, size=3)[None, None, :]
    img = Image.fromarray(np.clip(bg, 0, 255).round().astype(np.uint8), 'RGB')

    draw = ImageDraw.Draw(img)
    n_shapes = int(rng.integers(14, 22))
    for _ in range(n_shapes):
        kind = int(rng.integers(0, 4))
        w = int(rng.integers(width // 12, width // 3))
        h = int(rng.integers(height // 12, height // 3))
        x0 = int(rng.integers(-w // 4, width - w // 2))
        y0 = int(rng.integers(-h // 4, height - h // 2))
        box = [x0, y0, x0 + w, y0 + h]
        fill = _rand_color(rng)
        outline = _rand_color(rng) if rng.uniform() < 0.5 else None
        lw = int(rng.integers(1, 5))
        if kind == 0:
            draw.rectangle(box, fill=fill, outline=outline, width=lw)
        elif kind == 1:
            draw.ellipse(box, fill=fill, outline=outline, width=lw)
        elif kind == 2:
            n = int(rng.integers(3, 7))
            pts = [(int(x0 + rng.uniform(0, w)), int(y0 + rng.uniform(0, h))) for _ in range(n)]
            draw.polygon(pts, fill=fill, outline=outline)
        else:
            for _ in range(int(rng.integers(2, 6))):
                p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
                p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
                draw.line([p0, p1], fill=fill, width=int(rng.integers(1, 8)))

    arr = np.array(img, dtype=np.float64)
    # Textured / noisy patches (kept local so the PNGs stay small).
    for _ in range(3):
        pw = int(rng.integers(width // 10, width // 4))
        ph = int(rng.integers(height // 10, height // 4))
        px = int(rng.integers(0, width - pw))
        py = int(rng.integers(0, height - ph))
        kind = int(rng.integers(0, 3))
        region = arr[py:py + ph, px:px + pw]
        if kind == 0:  # gaussian noise
            region += rng.normal(0, NOISE_STD, size=region.shape)
        elif kind == 1:  # checkerboard
            cell = int(rng.integers(CHECKER_CELL[0], CHECKER_CELL[1]))
            cy, cx = np.mgrid[0:ph, 0:pw]
            chk = (((cy // cell) + (cx // cell)) % 2).astype(np.float64)
            region += (chk[..., None] - 0.5) * rng.uniform(*CHECKER_AMP) * np.sign(rng.uniform(-1, 1, size=3))
        else:  # stripes
            cy, cx = np.mgrid[0:ph, 0:pw]
            period = rng.uniform(*STRIPE_PERIOD)
            s = np.sin((cx + 0.7 * cy) * 2 * math.pi / period)
            region += s[..., None] * rng.uniform(*STRIPE_AMP, size=3)
        arr[py:py + ph, px:px + pw] = region
    if TARGET_CONTRAST:
        # Normalise the global contrast so that all images excite the random network similarly.
        m = arr.mean()
        arr = m + (arr - m) * (TARGET_CONTRAST / max(arr.std(), 1e-6))
        arr = arr - arr.mean() + 120.0
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), 'RGB')


# ----------------------------------------------------------------------------------------------
# Pre-processing exactly as effdet's eval pipeline (transforms_coco_eval + PrefetchLoader)
# ----------------------------------------------------------------------------------------------

def preprocess(img, target=512):
    tf = transforms_coco_eval(target, interpolation='bilinear', use_prefetcher=True, fill_color='mean')
    np_img, anno = tf(img, {})  # uint8 CHW, padded bottom/right with the fill colour
    # PrefetchLoader normalisation (done there on the GPU in float32; identical ops on CPU).
    mean = torch.tensor([x * 255 for x in IMAGENET_DEFAULT_MEAN]).view(1, 3, 1, 1)
    std = torch.tensor([x * 255 for x in IMAGENET_DEFAULT_STD]).view(1, 3, 1, 1)
    x = torch.from_numpy(np_img).unsqueeze(0).float().sub_(mean).div_(std)
    return np_img, anno, x


def resize_like_effdet(img, target=512):
    """Reproduces ResizePad's size computation and PIL resize (the image before padding)."""
    width, height = img.size
    img_scale = min(target / height, target / width)
    scaled_h = int(height * img_scale)
    scaled_w = int(width * img_scale)
    resized = img.resize((scaled_w, scaled_h), Image.BILINEAR)
    return np.array(resized, dtype=np.uint8), img_scale, scaled_w, scaled_h


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

def is_bn(m):
    return isinstance(m, torch.nn.modules.batchnorm._BatchNorm)


@torch.no_grad()
def init_random_weights(model, gen):
    n_conv = n_bn = n_edge = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(fan_in))
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            n_conv += 1
        elif is_bn(m):
            lo, hi = BN_WEIGHT_RANGE
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * (hi - lo) + lo)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * BN_BIAS_STD + BN_BIAS_MEAN)
            n_bn += 1
        elif isinstance(m, torch.nn.Linear):
            raise RuntimeError(f'unexpected Linear layer {name}')
    n_neg = 0
    for name, p in model.named_parameters():
        if name.endswith('edge_weights'):
            while True:
                w = torch.rand(p.shape, generator=gen) * 1.7 - 0.2  # U(-0.2, 1.5)
                if (w > 0.3).any():  # at least one clearly live edge per node
                    break
            p.copy_(w)
            n_neg += int((w <= 0).sum())
            n_edge += 1
    return n_conv, n_bn, n_edge, n_neg


@torch.no_grad()
def calibrate_bn(model, batches):
    """Cumulative-average BN statistics: BN layers in train mode (batch stats, momentum=None),
    everything else (drop-path) in eval mode."""
    model.eval()
    bns = [m for m in model.modules() if is_bn(m)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for x in batches:
        model(x)
    for m in bns:
        m.momentum = 0.01  # restore the config value (irrelevant for eval / state_dict)
    model.eval()
    return len(bns)


@torch.no_grad()
def calibrate_predictors(model, batches, gen):
    """Rescale the class / box predictor 1x1 convs so outputs have the target statistics."""
    model.eval()
    cls_pw = model.class_net.predict.conv_pw
    box_pw = model.box_net.predict.conv_pw
    cls_vals, box_vals = [], []
    for x in batches:
        c, b = model(x)
        cls_vals.append(torch.cat([(t - cls_pw.bias.view(1, -1, 1, 1)).permute(0, 2, 3, 1).reshape(-1, t.shape[1]) for t in c]))
        box_vals.append(torch.cat([(t - box_pw.bias.view(1, -1, 1, 1)).permute(0, 2, 3, 1).reshape(-1, t.shape[1]) for t in b]))
    cv = torch.cat(cls_vals).double()  # W*h without bias, [N, 810]
    bv = torch.cat(box_vals).double()
    # Per-output-channel scale (equalises the channels, so detections spread over many classes
    # and the heavy upper tail of the high-variance channels is tamed), each channel re-centred
    # through its bias, plus a small per-channel bias jitter.
    cls_jit, box_jit = 0.3, 0.1
    s_c = math.sqrt(CLASS_LOGIT_STD ** 2 - cls_jit ** 2) / (cv - cv.mean(0)).std(0)
    cls_pw.weight.mul_(s_c.float().view(-1, 1, 1, 1))
    jitter = torch.randn(cls_pw.bias.shape, generator=gen) * cls_jit
    cls_pw.bias.copy_((CLASS_LOGIT_MEAN - s_c * cv.mean(0) + jitter).float())
    s_b = math.sqrt(BOX_CODE_STD ** 2 - box_jit ** 2) / (bv - bv.mean(0)).std(0)
    box_pw.weight.mul_(s_b.float().view(-1, 1, 1, 1))
    jitter = torch.randn(box_pw.bias.shape, generator=gen) * box_jit
    box_pw.bias.copy_((-s_b * bv.mean(0) + jitter).float())
    s_c, s_b = s_c.mean().item(), s_b.mean().item()
    return s_c, s_b


@torch.no_grad()
def round_to_f16(model):
    sd = model.state_dict()
    new_sd = {}
    for k, v in sd.items():
        if v.is_floating_point():
            h = v.to(torch.float16)
            if not torch.isfinite(h).all():
                raise RuntimeError(f'{k} does not fit in float16')
            new_sd[k] = h.float()
        else:
            new_sd[k] = v.clone()
    model.load_state_dict(new_sd, strict=True)
    return model


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def positions_for(h, w):
    hw = h * w
    if hw <= POS_COUNT:
        return np.arange(hw, dtype=np.int64)
    p = (np.arange(POS_COUNT, dtype=np.int64) * POS_STRIDE) % hw
    assert len(np.unique(p)) == POS_COUNT
    return p


def rel_l2(a, b):
    return float((a - b).norm() / (0.5 * (a.norm() + b.norm())))


@torch.no_grad()
def verify(out_dir, tensors):
    """Rebuild everything from the written files and check the (hard-NMS) goldens bit-exactly."""
    from safetensors.torch import load_file
    model = effdet.create_model(MODEL_NAME, pretrained=False, pretrained_backbone=False, bench_task='')
    w = load_file(os.path.join(out_dir, 'weights_f16.safetensors'))
    model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in w.items()}, strict=True)
    model.eval()
    bench = DetBenchPredict(model).eval()
    for i, (fname, w_, h_) in enumerate(IMAGE_SPECS):
        img = Image.open(os.path.join(out_dir, fname))
        assert img.mode == 'RGB' and img.size == (w_, h_)
        _, anno, x = preprocess(img)
        assert x.double().sum().item() == tensors[f'img{i}.input_sum'][0]
        resized = resize_like_effdet(img)[0]
        stored = np.array(Image.open(os.path.join(out_dir, f'img{i}_resized.png')).convert('RGB'))
        assert np.array_equal(resized, stored)
        cls_out, box_out = model(x)
        for l, (c, b) in enumerate(zip(cls_out, box_out)):
            pos = tensors[f'level{l}.positions']
            assert np.array_equal(c[0].flatten(1)[:, pos].T.numpy(), tensors[f'img{i}.level{l}.class'])
            assert np.array_equal(b[0].flatten(1)[:, pos].T.numpy(), tensors[f'img{i}.level{l}.box'])
            assert c.double().sum().item() == tensors[f'img{i}.level{l}.class_sum'][0]
        img_info = {'img_scale': torch.tensor([anno['img_scale']], dtype=torch.float32),
                    'img_size': torch.tensor([[w_, h_]], dtype=torch.float32)}
        bench.soft_nms = False
        det = bench(x, img_info)[0].numpy()
        assert np.array_equal(det, tensors[f'img{i}.detections'])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests', 'fixtures', 'golden'),
                    help='output directory (default: tests/fixtures/golden of this repo)')
    args = ap.parse_args()
    out_dir = os.path.normpath(args.out)
    os.makedirs(out_dir, exist_ok=True)

    t_start = time.time()
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(SEED)

    # ---- model + weights -------------------------------------------------------------------
    model = effdet.create_model(MODEL_NAME, pretrained=False, pretrained_backbone=False, bench_task='')
    model.eval()
    n_conv, n_bn, n_edge, n_neg = init_random_weights(model, gen)
    print(f'init: {n_conv} convs, {n_bn} BNs, {n_edge} edge_weight vectors ({n_neg} non-positive edges)')
    assert n_neg >= 3, 'want some non-positive BiFPN edge weights so the ReLU matters'

    # calibration images: NOT the test images (different seed, different sizes)
    calib_rng = np.random.default_rng(SEED + 1)
    calib_batches = []
    for bi in range(NUM_CALIB_BATCHES):
        xs = []
        for j in range(CALIB_BATCH):
            w = int(calib_rng.integers(300, 800))
            h = int(calib_rng.integers(300, 800))
            xs.append(preprocess(make_image(calib_rng, w, h))[2])
        calib_batches.append(torch.cat(xs))
    t0 = time.time()
    nb = calibrate_bn(model, calib_batches)
    t_bn = time.time() - t0
    s_c, s_b = calibrate_predictors(model, calib_batches, gen)
    round_to_f16(model)
    t_calib = time.time() - t0
    print(f'BN calibration {t_bn:.1f}s')
    print(f'calibrated {nb} BN layers, mean predictor scales class {s_c:.4f} box {s_b:.4f} ({t_calib:.1f}s)')

    sd = model.state_dict()
    assert len(sd) == 784, len(sd)
    weights = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    rv = torch.cat([v.flatten() for k, v in sd.items() if k.endswith('running_var')])
    rm = torch.cat([v.flatten() for k, v in sd.items() if k.endswith('running_mean')])
    print(f'BN running_mean range [{rm.min():.3f}, {rm.max():.3f}] std {rm.std():.3f}; '
          f'running_var range [{rv.min():.4g}, {rv.max():.4g}]')

    # ---- test images ---------------------------------------------------------------------------
    img_rng = np.random.default_rng(SEED)
    images = [make_image(img_rng, w, h) for (_, w, h) in IMAGE_SPECS]

    bench = DetBenchPredict(model)
    bench.eval()
    tensors = {}
    meta_images = []
    cls_full = []
    det_stats = []
    t_fwd = t_det = t_soft = 0.0
    level_pos = None
    for i, ((fname, w, h), img) in enumerate(zip(IMAGE_SPECS, images)):
        assert img.size == (w, h)
        np_img, anno, x = preprocess(img)
        resized, scale, sw, sh = resize_like_effdet(img)
        # the resized image must be exactly the top-left block of effdet's padded image
        assert np.array_equal(np_img[:, :sh, :sw], np.moveaxis(resized, 2, 0))
        fill = resolve_fill_color('mean', IMAGENET_DEFAULT_MEAN)
        assert (np_img[:, sh:, :] == np.array(fill, dtype=np.uint8)[:, None, None]).all()
        assert (np_img[:, :, sw:] == np.array(fill, dtype=np.uint8)[:, None, None]).all()
        img_scale = anno['img_scale']
        assert img_scale == 1.0 / scale

        with torch.no_grad():
            t0 = time.time()
            cls_out, box_out = model(x)
            t_fwd += time.time() - t0
            img_info = {'img_scale': torch.tensor([img_scale], dtype=torch.float32),
                        'img_size': torch.tensor([[w, h]], dtype=torch.float32)}
            bench.soft_nms = False
            t0 = time.time()
            det = bench(x, img_info)[0]
            t_det += time.time() - t0
            bench.soft_nms = True
            t0 = time.time()
            det_soft = bench(x, img_info)[0]
            t_soft += time.time() - t0
            bench.soft_nms = False
            # diagnostics: margin at the top-k boundary and below the 100th detection
            c_pp, b_pp, idx, cl = _post_process(cls_out, box_out, 5, 90, 5000)
            allc = torch.cat([t.permute(0, 2, 3, 1).reshape(-1) for t in cls_out])
            top = torch.topk(allc, 5001).values
            det101 = _batch_detection(1, c_pp, b_pp, bench.anchors.boxes, idx, cl,
                                      img_info['img_scale'], img_info['img_size'],
                                      max_det_per_image=101, soft_nms=False)[0]
            assert torch.equal(det101[:100], det)

        # Stored as a lossless PNG (a third of the raw size) rather than inside golden.safetensors.
        Image.fromarray(resized, 'RGB').save(os.path.join(out_dir, f'img{i}_resized.png'), optimize=True)
        tensors[f'img{i}.img_scale'] = np.array([img_scale], dtype=np.float64)
        tensors[f'img{i}.input_sum'] = np.array([x.double().sum().item()], dtype=np.float64)
        tensors[f'img{i}.input_shape'] = np.array(list(x.shape), dtype=np.int64)
        level_pos = []
        for l, (c, b) in enumerate(zip(cls_out, box_out)):
            _, C, H, W = c.shape
            assert C == 810 and b.shape[1] == 36 and b.shape[2:] == c.shape[2:]
            pos = positions_for(H, W)
            level_pos.append((H, W, pos))
            tensors[f'level{l}.positions'] = pos
            cf = c[0].reshape(C, H * W)
            bf = b[0].reshape(36, H * W)
            tensors[f'img{i}.level{l}.class'] = cf[:, pos].T.contiguous().numpy().astype(np.float32)
            tensors[f'img{i}.level{l}.box'] = bf[:, pos].T.contiguous().numpy().astype(np.float32)
            cd, bd = c.double(), b.double()
            tensors[f'img{i}.level{l}.class_sum'] = np.array([cd.sum().item()], dtype=np.float64)
            tensors[f'img{i}.level{l}.class_sumsq'] = np.array([(cd * cd).sum().item()], dtype=np.float64)
            tensors[f'img{i}.level{l}.box_sum'] = np.array([bd.sum().item()], dtype=np.float64)
            tensors[f'img{i}.level{l}.box_sumsq'] = np.array([(bd * bd).sum().item()], dtype=np.float64)
        tensors[f'img{i}.detections'] = det.numpy().astype(np.float32)
        tensors[f'img{i}.detections_soft'] = det_soft.numpy().astype(np.float32)
        cls_full.append([c.clone() for c in cls_out])

        all_logits = torch.cat([t.flatten() for t in cls_out])
        all_box = torch.cat([t.flatten() for t in box_out])
        st = dict(
            logit_mean=all_logits.mean().item(), logit_std=all_logits.std().item(),
            logit_max=all_logits.max().item(), box_mean=all_box.mean().item(), box_std=all_box.std().item(),
            topk_boundary_gap=(top[4999] - top[5000]).item(),
            score_min=det[:, 4].min().item(), score_max=det[:, 4].max().item(),
            distinct_scores=int(torch.unique(det[:, 4]).numel()),
            num_classes=int(torch.unique(det[:, 5]).numel()),
            score_gap_100_101=(det101[99, 4] - det101[100, 4]).item(),
            soft_score_min=det_soft[:, 4].min().item(), soft_score_max=det_soft[:, 4].max().item(),
            soft_distinct_scores=int(torch.unique(det_soft[:, 4]).numel()),
            soft_num_classes=int(torch.unique(det_soft[:, 5]).numel()),
            soft_nonzero_rows=int((det_soft.abs().sum(1) > 0).sum()),
            nonzero_rows=int((det.abs().sum(1) > 0).sum()),
        )
        det_stats.append(st)
        meta_images.append(dict(
            file=fname, orig_width=w, orig_height=h, img_scale=img_scale, resize_scale=scale,
            resized_width=sw, resized_height=sh, input_shape=list(x.shape),
            fill_color=list(fill), stats=st))

    # ---- sanity checks (asserted before writing) -----------------------------------------------
    print('\nsanity checks:')
    ok = True
    for l in range(5):
        diffs = [rel_l2(cls_full[a][l], cls_full[b][l]) for a, b in ((0, 1), (0, 2), (1, 2))]
        print(f'  level{l} ({cls_full[0][l].shape[2]}x{cls_full[0][l].shape[3]}): rel-L2 class diff between images '
              + ', '.join(f'{d:.3f}' for d in diffs))
        ok &= all(d > 0.05 for d in diffs)
    assert ok, 'class outputs too similar across images'
    for i, st in enumerate(det_stats):
        print(f'  img{i}: logits mean {st["logit_mean"]:.3f} std {st["logit_std"]:.3f} max {st["logit_max"]:.3f}; '
              f'box codes mean {st["box_mean"]:.3f} std {st["box_std"]:.3f}')
        print(f'        hard NMS: {st["nonzero_rows"]} dets, score [{st["score_min"]:.4f}, {st["score_max"]:.4f}], '
              f'{st["distinct_scores"]} distinct scores, {st["num_classes"]} classes, '
              f'top-5000 boundary logit gap {st["topk_boundary_gap"]:.3g}, score gap det100-det101 {st["score_gap_100_101"]:.3g}')
        print(f'        soft NMS: {st["soft_nonzero_rows"]} dets, score [{st["soft_score_min"]:.4f}, {st["soft_score_max"]:.4f}], '
              f'{st["soft_distinct_scores"]} distinct scores, {st["soft_num_classes"]} classes')
        assert st['score_max'] < 0.999, 'scores saturated'
        assert st['distinct_scores'] >= 50, 'too few distinct scores'
        assert st['num_classes'] >= 5, 'detections span too few classes'
        assert st['nonzero_rows'] == 100
        assert st['soft_score_max'] < 0.999 and st['soft_distinct_scores'] >= 50 and st['soft_num_classes'] >= 5
        assert 1.3 <= st['logit_std'] <= 2.5 and -4.5 <= st['logit_mean'] <= -2.5, 'class logit stats off target'
        assert 0.25 <= st['box_std'] <= 0.6, 'box code stats off target'
    print('  all sanity checks passed')

    # ---- write -------------------------------------------------------------------------------
    for (fname, _, _), img in zip(IMAGE_SPECS, images):
        img.save(os.path.join(out_dir, fname), format='PNG', optimize=True)
    torch_save_file(weights, os.path.join(out_dir, 'weights_f16.safetensors'),
                    metadata={'format': 'pt'})
    tensors = {k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}
    np_save_file(tensors, os.path.join(out_dir, 'golden.safetensors'),
                 metadata={'generator': 'tools/make_golden.py'})

    key_desc = {
        'level{l}.positions': 'int64 [P]: flat spatial indices y*W+x (into the level\'s H x W map) of the sampled '
                              f'positions; P3..P7 = level0..4. Rule: p_k = (k*{POS_STRIDE}) mod (H*W) for k = 0..{POS_COUNT - 1}, '
                              f'or all positions 0..H*W-1 when H*W <= {POS_COUNT}.',
        'img{i}_resized.png (file)': 'the PIL img.resize((scaled_w, scaled_h), BILINEAR) output before padding '
                                     '(RGB), saved losslessly next to golden.safetensors.',
        'img{i}.img_scale': 'float64 [1]: effdet anno["img_scale"] = 1 / min(512/h, 512/w) (the factor that maps '
                            'network-input pixels back to original pixels).',
        'img{i}.input_sum': 'float64 [1]: sum of the normalised network input (1, 3, 512, 512) float32 '
                            '(padded with the fill colour, then (x - 255*mean) / (255*std)).',
        'img{i}.input_shape': 'int64 [4]: shape of the network input, NCHW.',
        'img{i}.level{l}.class': 'float32 [P, 810]: raw class logits out[0, c, y, x] at the sampled positions '
                                 '(row j = position level{l}.positions[j], column = NCHW channel c = anchor*90 + class).',
        'img{i}.level{l}.box': 'float32 [P, 36]: raw box codes out[0, c, y, x] at the sampled positions '
                               '(column = NCHW channel c = anchor*4 + (ty, tx, th, tw)).',
        'img{i}.level{l}.class_sum': 'float64 [1]: sum over the whole class output tensor [1, 810, H, W].',
        'img{i}.level{l}.class_sumsq': 'float64 [1]: sum of squares over the whole class output tensor.',
        'img{i}.level{l}.box_sum': 'float64 [1]: sum over the whole box output tensor [1, 36, H, W].',
        'img{i}.level{l}.box_sumsq': 'float64 [1]: sum of squares over the whole box output tensor.',
        'img{i}.detections': 'float32 [100, 6]: effdet DetBenchPredict output (hard per-class NMS IoU 0.5), rows '
                             'x1, y1, x2, y2, score, class (1-based), boxes clipped to img_size/img_scale before NMS '
                             'and multiplied by img_scale (original-image pixels); zero rows pad if < 100.',
        'img{i}.detections_soft': 'float32 [100, 6]: same with bench.soft_nms = True (Gaussian soft-NMS, sigma 0.5, '
                                  'score threshold 0.001; score column holds the decayed scores).',
    }
    meta = dict(
        model=MODEL_NAME,
        seed=SEED,
        versions=dict(effdet=importlib.metadata.version("effdet"), timm=importlib.metadata.version("timm"),
                      torchvision=importlib.metadata.version("torchvision"), safetensors=importlib.metadata.version("safetensors"), torch=torch.__version__, numpy=np.__version__,
                      pillow=PIL.__version__, python=sys.version.split()[0]),
        weights=dict(file='weights_f16.safetensors', entries=len(weights),
                     note='float tensors stored as float16 (exact: the goldens were computed with these values '
                          'upcast to float32); num_batches_tracked int64.',
                     init='conv W ~ N(0, 1/fan_in), conv bias ~ N(0, 0.2); '
                          f'BN weight ~ U{BN_WEIGHT_RANGE}, bias ~ N({BN_BIAS_MEAN}, {BN_BIAS_STD}); '
                          'BN running stats calibrated (cumulative average over '
                          f'{NUM_CALIB_BATCHES}x{CALIB_BATCH} synthetic images); edge_weights ~ U(-0.2, 1.5); '
                          f'predictors rescaled to class logit mean {CLASS_LOGIT_MEAN}, std {CLASS_LOGIT_STD}, '
                          f'box code std {BOX_CODE_STD}.'),
        preprocessing=dict(
            target_size=512, interpolation='PIL BILINEAR', fill_color=list(resolve_fill_color('mean', IMAGENET_DEFAULT_MEAN)),
            mean=list(IMAGENET_DEFAULT_MEAN), std=list(IMAGENET_DEFAULT_STD),
            normalise='float32: (x - float32(255*mean)) / float32(255*std)',
            img_info='img_scale = tensor([img_scale], float32), img_size = tensor([[orig_w, orig_h]], float32)'),
        position_rule=dict(count=POS_COUNT, stride=POS_STRIDE,
                           levels=[dict(level=l + 3, height=H, width=W, num_positions=int(len(p)))
                                   for l, (H, W, p) in enumerate(level_pos)]),
        images=meta_images,
        keys={k: v for k, v in key_desc.items()},
        golden_keys={k: dict(dtype=str(v.dtype), shape=list(v.shape)) for k, v in tensors.items()},
    )
    with open(os.path.join(out_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)
        f.write('\n')

    for fn in ('weights_f16.safetensors', 'golden.safetensors'):
        os.chmod(os.path.join(out_dir, fn), 0o644)  # safetensors creates files as 0600

    # ---- self-check: the written files alone reproduce the goldens --------------------------
    t0 = time.time()
    verify(out_dir, tensors)
    print(f'\nverified: fresh model + weights_f16.safetensors + PNGs from disk reproduce the goldens '
          f'bit-exactly ({time.time() - t0:.1f}s)')

    print('\nwritten to', out_dir)
    total = 0
    for fn in sorted(os.listdir(out_dir)):
        sz = os.path.getsize(os.path.join(out_dir, fn))
        total += sz
        print(f'  {fn:28s} {sz / 1e6:8.3f} MB')
    print(f'  {"total":28s} {total / 1e6:8.3f} MB')
    print(f'timings: calibration {t_calib:.1f}s, forward {t_fwd:.2f}s, predict(hard) {t_det:.2f}s, '
          f'predict(soft) {t_soft:.2f}s, total {time.time() - t_start:.1f}s')


if __name__ == '__main__':
    main()
