#!/usr/bin/env python3
"""Generate the reference fixtures for tests/train_optim.rs from torch and timm.

Usage (from the repository root, with a Python that has torch and timm; CPU is enough):

    python tools/make_optim_fixtures.py [OUT_DIR]

OUT_DIR defaults to tests/fixtures/train/optim/. Files written:

- optim.safetensors: every float reference (f32 tensors exactly as torch holds them, f64 for
  learning rates so they compare bit-exactly).
- meta.json: the configurations that produced them, parameter names and their weight-decay
  flags, the GradScaler trace and torch DistributedSampler index lists.

What is recorded:

1. `sgd`, `sgd_nesterov`, `adamw`: nine parameters named and shaped like effdet's (4-D conv
   weights, a 2-D linear weight, 1-D BN weights/biases, a conv bias, BiFPN `edge_weights`),
   grouped by timm's `param_groups_weight_decay` (the rule timm's `create_optimizer` applies),
   then three steps of `clip_grad_norm_(params, 10)` followed by `torch.optim.SGD` (momentum
   0.9, coupled weight decay, nesterov off/on) or `torch.optim.AdamW`. One parameter has no
   gradient in step 2 (torch skips it; its momentum buffer must survive). Keys:
   `init.<param>`, `grad.<step>.<param>` (absent when None), `clipped.<step>.<param>` (after
   clip_grad_norm_, which is the same for every optimizer), `<opt>.<step>.<param>`,
   `<opt>.<step>.<param>.momentum_buffer` / `.exp_avg` / `.exp_avg_sq`, `<opt>.total_norm`.
2. `sched.<name>`: timm `CosineLRScheduler` learning rates (f64) at the listed steps, read from
   the optimizer's param group after `step_update(t)` (per-update schedules) or `step(t)`
   (per-epoch schedules), exactly as timm's train loop drives it.
3. `ema.<decay>.<update>.<key>`: timm `ModelEmaV2` state after each update of a tiny conv + BN
   + conv model whose weights are perturbed and whose BN statistics move between updates
   (`model.<update>.<key>` are the model states fed to it). num_batches_tracked is not stored.
4. `scaler`: `torch.amp.GradScaler('cpu', init_scale=1024, growth_interval=3)` over twelve
   iterations of SGD on `sum(w * c)` with inf / NaN gradients injected: the per-iteration `c`
   (`scaler.<it>.c`), scale, growth tracker and skipped flag (meta.json), the parameter after
   each iteration (`scaler.<it>.w`) and the clip norms (`scaler.total_norm`), with unscale_ +
   clip_grad_norm_(1.0) between backward and step as timm's NativeScaler does.
5. `sampler`: `torch.utils.data.DistributedSampler(...).set_epoch(e)` index lists for several
   (n, world, rank, epoch, seed, shuffle) cases, including padding larger than the dataset.

Everything is seeded; re-running reproduces the same files.
"""
import json
import math
import os
import sys
from collections import OrderedDict

import torch
import torch.nn as nn
from safetensors.torch import save_file

import timm
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV2

torch.set_num_threads(2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "fixtures", "train", "optim")

tensors = OrderedDict()
meta = OrderedDict()
meta["versions"] = {"torch": torch.__version__, "timm": timm.__version__}


def put(key, t):
    tensors[key] = t.detach().clone().contiguous()


# ------------------------------------------------------------------------------------------------
# 1. SGD / AdamW with clipping and timm's weight-decay groups
# ------------------------------------------------------------------------------------------------
PARAMS = [
    ("backbone.conv_stem.weight", (8, 3, 3, 3)),
    ("backbone.bn1.weight", (8,)),
    ("backbone.bn1.bias", (8,)),
    ("backbone.blocks.0.0.conv_dw.weight", (8, 1, 3, 3)),
    ("fpn.cell.0.fnode.0.combine.edge_weights", (2,)),
    ("class_net.predict.conv_pw.weight", (6, 8, 1, 1)),
    ("class_net.predict.conv_pw.bias", (6,)),
    ("head.fc.weight", (4, 5)),
    ("head.fc.bias", (4,)),
]
NO_GRAD_AT = {("backbone.blocks.0.0.conv_dw.weight", 1)}  # (param, step index) with grad None
GRAD_SCALE = [6.0, 0.9, 3.5]  # total norms around 25 (clipped), 4 (not clipped), 14 (clipped)
MAX_NORM = 10.0


