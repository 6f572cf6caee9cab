#!/usr/bin/env bash
# The training experiments of results/, with their exact commands.
#   scripts/experiments.sh memorise|fig1-relu|fig1-tanh|cifar-towers
# Data: target/imagenet100 (100 of ../shared/data/imagenet-sample, one class each) and
# target/cifar10 (../shared/data/cifar10-jpeg.tar.gz extracted); made here if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/alexnet
if [ ! -d target/imagenet100 ]; then
  for f in $(ls ../shared/data/imagenet-sample/*.JPEG | head -100); do
    n=$(basename "$f" .JPEG); mkdir -p "target/imagenet100/$n"; ln -sf "$(realpath "$f")" "target/imagenet100/$n/"
  done
fi
if [ ! -d target/cifar10/train ]; then
  mkdir -p target/cifar10 && tar xzf ../shared/data/cifar10-jpeg.tar.gz -C target/cifar10
fi
case "$1" in
  memorise)
    # the paper preset at 227x227 (towers, LRN, the paper's SGD rule), augmentation and dropout
    # off, until no training errors. The paper's N(0, 0.01) init on 0..255 inputs barely moves
    # in the first epochs on 100 images, so this uses PyTorch's init, torchvision-scaled inputs
    # and lr 0.03 (0.05 oscillates in a probe on 10 images).
    $bin train --preset paper --data target/imagenet100 --out target/runs/memorise \
      --no-augment --no-dropout --batch-size 20 --epochs 150 --lr 0.03 --init torchvision \
      --input-scale 0.01736 --target-train-error 0.001 --keep 1 --quiet ;;
  fig1-relu|fig1-tanh)
    # Figure 1: the four-layer net, a fixed balanced subset of 10,000 CIFAR-10 training images,
    # no regularisation (recipe fig1), until the epoch's training error is below 25%
    $bin train --preset "$1" --data target/cifar10/train --out "target/runs/$1" \
      --limit 10000 --lr "${LR:-0.01}" --epochs "${EPOCHS:-80}" --target-train-error 0.25 --keep 1 --quiet ;;
  cifar-towers)
    # the two-tower net at CIFAR scale, paper recipe, validated on the 10,000 test images
    $bin train --preset cifar-towers --data target/cifar10/train --val target/cifar10/test \
      --out target/runs/cifar-towers --epochs "${EPOCHS:-30}" --lr 0.01 --keep 1 --quiet ;;
  *) echo "unknown experiment $1" >&2; exit 2 ;;
esac
