"""Epochs until a run's training error first falls below a threshold (the paper's Figure 1).

    python3 scripts/epochs_to_error.py [--below 0.25] LOG.jsonl...

Reads the end-of-epoch lines of `alexnet train` logs (`epoch_train_top1_error`: the error over
all training images of the epoch, as they were seen during training).
"""
import argparse
import json

ap = argparse.ArgumentParser()
ap.add_argument("--below", type=float, default=0.25)
ap.add_argument("logs", nargs="+")
args = ap.parse_args()
for path in args.logs:
    epochs = [json.loads(l) for l in open(path) if '"epoch_train_top1_error"' in l]
    hit = next((e for e in epochs if e["epoch_train_top1_error"] < args.below), None)
    last = epochs[-1] if epochs else None
    if hit:
        print(f"{path}: below {100 * args.below:.0f}% after epoch {int(hit['epoch'])} ({100 * hit['epoch_train_top1_error']:.2f}%)")
    else:
        print(f"{path}: not below {100 * args.below:.0f}% in {len(epochs)} epochs (last {100 * last['epoch_train_top1_error']:.2f}%)" if last else f"{path}: no epochs")