def build_module():
    """An nn.Module whose named_parameters() are exactly PARAMS (nested submodules)."""
    root = nn.Module()
    g = torch.Generator().manual_seed(1234)
    for name, shape in PARAMS:
        parts = name.split(".")
        mod = root
        for p in parts[:-1]:
            if not hasattr(mod, p):
                mod.add_module(p, nn.Module())
            mod = getattr(mod, p)
        if name.endswith("bn1.weight"):
            init = 1.0 + 0.2 * torch.randn(shape, generator=g)
        else:
            init = 0.3 * torch.randn(shape, generator=g)
        mod.register_parameter(parts[-1], nn.Parameter(init))
    return root


g_grads = torch.Generator().manual_seed(99)
GRADS = []
for step, scale in enumerate(GRAD_SCALE):
    gs = OrderedDict()
    for name, shape in PARAMS:
        gval = scale * torch.randn(shape, generator=g_grads) / math.sqrt(len(PARAMS))
        if (name, step) in NO_GRAD_AT:
            continue
        gs[name] = gval
        put(f"grad.{step}.{name}", gval)
    GRADS.append(gs)

model0 = build_module()
assert [n for n, _ in model0.named_parameters()] == [n for n, _ in PARAMS]
for name, p in model0.named_parameters():
    put(f"init.{name}", p)


def run_optimizer(tag, make_opt, lrs, state_keys):
    model = build_module()
    params = dict(model.named_parameters())
    opt = make_opt(model)
    norms = []
    for step, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        for name, p in params.items():
            p.grad = GRADS[step][name].clone() if name in GRADS[step] else None
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        norms.append(float(norm))
        if tag == "sgd":  # the clipped gradients are the same for every optimizer
            for name, p in params.items():
                if p.grad is not None:
                    put(f"clipped.{step}.{name}", p.grad)
        opt.step()
        for name, p in params.items():
            put(f"{tag}.{step}.{name}", p)
            st = opt.state.get(p, {})
            for k in state_keys:
                if k in st:
                    put(f"{tag}.{step}.{name}.{k}", st[k])
    put(f"{tag}.total_norm", torch.tensor(norms, dtype=torch.float32))
    return opt


def decay_flags(model, wd):
    groups = param_groups_weight_decay(model, wd)
    names = {id(p): n for n, p in model.named_parameters()}
    flags = {}
    for grp in groups:
        for p in grp["params"]:
            flags[names[id(p)]] = grp["weight_decay"] != 0.0
    return flags


SGD_WD = 0.01
SGD_LRS = [0.08, 0.05, 0.02]
ADAMW_WD = 0.05
ADAMW_LRS = [1e-3, 2e-3, 5e-4]


def make_sgd(nesterov):
    # timm create_optimizer_v2('momentum'): SGD over param_groups_weight_decay groups.
    return lambda m: torch.optim.SGD(
        param_groups_weight_decay(m, SGD_WD), lr=SGD_LRS[0], momentum=0.9, nesterov=nesterov
    )


run_optimizer("sgd", make_sgd(False), SGD_LRS, ["momentum_buffer"])
run_optimizer("sgd_nesterov", make_sgd(True), SGD_LRS, ["momentum_buffer"])
run_optimizer(
    "adamw",
    lambda m: torch.optim.AdamW(
        param_groups_weight_decay(m, ADAMW_WD), lr=ADAMW_LRS[0], betas=(0.9, 0.999), eps=1e-8
    ),
    ADAMW_LRS,
    ["exp_avg", "exp_avg_sq", "step"],
)

