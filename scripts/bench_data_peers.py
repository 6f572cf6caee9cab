"""The input pipeline alone: this crate's loader against PyTorch's DataLoader, same files, same
transforms, same number of workers, rounds alternated.

    python3 scripts/bench_data_peers.py [--venv ../venv-bench] [--workers 2] [--batch 64]
                                        [--copies 4] [--rounds 3] [--runs 3]

The data: the 250 JPEGs of ../shared/data/imagenet-sample linked `--copies` times into class
folders (their WNIDs), and the same prepared by `alexnet prepare` (the paper's 256x256 centre
crops, re-encoded) into shards, whose JPEGs are also extracted as files for PyTorch (it reads the
same bytes; WebDataset is not installed). Two comparisons, as issue 25 sets them:

* eval transform on the original JPEGs: torchvision's Resize(256), CenterCrop(224), ToTensor,
  Normalize against `alexnet bench --data ORIGINALS --pipeline eval --preset torchvision`;
* training transform on the prepared 256x256 images: RandomCrop(224), RandomHorizontalFlip,
  ToTensor, the PCA colour shift (AlexNet's "lighting", as in fb.resnet.torch and timm) and
  Normalize against `alexnet bench --data SHARDS --pipeline train --preset torchvision`.

PyTorch: DataLoader(num_workers=W, persistent_workers=True), each run one pass over the set after
a warm-up pass, the median of `--runs`; this crate: `--workers W` decoding workers and
RAYON_NUM_THREADS=W for the input layer (PyTorch's workers normalise too), the same. images/s.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from peer_venv import ensure_venv

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SAMPLES = os.path.join(ROOT, "..", "shared", "data", "imagenet-sample")


def make_data(work, copies, binary):
    """The originals (class folders of links), the shards, and the shards' JPEGs as files."""
    originals = os.path.join(work, "originals")
    for name in sorted(os.listdir(SAMPLES)):
        wnid = name[:9]
        os.makedirs(os.path.join(originals, wnid), exist_ok=True)
        for copy in range(copies):
            os.symlink(os.path.realpath(os.path.join(SAMPLES, name)), os.path.join(originals, wnid, f"{copy}-{name}"))
    shards = os.path.join(work, "shards")
    subprocess.run([binary, "prepare", "--data", originals, "--out", shards, "--quiet"], check=True)
    prepared = os.path.join(work, "prepared")
    index = json.load(open(os.path.join(shards, "shards.json")))
    classes = index["classes"]
    for name in sorted(os.listdir(shards)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(shards, name)) as tar:
            # one pass: each image's JPEG comes just before its label (KEY.jpg, KEY.cls)
            jpegs = {}
            for member in tar:
                key, ext = os.path.splitext(member.name)
                data = tar.extractfile(member).read()
                if ext == ".jpg":
                    jpegs[key] = data
                elif ext == ".cls":
                    folder = os.path.join(prepared, classes[int(data)])
                    os.makedirs(folder, exist_ok=True)
                    with open(os.path.join(folder, os.path.basename(key) + ".jpg"), "wb") as out:
                        out.write(jpegs.pop(key))
    return originals, shards, prepared


class Lighting:
    """AlexNet's PCA colour shift on a tensor in [0, 1]: alpha ~ N(0, 0.1) per component, the
    ImageNet eigenvalues and eigenvectors fb.resnet.torch and timm use."""

    def __init__(self):
        import torch
        self.std = 0.1
        self.eigval = torch.tensor([0.2175, 0.0188, 0.0045])
        self.eigvec = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])

    def __call__(self, img):
        import torch
        alpha = torch.randn(3) * self.std
        rgb = (self.eigvec * alpha * self.eigval).sum(1)
        return img + rgb.view(3, 1, 1)


def torch_rate(folder, pipeline, workers, batch, runs):
    import torch
    from torchvision import datasets, transforms as T
    normalize = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    if pipeline == "eval":
        tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
    else:
        tf = T.Compose([T.RandomCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), Lighting(), normalize])
    data = datasets.ImageFolder(folder, tf)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=workers, persistent_workers=workers > 0)
    times = []
    for i in range(runs + 1):  # the first pass starts the workers
        start = time.perf_counter()
        for _ in loader:
            pass
        if i > 0:
            times.append(time.perf_counter() - start)
    return len(data) / statistics.median(times)


def our_rate(binary, folder, pipeline, workers, batch, runs):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        subprocess.run([binary, "bench", "--preset", "torchvision", "--data", folder, "--pipeline", pipeline,
                        "--batch-sizes", str(batch), "--runs", str(runs), "--warmup", "1", "--json", path,
                        "--workers", str(workers)],
                       check=True, stdout=subprocess.DEVNULL, env={**os.environ, "RAYON_NUM_THREADS": str(workers)})
        return json.load(open(path))[0]["images_per_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--venv", default=os.path.join(ROOT, "..", "venv-bench"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    ensure_venv(os.path.abspath(args.venv), ["torch", "torchvision"])
    import torch
    torch.set_num_threads(1)  # each DataLoader worker decodes on one thread, as ours do
    binary = os.path.join(ROOT, "target", "release", "alexnet")
    with tempfile.TemporaryDirectory() as work:
        originals, shards, prepared = make_data(work, args.copies, binary)
        cases = [("eval", "original JPEGs", originals, originals), ("train", "prepared 256x256", shards, prepared)]
        rates = {}
        for r in range(args.rounds):
            for pipeline, _, ours_at, theirs_at in cases:
                rates.setdefault((pipeline, "alexnet"), []).append(
                    our_rate(binary, ours_at, pipeline, args.workers, args.batch, args.runs))
                rates.setdefault((pipeline, "pytorch"), []).append(
                    torch_rate(theirs_at, pipeline, args.workers, args.batch, args.runs))
            print(f"  round {r + 1} of {args.rounds} measured at {time.strftime('%H:%M')}", file=sys.stderr)
    images = 250 * args.copies
    print(f"{time.strftime('%Y-%m-%d')}, {images} images, {args.workers} workers each, batch {args.batch}, images/s "
          f"(medians over {args.rounds} rounds of the median of {args.runs} passes; the rounds' own ratios)")
    print("| pipeline | data | alexnet | PyTorch DataLoader | ratio | rounds' ratios |")
    print("|---|---|---|---|---|---|")
    for pipeline, label, _, _ in cases:
        ours, theirs = rates[(pipeline, "alexnet")], rates[(pipeline, "pytorch")]
        ratios = [a / b for a, b in zip(ours, theirs)]
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"| {pipeline} | {label} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x |")


if __name__ == "__main__":
    main()
