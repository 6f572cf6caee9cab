"""Epochs until a run's training error first falls below a threshold (the paper's Figure 1).

    python3 scripts/epochs_to_error.py [--below 0.25] LOG.jsonl...
    python3 scripts/epochs_to_error.py --sweep results/fig1/*-lr*.jsonl

Reads the end-of-epoch lines of `alexnet train` logs (`epoch_train_top1_error`: the error over
all training images of the epoch, as they were seen during training). With `--sweep`, the logs
of `scripts/fig1_sweep.sh` (named `<unit>-<condition>-lr<rate>.jsonl`) as a Markdown table:
each unit's epochs to the mark at each rate, its best rate, and per condition the ratio of
tanh's best to ReLU's best (the paper's "six times faster"), or a bound on it where no tanh
run reached the mark.
"""
import argparse
import json
import os
import re


def epochs_to(path, below):
    """(epoch at which the error first fell below `below` or None, epochs run, last error)."""
    epochs = [json.loads(l) for l in open(path) if '"epoch_train_top1_error"' in l]
    hit = next((e for e in epochs if e["epoch_train_top1_error"] < below), None)
    last = epochs[-1]["epoch_train_top1_error"] if epochs else None
    return (int(hit["epoch"]) if hit else None), len(epochs), last


def sweep(paths, below):
    runs = {}
    for path in paths:
        m = re.fullmatch(r"(relu|tanh)-(\w+)-lr([0-9.e-]+)\.jsonl", os.path.basename(path))
        if m:
            runs[(m.group(2), m.group(1), float(m.group(3)))] = epochs_to(path, below)
    print(f"| condition | unit | learning rate | epochs to {100 * below:.0f}% training error |")
    print("|---|---|---|---|")
    best = {}
    for (condition, unit, lr) in sorted(runs):
        hit, ran, last = runs[(condition, unit, lr)]
        if hit is not None and (best.get((condition, unit)) is None or hit < best[(condition, unit)][0]):
            best[(condition, unit)] = (hit, lr)
    for (condition, unit, lr) in sorted(runs):
        hit, ran, last = runs[(condition, unit, lr)]
        if hit is not None:
            cell = f"**{hit}**" if best[(condition, unit)] == (hit, lr) else str(hit)
        elif last is None:
            cell = "no epoch finished"
        else:
            cell = f"not in {ran} (last {100 * last:.1f}%)"
        print(f"| {condition} | {unit} | {lr:g} | {cell} |")
    for condition in sorted({c for c, _ in best}):
        r, t = best.get((condition, "relu")), best.get((condition, "tanh"))
        # where no tanh run reached the mark, each rate needs more than its own run's epochs, so
        # tanh's best needs more than the shortest run's: the bound (runs with no epoch left out)
        tanh_ran = min((runs[k][1] for k in runs if k[:2] == (condition, "tanh") and runs[k][1]), default=0)
        if r and t:
            print(f"\n{condition}: ReLU {r[0]} epochs at lr {r[1]:g}, tanh {t[0]} at lr {t[1]:g}: "
                  f"ReLU {t[0] / r[0]:.1f}x faster")
        elif r and tanh_ran:
            print(f"\n{condition}: ReLU {r[0]} epochs at lr {r[1]:g}, tanh not within {tanh_ran} at any "
                  f"rate tried: ReLU more than {tanh_ran / r[0]:.1f}x faster")


ap = argparse.ArgumentParser()
ap.add_argument("--below", type=float, default=0.25)
ap.add_argument("--sweep", action="store_true", help="the Figure 1 sweep's table and ratios")
ap.add_argument("logs", nargs="+")
args = ap.parse_args()
if args.sweep:
    sweep(args.logs, args.below)
else:
    for path in args.logs:
        hit, ran, last = epochs_to(path, args.below)
        if hit is not None:
            print(f"{path}: below {100 * args.below:.0f}% after epoch {hit}")
        elif last is not None:
            print(f"{path}: not below {100 * args.below:.0f}% in {ran} epochs (last {100 * last:.2f}%)")
        else:
            print(f"{path}: no epochs")
