#!/usr/bin/env bash
# End-to-end `alexnet eval` throughput against the forward pass alone, at the same batch size.
#   scripts/bench_eval.sh [BATCH]
# RAYON_NUM_THREADS sets the compute threads of both, WORKERS the decoding workers of `eval`
# (default: one a core).
# The data: the 250 JPEGs of ../shared/data/imagenet-sample, each linked 4 times (1000 images),
# so that the first batch's wait (nothing to overlap with yet) does not dominate.
set -euo pipefail
cd "$(dirname "$0")/.."
batch=${1:-64}
bin=${BIN:-target/release/alexnet}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for f in ../shared/data/imagenet-sample/*.JPEG; do
  wnid=$(basename "$f" | cut -c1-9)
  mkdir -p "$work/val/$wnid"
  for copy in 1 2 3 4; do ln -s "$(realpath "$f")" "$work/val/$wnid/$copy-$(basename "$f")"; done
done
"$bin" init --preset torchvision --scheme reference "$work/w.safetensors" 2>/dev/null
"$bin" bench --preset torchvision --batch-sizes "$batch" --runs 5 --json "$work/bench.json" >/dev/null
"$bin" eval --weights "$work/w.safetensors" --data "$work/val" --batch-size "$batch" ${WORKERS:+--workers "$WORKERS"} --quiet --json "$work/eval.json" >/dev/null
python3 - "$work" "$batch" <<'PY'
import json, sys
work, batch = sys.argv[1], sys.argv[2]
fwd = json.load(open(work + "/bench.json"))[0]["images_per_s"]
ev = json.load(open(work + "/eval.json"))["images_per_second"]
print(f"batch {batch}: forward alone {fwd:.1f} images/s, eval end to end {ev:.1f} images/s, "
      f"pipeline cost {100 * (1 - ev / fwd):.1f}%")
PY
