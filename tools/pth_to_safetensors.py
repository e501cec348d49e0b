#!/usr/bin/env python3
"""Convert an effdet PyTorch checkpoint (.pth) into the safetensors file effdet-rs loads.

Usage:
    python3 tools/pth_to_safetensors.py tf_efficientdet_d0_34-f153e0cf.pth \\
        models/tf_efficientdet_d0.safetensors [--dtype f32|f16] [--model tf_efficientdet_d0]

The input is the official effdet checkpoint (`tf_efficientdet_d0_34-f153e0cf.pth`, a plain
state_dict), or a training checkpoint that wraps the state_dict under 'state_dict',
'state_dict_ema' or 'model' (the EMA weights are preferred when both are present; pick one
with --key). A leading 'module.' (DistributedDataParallel) and/or 'model.' (effdet's
DetBench wrappers) prefix is stripped from every key, and the bench's 'anchors.boxes'
buffer is dropped.

The output keeps the exact effdet state_dict key names (e.g.
`backbone.blocks.1.0.conv_pw.weight`, `fpn.cell.0.fnode.4.combine.edge_weights`,
`class_net.predict.conv_pw.weight`). Float tensors are written as float32 (default) or
float16 (--dtype f16); integer tensors (BatchNorm num_batches_tracked) stay int64.

Verification (default): the model named by --model is built offline (pretrained=False,
pretrained_backbone=False, so nothing is downloaded) and the weights are loaded with
load_state_dict(strict=True); missing or unexpected keys, or shape mismatches, are a clear
error. After loading, the model's own state_dict is written (it holds exactly the
checkpoint's values; BatchNorm num_batches_tracked entries missing from an old checkpoint
are filled in as 0). --model none skips the check and writes the checkpoint's
tensors as they are.

This script never downloads anything: fetch the .pth yourself (see tools/README.md).
"""
import argparse
import sys

import torch

WRAPPER_KEYS = ('state_dict_ema', 'state_dict', 'model')
PREFIXES = ('module.', 'model.')


def die(msg):
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(1)


def load_checkpoint(path, unsafe):
    try:
        return torch.load(path, map_location='cpu', weights_only=not unsafe)
    except Exception as e:  # noqa: BLE001 - report any load failure clearly
        hint = '' if unsafe else (' (if this is a trusted training checkpoint holding non-tensor objects, '
                                  'retry with --unsafe-load)')
        die(f'cannot load {path}: {e}{hint}')


def extract_state_dict(ckpt, key=None):
    if key is not None:
        if not isinstance(ckpt, dict) or key not in ckpt:
            die(f'checkpoint has no entry {key!r}')
        sd = ckpt[key]
    elif isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        sd = ckpt  # plain state_dict (the official release format)
    elif isinstance(ckpt, dict):
        found = [k for k in WRAPPER_KEYS if k in ckpt and isinstance(ckpt[k], dict)]
        if not found:
            die('checkpoint is neither a plain state_dict nor a dict with one of '
                f'{", ".join(WRAPPER_KEYS)}; top-level keys: {sorted(ckpt)[:20]}')
        key = found[0]
        sd = ckpt[key]
        print(f'using state_dict under {key!r}')
    elif isinstance(ckpt, torch.nn.Module):
        sd = ckpt.state_dict()
    else:
        die(f'unsupported checkpoint type {type(ckpt).__name__}')
    if isinstance(sd, torch.nn.Module):
        sd = sd.state_dict()
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            die(f'entry {k!r} is not a tensor ({type(v).__name__})')
        nk = k
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if nk.startswith(p):
                    nk = nk[len(p):]
                    changed = True
        if nk == 'anchors.boxes' or nk.startswith('anchors.'):
            print(f'dropping bench buffer {k!r}')
            continue
        if nk in out:
            die(f'two checkpoint keys map to {nk!r} after prefix stripping')
        out[nk] = v
    if not out:
        die('empty state_dict')
    return out