meta["params"] = [
    {"name": n, "shape": list(s), "decay": decay_flags(model0, SGD_WD)[n]} for n, s in PARAMS
]
meta["no_grad"] = [{"name": n, "step": s} for n, s in sorted(NO_GRAD_AT)]
meta["max_norm"] = MAX_NORM
meta["sgd"] = {"lrs": SGD_LRS, "momentum": 0.9, "weight_decay": SGD_WD}
meta["adamw"] = {"lrs": ADAMW_LRS, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": ADAMW_WD}

# ------------------------------------------------------------------------------------------------
# 2. timm CosineLRScheduler
# ------------------------------------------------------------------------------------------------
def sched_values(cfg, steps):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg["lr"], momentum=0.9)
    s = CosineLRScheduler(
        opt,
        t_initial=cfg["t_initial"],
        lr_min=cfg["lr_min"],
        cycle_mul=cfg.get("cycle_mul", 1.0),
        cycle_decay=cfg.get("cycle_decay", 1.0),
        cycle_limit=cfg.get("cycle_limit", 1),
        warmup_t=cfg["warmup_t"],
        warmup_lr_init=cfg["warmup_lr_init"],
        warmup_prefix=cfg.get("warmup_prefix", False),
        t_in_epochs=cfg["t_in_epochs"],
        k_decay=cfg.get("k_decay", 1.0),
    )
    initial = opt.param_groups[0]["lr"]
    out = []
    for t in steps:
        if cfg["t_in_epochs"]:
            s.step(t)
        else:
            s.step_update(t)
        out.append(opt.param_groups[0]["lr"])
    return initial, out


# effdet recipe per update: lr 0.08 * B / 64, warm-up 1 epoch from 0.008, 300 epochs, min 1e-5.
BATCH = 128
UPE = 925  # ceil(118287 / 128) updates per epoch
recipe = {
    "lr": 0.08 * BATCH / 64,
    "lr_min": 1e-5,
    "warmup_t": 1 * UPE,
    "warmup_lr_init": 0.008,
    "t_initial": 300 * UPE,
    "t_in_epochs": False,
    "updates_per_epoch": UPE,
    "batch": BATCH,
}
total = 300 * UPE
steps = sorted(
    set(range(0, total + 3 * UPE, 97))
    | set(range(0, 40))
    | set(range(UPE - 20, UPE + 20))
    | set(range(total - 5, total + 5))
)
# effdet train.py defaults (per epoch): lr 0.01, warmup-lr 1e-4, 5 warm-up epochs, min-lr 1e-5,
# 300 epochs + 10 cooldown epochs.
trainpy = {
    "lr": 0.01,
    "lr_min": 1e-5,
    "warmup_t": 5,
    "warmup_lr_init": 1e-4,
    "t_initial": 300,
    "t_in_epochs": True,
}
# exercise the rarely used knobs too: restarts with a cycle multiplier, per-cycle decay, k-decay,
# warm-up prefix.
odd = {
    "lr": 0.5,
    "lr_min": 0.01,
    "warmup_t": 7,
    "warmup_lr_init": 0.05,
    "warmup_prefix": True,
    "t_initial": 40,
    "cycle_mul": 1.5,
    "cycle_decay": 0.5,
    "cycle_limit": 3,
    "k_decay": 1.7,
    "t_in_epochs": True,
}
odd2 = dict(odd, cycle_mul=1.0, warmup_prefix=False, k_decay=1.0, cycle_limit=2)
meta["sched"] = {}
for name, cfg, st in [
    ("recipe", recipe, steps),
    ("trainpy", trainpy, list(range(0, 311))),
    ("odd", odd, list(range(0, 200))),
    ("odd2", odd2, list(range(0, 120))),
]:
    initial, vals = sched_values(cfg, st)
    put(f"sched.{name}.steps", torch.tensor(st, dtype=torch.int64))
    put(f"sched.{name}.lr", torch.tensor(vals, dtype=torch.float64))
    meta["sched"][name] = dict(cfg, initial_lr=initial)

# ------------------------------------------------------------------------------------------------
# 3. timm ModelEmaV2
# ------------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


torch.manual_seed(5)
tiny = Tiny()
with torch.no_grad():
    tiny.bn.weight.uniform_(0.5, 1.5)
    tiny.bn.bias.normal_(0.0, 0.3)
emas = {"0.9998": ModelEmaV2(tiny, decay=0.9998), "0.9": ModelEmaV2(tiny, decay=0.9)}
EMA_UPDATES = 4
for k, v in tiny.state_dict().items():
    if v.is_floating_point():
        put(f"model.init.{k}", v)
