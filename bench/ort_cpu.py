#!/usr/bin/env python3
"""ONNX Runtime peer for bench/cpu_vs_ort.sh: times an ONNX model (ours, from `effdet export`)
on the CPU execution provider.

Usage: ort_cpu.py MODEL.onnx --batch 1,8 [--threads 2] [--iters 20] [--warmup 3]

Session: all graph optimisations, `--threads` intra-op threads, one inter-op thread,
sequential execution. Input: a fixed random normal batch (ImageNet-normalised images have that
scale; timing does not depend on the values, and zeros are avoided). Prints one JSON line per
batch size: median and p90 milliseconds per image and images/s, the network alone (the
session's run, outputs into numpy arrays).
"""
import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(a.model, opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    size = inp.shape[2]
    rng = np.random.default_rng(0)
    for batch in [int(b) for b in a.batch.split(",")]:
        x = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        for _ in range(a.warmup):
            sess.run(None, {inp.name: x})
        ts = []
        for _ in range(a.iters):
            t = time.perf_counter()
            sess.run(None, {inp.name: x})
            ts.append((time.perf_counter() - t) * 1000.0 / batch)
        ts.sort()
        med = statistics.median(ts)
        print(json.dumps({
            "backend": "onnxruntime-cpu",
            "onnxruntime": ort.__version__,
            "batch": batch,
            "threads": a.threads,
            "network_ms_median": med,
            "network_ms_p90": ts[min(len(ts) - 1, round((len(ts) - 1) * 0.9))],
            "network_images_per_s": 1000.0 / med,
        }), flush=True)


if __name__ == "__main__":
    main()
