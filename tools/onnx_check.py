#!/usr/bin/env python3
"""Checks an ONNX file written by `effdet export` with ONNX's own tools and runs it with ONNX
Runtime against our engine's outputs (tests/onnx_export.rs).

Usage: onnx_check.py MODEL.onnx CASE.json [--reference | --dump]

CASE.json: {"input": {"file": F, "shape": [...]}, "outputs": {NAME: {"file": F, "shape":
[...]}, ...}} with raw little-endian float32 files beside it (what our CPU engine computed).

Runs onnx.checker.check_model(full_check=True) (structure and shape inference), then ONNX
Runtime's CPU provider (all graph optimisations, 2 intra-op threads) on the input, and with
--reference also ONNX's reference evaluator (onnx.reference: every op as its specification
defines it, in numpy float32), and prints one JSON object: the opset, the metadata, the input
and output names and shapes ONNX Runtime sees, and per output and runtime the relative L2 error
against ours and the largest absolute difference. With --dump (CASE.json then needs only the
input) it prints ONNX Runtime's outputs themselves instead, as lists. Exit status 0 unless a
tool fails.
"""
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort


def load(case_dir, entry):
    return np.fromfile(os.path.join(case_dir, entry["file"]), dtype="<f4").reshape(entry["shape"])


def main():
    model_path, case_path = sys.argv[1], sys.argv[2]
    case_dir = os.path.dirname(os.path.abspath(case_path))
    case = json.load(open(case_path))
    model = onnx.load(model_path)
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    x = load(case_dir, case["input"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x})))
    result = {
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "opset": [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")],
        "inputs": {i.name: i.shape for i in sess.get_inputs()},
        "outputs": {},
        "metadata": {p.key: p.value for p in model.metadata_props},
    }
    if "--dump" in sys.argv[3:]:
        result["values"] = {name: v.tolist() for name, v in got.items()}
        print(json.dumps(result))
        return
    runs = {"onnxruntime": got}
    if "--reference" in sys.argv[3:]:
        from onnx.reference import ReferenceEvaluator

        ref = ReferenceEvaluator(model)
        out_names = [o.name for o in model.graph.output]
        runs["reference"] = dict(zip(out_names, ref.run(out_names, {model.graph.input[0].name: x})))
    for runtime, outs in runs.items():
        result[runtime] = {}
        for name, entry in case["outputs"].items():
            g = outs[name].astype(np.float64)
            w = load(case_dir, entry).astype(np.float64)
            result[runtime][name] = {
                "shape": list(outs[name].shape),
                "rel_l2": float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)),
                "max_abs": float(np.max(np.abs(g - w))),
            }
    result["outputs"] = result["onnxruntime"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
