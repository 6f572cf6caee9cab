#!/usr/bin/env bash
# The forward pass (or with MODE=train a training step) at each instruction-set level this CPU
# has, rounds alternated, the levels' images/s side by side and their ratio to the best level's.
#   scripts/bench_isa.sh [ROUNDS] [PRESETS] [BATCHES] [MODE]
#   (defaults: 3, torchvision,paper, 1,16, forward)
# ALEXNET_ISA holds every kernel of ours to a level; the gemm crate's own AVX-512 kernels stay
# unless built without them (`cargo build --release --no-default-features`).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; presets=${2:-torchvision,paper}; batches=${3:-1,16}; mode=${4:-forward}
case $mode in
  forward) train=() ;;
  train) train=(--train) ;;
  *) echo "MODE must be forward or train, not $mode" >&2; exit 2 ;;
esac
out=$(mktemp -d)
for r in $(seq "$rounds"); do
  for isa in avx512 avx2 generic; do
    ALEXNET_ISA=$isa target/release/alexnet bench --preset "$presets" --batch-sizes "$batches" \
      --runs 5 --warmup 2 "${train[@]}" --json "$out/$isa-$r.json" >/dev/null 2>&1 || true
  done
done
python3 - "$out" <<'PY'
import glob, json, os, statistics, sys
rows = {}
for path in glob.glob(os.path.join(sys.argv[1], "*.json")):
    isa = os.path.basename(path).split("-")[0]
    for r in json.load(open(path)):
        rows.setdefault((r["preset"], r["batch"]), {}).setdefault(isa, []).append(r["images_per_s"])
print("| preset | batch | avx512 images/s | avx2 | generic | avx2 / avx512 | generic / avx512 |")
print("|---|---|---|---|---|---|---|")
for (preset, batch), by in sorted(rows.items()):
    med = {isa: statistics.median(v) for isa, v in by.items()}
    best = med.get("avx512")
    cell = lambda isa: f"{med[isa]:.1f}" if isa in med else "-"
    ratio = lambda isa: f"{med[isa] / best:.2f}" if best and isa in med else "-"
    print(f"| {preset} | {batch} | {cell('avx512')} | {cell('avx2')} | {cell('generic')} | {ratio('avx2')} | {ratio('generic')} |")
PY