def verify(sd, model_name):
    import effdet
    model = effdet.create_model(model_name, pretrained=False, pretrained_backbone=False, bench_task='')
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    # Old checkpoints may lack num_batches_tracked; PyTorch's BatchNorm fills it in.
    missing_real = [k for k in missing if not k.endswith('num_batches_tracked')]
    mismatched = [f'{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}'
                  for k in sd if k in expected and sd[k].shape != expected[k].shape]
    if missing_real or unexpected or mismatched:
        lines = [f'checkpoint does not match {model_name}:']
        if missing_real:
            lines.append(f'  missing keys ({len(missing_real)}):')
            lines += [f'    {k}' for k in missing_real]
        if unexpected:
            lines.append(f'  unexpected keys ({len(unexpected)}):')
            lines += [f'    {k}' for k in unexpected]
        if mismatched:
            lines.append(f'  shape mismatches ({len(mismatched)}):')
            lines += [f'    {m}' for m in mismatched]
        die('\n'.join(lines))
    if missing:  # fill them in explicitly (PyTorch only does so for old-format state_dicts)
        sd = dict(sd)
        for k in missing:
            sd[k] = torch.tensor(0, dtype=torch.long)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        die(f'load_state_dict(strict=True) failed for {model_name}:\n{e}')
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k, v in sd.items():  # the loaded model must hold exactly the checkpoint's values
        ref = v.to(out[k].dtype)
        if not torch.equal(out[k], ref):
            die(f'value of {k} changed while loading into the model')
    if missing:
        print(f'note: {len(missing)} num_batches_tracked entries were missing and are written as 0')
    print(f'verified against {model_name}: {len(out)} tensors, '
          f'{sum(v.numel() for k, v in out.items() if v.is_floating_point() and "running_" not in k):,} '
          'float parameter values (incl. BN affine), strict load OK')
    return out


def convert(sd, dtype):
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            t = v.to(torch.float16 if dtype == 'f16' else torch.float32)
            if not torch.isfinite(t).all():
                bad = 'overflows float16' if dtype == 'f16' and torch.isfinite(v).all() else 'has non-finite values'
                die(f'{k} {bad}')
            v = t
        elif v.dtype in (torch.int32, torch.int64):
            v = v.to(torch.int64)
        else:
            die(f'{k}: unsupported dtype {v.dtype}')
        out[k] = v.contiguous()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(
        description='Convert an effdet .pth checkpoint to safetensors with the same key names.',
        epilog='Example: python3 tools/pth_to_safetensors.py tf_efficientdet_d0_34-f153e0cf.pth '
               'models/tf_efficientdet_d0.safetensors')
    ap.add_argument('input', help='.pth checkpoint (plain state_dict or a dict wrapping one)')
    ap.add_argument('output', help='output .safetensors path')
    ap.add_argument('--dtype', choices=('f32', 'f16'), default='f32', help='storage type of float tensors (default f32)')
    ap.add_argument('--model', default='tf_efficientdet_d0',
                    help="effdet model name to verify the keys against (default tf_efficientdet_d0); 'none' skips")
    ap.add_argument('--key', default=None, help="use this top-level checkpoint entry (e.g. 'state_dict')")
    ap.add_argument('--unsafe-load', action='store_true',
                    help='torch.load with weights_only=False (only for trusted checkpoints holding non-tensor objects)')
    args = ap.parse_args(argv)

    from safetensors.torch import save_file

    ckpt = load_checkpoint(args.input, args.unsafe_load)
    sd = extract_state_dict(ckpt, args.key)
    print(f'read {len(sd)} tensors from {args.input}')
    if args.model.lower() != 'none':
        sd = verify(sd, args.model)
    out = convert(sd, args.dtype)
    meta = {'format': 'pt'}
    save_file(out, args.output, metadata=meta)
    nf = sum(1 for v in out.values() if v.is_floating_point())
    print(f'wrote {args.output}: {len(out)} tensors ({nf} float as {args.dtype}, {len(out) - nf} int64)')


if __name__ == '__main__':
    main()
