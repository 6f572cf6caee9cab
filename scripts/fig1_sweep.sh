#!/usr/bin/env bash
# Figure 1 the paper's way (issue 26): the four-layer net with ReLU and with tanh units on all
# 50,000 CIFAR-10 training images, no regularisation (recipe fig1), until an epoch's training
# error is below 25%, for each learning rate of a sweep (5 rates ~3x apart, and more where the
# fastest is at an end), under two conditions:
#   pytorch: PyTorch's fan-in initialisation, inputs (pixel - mean image) / 57.6
#   paper:   the paper's initialisation (weights N(0, 0.01); biases 1 in conv2, as the paper's
#            rule names it, else 0), inputs pixel - mean image on the 0..255 scale
# Each run goes to target/runs/fig1/<unit>-<condition>-lr<rate> and its log to
# results/fig1/<unit>-<condition>-lr<rate>.jsonl. Rerunning skips finished runs and resumes an
# interrupted one from its newest checkpoint, so the sweep can be stopped (Ctrl-C) and continued.
#   scripts/fig1_sweep.sh [CONDITION...]        (default: paper pytorch)
# EPOCHS caps every run (default 40; see the order below); run it niced beside other work. A
# run whose loss became non-finite is marked `diverged` (train's messages are in <run>.stderr)
# and not retried; any other failure stops the sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN:-target/release/alexnet}  # BIN: a copy, so that rebuilding during a sweep is safe
[ -d target/cifar10/train ] || { mkdir -p target/cifar10 && tar xzf ../shared/data/cifar10-jpeg.tar.gz -C target/cifar10; }
mkdir -p results/fig1 target/runs/fig1
# The rates come from the 1-3-10 grid; each condition's five from `first`: the lowest's place
# (the paper's inputs are 57.6x larger, so its rates are lower)
grid=(0.00001 0.00003 0.0001 0.0003 0.001 0.003 0.01 0.03 0.1 0.3 1)
first() {
  case "$1" in
    pytorch) echo 4 ;;  # 0.001 - 0.1
    paper) echo 2 ;;    # 0.0001 - 0.01
  esac
}
# The epoch at which a run's log first shows an epoch's training error below 25% (empty if none).
epochs_to_mark() {
  [ -f "$1" ] || return 0
  python3 -c '
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    e = d.get("epoch_train_top1_error")
    if e is not None and e < 0.25:
        print(int(d["epoch"])); break' "$1"
}
# One run of unit $1 under condition $2 at grid rate $3 for at most $4 epochs: skipped where it
# finished, resumed where it was interrupted. Sets `reached`, the epoch of the mark (or empty).
run() {
  local unit=$1 condition=$2 lr=$3 cap=$4
  local name="$unit-$condition-lr$lr"
  local out="target/runs/fig1/$name" log="results/fig1/$name.jsonl"
  local args=()
  if [ -f "$out/final.safetensors" ] || [ -f "$out/diverged" ]; then
    echo "$name: done"
  elif [ -f "$log" ] && [ ! -d "$out" ]; then
    # a log in results/ whose run is not here finished in an earlier checkout (a log is
    # copied there only when its run has ended): target/ is not kept between checkouts
    echo "$name: done (log from an earlier checkout)"
  elif ls "$out"/checkpoint-*.safetensors >/dev/null 2>&1; then
    echo "$name: resuming"
    args=(--data target/cifar10/train --out "$out" --resume "$out" --keep 1 --quiet)
  else
    echo "$name: starting, at most $cap epochs"
    local init=()
    [ "$condition" = paper ] && init=(--init paper --input-scale 1)
    args=(--preset "fig1-$unit" --data target/cifar10/train --out "$out" --lr "$lr" --epochs "$cap"
      --target-train-error 0.25 "${init[@]}" --keep 1 --quiet)
  fi
  if [ ${#args[@]} -gt 0 ]; then
    # train's messages also go to <run>.stderr; the tee ignores Ctrl-C, so that it outlives
    # train and takes its last words (where the checkpoint is) rather than breaking its pipe
    local rc=0
    "$bin" train "${args[@]}" 2> >(trap '' INT; exec tee -a "$out.stderr" >&2) || rc=$?
    if [ "$rc" = 130 ]; then
      # Ctrl-C: train saved a checkpoint; stop, so that the partial log is not taken for a
      # finished run
      echo "$name: interrupted; rerun to continue"
      exit 130
    elif [ "$rc" != 0 ] && grep -q "the loss became" "$out.stderr"; then
      # a rate too high for the net: recorded, and the sweep goes on
      mkdir -p "$out" && touch "$out/diverged"
    elif [ "$rc" != 0 ]; then
      echo "$name: train failed (exit $rc; its messages are in $out.stderr)" >&2
      exit "$rc"
    fi
  fi
  [ -f "$out/log.jsonl" ] && cp "$out/log.jsonl" "$log"
  reached=$(epochs_to_mark "$log")
}

# Each unit's five rates, the middle first, then outwards: once a rate reaches the mark in B
# epochs, later runs stop at 2B (or EPOCHS, default 40), enough to say they are slower, so the
# sweep spends its time near the best rate. Where the fastest is the highest or lowest rate run,
# the next grid rate beyond it runs too (up to two beyond each end), so that the best rate is
# one with a slower rate on each side.
# The grid rate $1 for the current unit and condition; keeps the fastest (best, best_at).
try() {
  local cap=${EPOCHS:-40}
  [ -n "$best" ] && cap=$((2 * best < cap ? 2 * best : cap))
  run "$unit" "$condition" "${grid[$1]}" "$cap"
  if [ -n "$reached" ] && { [ -z "$best" ] || [ "$reached" -lt "$best" ]; }; then
    best=$reached best_at=$1
  fi
}
for condition in ${@:-paper pytorch}; do
  for unit in relu tanh; do
    lo=$(first "$condition")
    best="" best_at=""
    for k in 2 3 1 4 0; do try $((lo + k)); done
    low=$lo high=$((lo + 4))
    while [ "$best_at" = "$high" ] && [ $high -lt $((lo + 6)) ] && [ $((high + 1)) -lt ${#grid[@]} ]; do
      high=$((high + 1)); try $high
    done
    while [ "$best_at" = "$low" ] && [ $low -gt $((lo - 2)) ] && [ $low -gt 0 ]; do
      low=$((low - 1)); try $low
    done
  done
done
