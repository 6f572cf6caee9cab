#!/usr/bin/env bash
# Transfer on data here (results/finetune/): the two-tower CIFAR net trained on five CIFAR-10
# classes (A: airplane, automobile, bird, cat, deer), then trained on the other five (B: dog,
# frog, horse, ship, truck) with 100 images a class, once fine-tuned from the A weights and
# once from scratch with the same budget; test accuracy on B's 5,000 test images.
#   scripts/finetune_demo.sh pretrain|finetune|report
# CIFAR-10 here is the lossy JPEG re-encode in ../shared/data (see its README).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/alexnet
d=target/finetune
if [ ! -d target/cifar10/train ]; then
  mkdir -p target/cifar10 && tar xzf ../shared/data/cifar10-jpeg.tar.gz -C target/cifar10
fi
if [ ! -d $d/ft100 ]; then
  mkdir -p $d/pretrain $d/testA $d/ft100 $d/testB
  for c in airplane automobile bird cat deer; do
    ln -sfn "$(realpath target/cifar10/train/$c)" $d/pretrain/$c
    ln -sfn "$(realpath target/cifar10/test/$c)" $d/testA/$c
  done
  for c in dog frog horse ship truck; do
    mkdir -p $d/ft100/$c
    for f in $(ls target/cifar10/train/$c | sort | head -100); do ln -sf "$(realpath target/cifar10/train/$c/$f)" $d/ft100/$c/; done
    ln -sfn "$(realpath target/cifar10/test/$c)" $d/testB/$c
  done
fi
case "$1" in
  pretrain)
    # 25,000 images of A, 15 epochs, PyTorch's init and rule, lr 0.01 then 0.001 from epoch 11
    $bin train --preset cifar-towers --data $d/pretrain --val $d/testA --out $d/runs/pretrain \
      --init torchvision --rule pytorch --lr 0.01 --weight-decay 5e-4 --schedule step --step-epochs 10 \
      --epochs 15 -b 128 --quiet ;;
  finetune)
    # the same budget for each: 10 epochs of the 500 B images, batch 64 (80 steps)
    # fine-tuned: the finetune recipe (lr 0.001, the new fc8 10x, x0.1 every 4 epochs)
    $bin train --from $d/runs/pretrain/final.safetensors --data $d/ft100 --val $d/testB \
      --out $d/runs/ft-pretrained --epochs 10 --quiet
    $bin train --from $d/runs/pretrain/final.safetensors --freeze features --data $d/ft100 --val $d/testB \
      --out $d/runs/ft-pretrained-frozen --epochs 10 --quiet
    # from scratch: the same schedule at the scratch runs' rate (0.01), and at fine-tuning's (0.001)
    for lr in 0.01 0.001; do
      $bin train --preset cifar-towers --recipe finetune --lr $lr --data $d/ft100 --val $d/testB \
        --out $d/runs/ft-scratch-lr$lr --epochs 10 --quiet
    done ;;
  report)
    for run in pretrain ft-pretrained ft-pretrained-frozen ft-scratch-lr0.01 ft-scratch-lr0.001; do
      data=$d/testB; [ $run = pretrain ] && data=$d/testA
      $bin eval --weights $d/runs/$run/final.safetensors --data $data --quiet --json $d/runs/$run/eval.json >/dev/null
      python3 -c "import json,sys; r=json.load(open('$d/runs/$run/eval.json')); print(f\"| {sys.argv[1]} | {r['images']} | {r['top1']:.2f}% | {r['top5']:.2f}% |\")" $run
    done ;;
esac
