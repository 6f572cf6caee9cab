"""This crate against PyTorch (eager) and ONNX Runtime, same shapes, same threads.

    python3 scripts/bench_peers.py [--venv ../venv-bench] [--threads 2] [--batch-sizes 1,16,64] [--rounds 3]
                                   [--levels native,avx2]

Creates the venv (torch, torchvision, onnxruntime, onnx from PyPI) unless it exists, re-runs
itself inside it, then measures forward throughput of the paper/caffe net (227, groups, LRN)
and torchvision's net (224) in PyTorch and ONNX Runtime, runs `alexnet bench` for the same
presets and batch sizes, and prints one table with images/s and the ratios. `--train` adds a
training step (forward, backward, SGD with momentum) at batch 32. Random weights; median of
`--runs` runs after warm-up. Peak memory: each engine's process's maximum RSS.

On a shared machine the speed drifts from minute to minute, and the engines are measured
minutes apart: `--rounds R` measures the peers and this crate in turn R times and reports each
engine's median over the rounds, the ratio of the medians, and the range of the rounds' ratios.

`--levels native,avx2` measures every engine a second time held to AVX2 + FMA, in the same
rounds: this crate with `ALEXNET_ISA=avx2`, PyTorch with `ATEN_CPU_CAPABILITY=avx2` (its own
kernels) and `ONEDNN_MAX_CPU_ISA=AVX2` (oneDNN's convolutions and GEMMs), so that the AVX2
ratios are against peers at the same level. ONNX Runtime has no such switch (its MLAS kernels
choose by CPUID): its AVX2 column is left empty.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from peer_venv import ensure_venv

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def paper_net():
    import torch.nn as nn

    class Paper(nn.Module):
        def __init__(self):
            super().__init__()
            lrn = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
            self.features = nn.Sequential(
                nn.Conv2d(3, 96, 11, 4), nn.ReLU(), lrn, nn.MaxPool2d(3, 2),
                nn.Conv2d(96, 256, 5, padding=2, groups=2), nn.ReLU(), lrn, nn.MaxPool2d(3, 2),
                nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(),
                nn.Conv2d(384, 384, 3, padding=1, groups=2), nn.ReLU(),
                nn.Conv2d(384, 256, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(3, 2))
            self.classifier = nn.Sequential(
                nn.Flatten(), nn.Linear(9216, 4096), nn.ReLU(), nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(),
                nn.Dropout(), nn.Linear(4096, 1000))

        def forward(self, x):
            return self.classifier(self.features(x))

    return Paper()


def median_rate(fn, batch, runs, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def onnx_session(model, side, threads):
    """ONNX Runtime on `model` exported at opset 17; the export (0.25 GB) is deleted once loaded."""
    import onnxruntime as ort
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(model, torch.randn(1, 3, side, side), path, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}}, opset_version=17, dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def peers(args):
    import numpy as np
    import torch
    import torchvision

    torch.set_num_threads(args.threads)
    rows = {}
    for preset, side, make in [("paper", 227, paper_net), ("torchvision", 224, torchvision.models.alexnet)]:
        model = make().eval()
        session = onnx_session(model, side, args.threads)
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, side, side)
            with torch.no_grad():
                rows[(preset, "forward", batch, "pytorch")] = median_rate(lambda: model(x), batch, args.runs, 2)
            xn = x.numpy()
            rows[(preset, "forward", batch, "onnxruntime")] = median_rate(lambda: session.run(None, {"x": xn}), batch, args.runs, 2)
            print(f"  measured {preset} batch {batch}", file=sys.stderr)
        if args.train:
            train_model = make().train()
            opt = torch.optim.SGD(train_model.parameters(), lr=1e-6, momentum=0.9, weight_decay=5e-4)
            x, y = torch.randn(32, 3, side, side), torch.randint(0, 1000, (32,))

            def step():
                opt.zero_grad()
                torch.nn.functional.cross_entropy(train_model(x), y).backward()
                opt.step()

            rows[(preset, "train", 32, "pytorch")] = median_rate(step, 32, max(3, args.runs // 3), 1)
    rows_json = {"|".join(map(str, k)): v for k, v in rows.items()}
    rows_json["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rows_json


# What holds each engine to a level ("native": the CPU's best).
LEVEL_ENV = {
    "native": ({}, {}),
    "avx2": ({"ALEXNET_ISA": "avx2"}, {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
}


def ours(args, level):
    out = {}
    binary = os.path.join(ROOT, "target", "release", "alexnet")
    sizes = ",".join(map(str, args.batch_sizes))
    runs = [("forward", sizes, [])] + ([("train", "32", ["--train"])] if args.train else [])
    peak = 0.0
    for mode, batches, extra in runs:
        for preset in ["paper", "caffe", "torchvision"]:
            if mode == "train" and preset == "caffe":
                continue
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "bench.json")
                subprocess.run([binary, "bench", "--preset", preset, "--batch-sizes", batches, "--runs", str(args.runs), "--json", path, *extra],
                               check=True, env={**os.environ, "RAYON_NUM_THREADS": str(args.threads), **LEVEL_ENV[level][0]},
                               stdout=subprocess.DEVNULL)
                measured = json.load(open(path))
            for m in measured:
                out[(preset, m["mode"], m["batch"], "alexnet", level)] = m["images_per_s"]
                peak = max(peak, m["peak_rss_mib"])
    return out, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--venv", default=os.path.join(ROOT, "..", "venv-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="peers and this crate measured in turn this many times")
    ap.add_argument("--levels", default="native", help="comma-separated: native (the CPU's best), avx2")
    ap.add_argument("--peers-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.levels = args.levels.split(",")
    for level in args.levels:
        if level not in LEVEL_ENV:
            ap.error(f"--levels: {level!r} is not one of {', '.join(LEVEL_ENV)}")
    ensure_venv(os.path.abspath(args.venv), ["onnxruntime", "torch"])
    if args.peers_only:
        print(json.dumps(peers(args)))
        return
    rounds, their_peak, my_peak = [], 0.0, 0.0
    for r in range(args.rounds):
        measured = {}
        for level in args.levels:
            # the peers in their own process, so their memory is measured apart from ours
            proc = subprocess.run([sys.executable, __file__, "--peers-only", "--threads", str(args.threads), "--runs", str(args.runs),
                                   "--batch-sizes", ",".join(map(str, args.batch_sizes)), *(["--train"] if args.train else [])],
                                  check=True, capture_output=True, text=True, env={**os.environ, **LEVEL_ENV[level][1]})
            theirs_json = json.loads(proc.stdout.strip().splitlines()[-1])
            their_peak = max(their_peak, theirs_json.pop("peak_rss_mib"))
            for k, v in theirs_json.items():
                preset, mode, batch, engine = k.split("|")
                if engine == "onnxruntime" and level != "native":
                    continue  # not held to the level: see the module's doc
                measured[(preset, mode, int(batch), engine, level)] = v
            mine, peak = ours(args, level)
            my_peak = max(my_peak, peak)
            measured.update(mine)
        rounds.append(measured)
        print(f"  round {r + 1} of {args.rounds} measured at {time.strftime('%H:%M')}", file=sys.stderr)
    rate = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, {args.threads} threads, median of {args.runs} runs, "
          f"images/s; {args.rounds} round(s): each engine's median over the rounds, the ratio of the medians, "
          "and the range of the rounds' own ratios")
    print(f"| level | preset | mode | batch | alexnet | PyTorch | ONNX Runtime | vs PyTorch | vs ORT | rounds vs PyTorch | rounds vs ORT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for level, preset in [(level, preset) for level in args.levels for preset in ["paper", "caffe", "torchvision"]]:
        peer = "paper" if preset == "caffe" else preset  # the same network for the peers
        for mode, batches in [("forward", args.batch_sizes), ("train", [32] if args.train else [])]:
            for b in batches:
                a = rate.get((preset, mode, b, "alexnet", level))
                p = rate.get((peer, mode, b, "pytorch", level))
                o = rate.get((peer, mode, b, "onnxruntime", level))
                if a is None:
                    continue
                fmt = lambda v: f"{v:.1f}" if v else "-"  # noqa: E731
                ratio = lambda v: f"{a / v:.2f}x" if v else "-"  # noqa: E731

                def spread(engine):
                    ratios = [r[(preset, mode, b, "alexnet", level)] / r[(peer, mode, b, engine, level)] for r in rounds
                              if r.get((peer, mode, b, engine, level))]
                    return f"{min(ratios):.2f}-{max(ratios):.2f}x" if ratios else "-"

                print(f"| {level} | {preset} | {mode} | {b} | {fmt(a)} | {fmt(p)} | {fmt(o)} | {ratio(p)} | {ratio(o)} "
                      f"| {spread('pytorch')} | {spread('onnxruntime')} |")
    print(f"peak memory: alexnet {my_peak:.0f} MiB (largest single bench run), PyTorch + ONNX Runtime process {their_peak:.0f} MiB")


if __name__ == "__main__":
    main()
