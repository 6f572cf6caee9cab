#!/usr/bin/env bash
# Figure 1 the paper's way (issue 26): the four-layer net with ReLU and with tanh units on all
# 50,000 CIFAR-10 training images, no regularisation (recipe fig1), until an epoch's training
# error is below 25%, for each learning rate of a sweep (5 rates, ~3x apart), under two
# conditions:
#   pytorch: PyTorch's fan-in initialisation, inputs (pixel - mean image) / 57.6
#   paper:   the paper's initialisation (weights N(0, 0.01); biases 1 in conv2, as the paper's
#            rule names it, else 0), inputs pixel - mean image on the 0..255 scale
# Each run goes to target/runs/fig1/<unit>-<condition>-lr<rate> and its log to
# results/fig1/<unit>-<condition>-lr<rate>.jsonl. Rerunning skips finished runs and resumes an
# interrupted one from its newest checkpoint, so the sweep can be stopped (Ctrl-C) and continued.
#   scripts/fig1_sweep.sh [CONDITION...]        (default: paper pytorch)
# EPOCHS caps every run (default 40; see the order below); run it niced beside other work. A
# run whose loss became non-finite is marked `diverged` (its message in <run>.stderr) and not
# retried.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN:-target/release/alexnet}  # BIN: a copy, so that rebuilding during a sweep is safe
[ -d target/cifar10/train ] || { mkdir -p target/cifar10 && tar xzf ../shared/data/cifar10-jpeg.tar.gz -C target/cifar10; }
mkdir -p results/fig1 target/runs/fig1
rates() {
  case "$1" in
    pytorch) echo 0.001 0.003 0.01 0.03 0.1 ;;
    paper) echo 0.0001 0.0003 0.001 0.003 0.01 ;;  # inputs 57.6x larger: the rates shift down
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
# The middle rate first, then outwards: once one rate reaches the mark in B epochs, the others
# of that unit and condition run at most 2B epochs (enough to say they are slower), so the
# sweep spends its time near the best rate.
order=(2 3 1 4 0)
for condition in ${@:-paper pytorch}; do
  for unit in relu tanh; do
    read -r -a lrs <<< "$(rates "$condition")"
    best=""
    for i in "${order[@]}"; do
      lr=${lrs[$i]}
      name="$unit-$condition-lr$lr"
      out="target/runs/fig1/$name"
      cap=${EPOCHS:-40}
      [ -n "$best" ] && cap=$((2 * best < cap ? 2 * best : cap))
      log="results/fig1/$name.jsonl"
      if [ -f "$out/final.safetensors" ] || [ -f "$out/diverged" ]; then
        echo "$name: done"; rc=0
      elif [ -f "$log" ] && [ ! -d "$out" ]; then
        # a log in results/ whose run is not here finished in an earlier checkout (a log is
        # copied there only when its run has ended): target/ is not kept between checkouts
        echo "$name: done (log from an earlier checkout)"; rc=0
      elif ls "$out"/checkpoint-*.safetensors >/dev/null 2>&1; then
        echo "$name: resuming"
        rc=0; $bin train --data target/cifar10/train --out "$out" --resume "$out" --keep 1 --quiet || rc=$?
      else
        echo "$name: starting, at most $cap epochs"
        init=()
        [ "$condition" = paper ] && init=(--init paper --input-scale 1)
        rc=0; $bin train --preset "fig1-$unit" --data target/cifar10/train --out "$out" --lr "$lr" \
          --epochs "$cap" --target-train-error 0.25 "${init[@]}" --keep 1 --quiet \
          2> >(tee "$out.stderr" >&2) || rc=$?
      fi
      # Ctrl-C: train saved a checkpoint and exits with 130; stop here, so that the partial log
      # is not taken for a finished run. Any other failure is a rate too high for the net (a
      # non-finite loss): recorded, and the sweep goes on.
      [ "$rc" = 130 ] && { echo "$name: interrupted; rerun to continue"; exit 130; }
      [ "$rc" != 0 ] && { mkdir -p "$out" && touch "$out/diverged"; }
      [ -f "$out/log.jsonl" ] && cp "$out/log.jsonl" "$log"
      reached=$(epochs_to_mark "$log")
      if [ -n "$reached" ] && { [ -z "$best" ] || [ "$reached" -lt "$best" ]; }; then best=$reached; fi
    done
  done
done
