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
# run whose loss became non-finite is marked `diverged` (train's messages are in <run>.stderr)
# and not retried; any other failure stops the sweep.
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
      run=()
      if [ -f "$out/final.safetensors" ] || [ -f "$out/diverged" ]; then
        echo "$name: done"
      elif [ -f "$log" ] && [ ! -d "$out" ]; then
        # a log in results/ whose run is not here finished in an earlier checkout (a log is
        # copied there only when its run has ended): target/ is not kept between checkouts
        echo "$name: done (log from an earlier checkout)"
      elif ls "$out"/checkpoint-*.safetensors >/dev/null 2>&1; then
        echo "$name: resuming"
        run=(--data target/cifar10/train --out "$out" --resume "$out" --keep 1 --quiet)
      else
        echo "$name: starting, at most $cap epochs"
        init=()
        [ "$condition" = paper ] && init=(--init paper --input-scale 1)
        run=(--preset "fig1-$unit" --data target/cifar10/train --out "$out" --lr "$lr" --epochs "$cap"
          --target-train-error 0.25 "${init[@]}" --keep 1 --quiet)
      fi
      if [ ${#run[@]} -gt 0 ]; then
        # train's messages also go to <run>.stderr; the tee ignores Ctrl-C, so that it outlives
        # train and takes its last words (where the checkpoint is) rather than breaking its pipe
        rc=0
        "$bin" train "${run[@]}" 2> >(trap '' INT; exec tee -a "$out.stderr" >&2) || rc=$?
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
      if [ -n "$reached" ] && { [ -z "$best" ] || [ "$reached" -lt "$best" ]; }; then best=$reached; fi
    done
  done
done