g_ema = torch.Generator().manual_seed(77)
for u in range(EMA_UPDATES):
    with torch.no_grad():
        for p in tiny.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g_ema))
    tiny.train()
    tiny(torch.randn(2, 3, 6, 6, generator=g_ema) * 2 + 0.5)
    for k, v in tiny.state_dict().items():
        if v.is_floating_point():
            put(f"model.{u}.{k}", v)
    for dname, ema in emas.items():
        ema.update(tiny)
        for k, v in ema.module.state_dict().items():
            if v.is_floating_point():
                put(f"ema.{dname}.{u}.{k}", v)
meta["ema"] = {
    "decays": list(emas.keys()),
    "updates": EMA_UPDATES,
    "keys": [k for k, v in tiny.state_dict().items() if v.is_floating_point()],
}

# ------------------------------------------------------------------------------------------------
# 4. GradScaler
# ------------------------------------------------------------------------------------------------
scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_factor=2.0, backoff_factor=0.5,
                              growth_interval=3)
w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float32))
put("scaler.init.w", w)
sopt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
g_sc = torch.Generator().manual_seed(3)
trace = []
SCALER_ITERS = 12
norms = []
for it in range(SCALER_ITERS):
    c = torch.randn(4, generator=g_sc)
    if it == 4:
        c[1] = 1e38  # the scaled gradient overflows to inf
    if it == 8:
        c[3] = float("nan")
    put(f"scaler.{it}.c", c)
    scale_before = scaler.get_scale()
    sopt.zero_grad()
    loss = (w * c).sum()
    scaler.scale(loss).backward()
    before = w.detach().clone()
    scaler.unscale_(sopt)
    norm = torch.nn.utils.clip_grad_norm_([w], 1.0)
    scaler.step(sopt)
    scaler.update()
    skipped = bool(torch.equal(before, w.detach()))
    trace.append({
        "scale_before": scale_before,
        "scale_after": scaler.get_scale(),
        "growth_tracker": int(scaler._growth_tracker.item()),
        "skipped": skipped,
    })
    norms.append(float(norm))
    put(f"scaler.{it}.w", w)
put("scaler.total_norm", torch.tensor(norms, dtype=torch.float32))
meta["scaler"] = {"init_scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                  "growth_interval": 3, "iterations": SCALER_ITERS, "lr": 0.1, "momentum": 0.9, "max_norm": 1.0,
                  "trace": trace}

# ------------------------------------------------------------------------------------------------
# 5. DistributedSampler
# ------------------------------------------------------------------------------------------------
from torch.utils.data import DistributedSampler  # noqa: E402

cases = []
for n, world, seed, epochs, shuffle in [
    (10, 4, 0, [0, 1, 2], True),
    (7, 3, 42, [0, 5], True),
    (3, 8, 0, [0, 1], True),
    (1000, 8, 1234, [0, 17], True),
    (11, 4, 0, [0], False),
    (0, 2, 0, [0], True),
    (1, 1, 0, [0, 1], True),
    (50, 1, 7, [3], True),
]:
    for epoch in epochs:
        for rank in range(world):
            s = DistributedSampler(list(range(n)), num_replicas=world, rank=rank, shuffle=shuffle,
                                   seed=seed)
            s.set_epoch(epoch)
            cases.append({"n": n, "world": world, "rank": rank, "epoch": epoch, "seed": seed,
                          "shuffle": shuffle, "indices": list(s)})
# the raw permutation too, to localise a mismatch to randperm vs the padding / striding
perms = []
for n, seed in [(1, 0), (2, 0), (5, 3), (10, 0), (10, 1), (100, 42), (1000, 1234)]:
    perms.append({"n": n, "seed": seed,
                  "perm": torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()})
meta["sampler"] = {"cases": cases, "randperm": perms}

os.makedirs(OUT, exist_ok=True)
save_file(tensors, os.path.join(OUT, "optim.safetensors"))
with open(os.path.join(OUT, "meta.json"), "w") as f:
    json.dump(meta, f, separators=(",", ":"), allow_nan=False)
    f.write("\n")
print(f"wrote {len(tensors)} tensors and meta.json to {OUT}")
for name, cfg in meta["sched"].items():
    print("sched", name, "initial lr", cfg["initial_lr"])
for t in trace:
    print("scaler", t)
