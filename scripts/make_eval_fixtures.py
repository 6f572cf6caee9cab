"""Fixtures for preprocessing and evaluation (tests/eval.rs), made with PIL, torchvision, scipy.

    /path/to/venv/bin/python scripts/make_eval_fixtures.py [--report target/release/alexnet]

* `resize.safetensors`: PIL bilinear resizes of synthetic images (reference pattern), up and down:
  the Rust resize must match bit for bit.
* `torchvision_pixels.safetensors`: torchvision's Resize(256) + CenterCrop(224) pixels (uint8,
  before ToTensor) of 10 real JPEGs from ../shared/data/imagenet-sample (greyscale ones included).
* `tencrop.safetensors`: torchvision's TenCrop(224) logits and averaged softmax for the two PNG
  photos (lossless, so decoding cannot differ) with the reference torchvision weights.
* `meta.mat`, `meta_compressed.mat`: a devkit-style `synsets` struct array whose ILSVRC2012_IDs
  follow a shuffled (not sorted-WNID) order, like the real devkit's.
With --report, also runs `alexnet preprocess` on all 250 sample JPEGs and prints how many values
are within 1/255 of torchvision's.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import scipy.io
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from reference_pattern import reference_layer, reference_pattern  # noqa: E402

OUT = os.path.join(HERE, "..", "tests", "fixtures", "eval")
DATA = os.path.join(HERE, "..", "..", "shared", "data")
SEED = 2012
PIXEL_IMAGES = [
    "n01440764_tench.JPEG", "n01494475_hammerhead.JPEG", "n04008634_projectile.JPEG",
    "n04090263_rifle.JPEG", "n04372370_switch.JPEG", "n02009912_American_egret.JPEG",
    "n03042490_cliff_dwelling.JPEG", "n03532672_hook.JPEG", "n04562935_water_tower.JPEG",
    "n01806143_peacock.JPEG",
]


def synthetic(name, h, w):
    v = reference_pattern(name, 1, (h, w, 3), 1.0)
    return np.minimum(np.floor((v + np.float32(1)) * np.float32(128)), 255).astype(np.uint8)


def resize_fixture():
    out = {}
    for name, (h, w), (oh, ow) in [("down", (131, 173), (64, 85)), ("up", (37, 29), (61, 50)), ("mixed", (90, 40), (45, 71))]:
        img = Image.fromarray(synthetic(f"resize.{name}", h, w))
        out[name] = torch.from_numpy(np.asarray(img.resize((ow, oh), Image.BILINEAR)).copy())
    save_file(out, os.path.join(OUT, "resize.safetensors"))


def torchvision_pixels(path):
    img = Image.open(path).convert("RGB")
    return torch.from_numpy(np.asarray(T.CenterCrop(224)(T.Resize(256)(img))).copy())


def pixels_fixture():
    out = {name: torchvision_pixels(os.path.join(DATA, "imagenet-sample", name)) for name in PIXEL_IMAGES}
    save_file(out, os.path.join(OUT, "torchvision_pixels.safetensors"))


def tencrop_fixture():
    model = torchvision.models.alexnet().eval()
    sd = model.state_dict()
    with torch.no_grad():
        for key in list(sd):
            if key.endswith(".weight"):
                w, b = reference_layer(key[:-7], SEED, tuple(sd[key].shape))
                sd[key].copy_(torch.from_numpy(w))
                sd[key[:-7] + ".bias"].copy_(torch.from_numpy(b))
    tf = T.Compose([T.Resize(256), T.TenCrop(224),
                    T.Lambda(lambda crops: torch.stack([T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(T.ToTensor()(c)) for c in crops]))])
    out = {}
    for name in ["chelsea.png", "coffee.png"]:
        x = tf(Image.open(os.path.join(DATA, "photos", name)).convert("RGB"))
        with torch.no_grad():
            logits = model(x)
        out[f"{name}/logits"] = logits
        out[f"{name}/probs"] = torch.softmax(logits, 1).mean(0)
    save_file(out, os.path.join(OUT, "tencrop.safetensors"))


def meta_fixture():
    wnids = [line.split("\t")[0] for line in open(os.path.join(DATA, "imagenet1k_classes.tsv"))]
    order = np.random.default_rng(7).permutation(1000)  # devkit ID k+1 -> wnids[order[k]]
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.zeros((1000, 1), dtype=dtype)
    for k, idx in enumerate(order):
        synsets[k, 0] = (np.array([[k + 1.0]]), wnids[idx], "name", np.array([[0.0]]))
    scipy.io.savemat(os.path.join(OUT, "meta.mat"), {"synsets": synsets})
    scipy.io.savemat(os.path.join(OUT, "meta_compressed.mat"), {"synsets": synsets}, do_compression=True)
    with open(os.path.join(OUT, "meta_order.txt"), "w") as f:  # ID k+1 is this WNID
        f.write("\n".join(wnids[i] for i in order) + "\n")


def report(alexnet):
    names = sorted(os.listdir(os.path.join(DATA, "imagenet-sample")))
    paths = [os.path.join(DATA, "imagenet-sample", n) for n in names]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "x.safetensors")
        subprocess.run([alexnet, "preprocess", "--transform", "torchvision", *paths, "--output", out], check=True)
        ours = load_file(out)["input"]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    within, total, worst = 0, 0, 0.0
    for i, p in enumerate(paths):
        theirs = T.Normalize(mean.flatten(), std.flatten())(T.ToTensor()(T.CenterCrop(224)(T.Resize(256)(Image.open(p).convert("RGB")))))
        diff = ((ours[i] - theirs) * std).abs()  # in [0, 1] pixel units
        within += (diff <= 1 / 255 + 1e-6).sum().item()
        total += diff.numel()
        worst = max(worst, diff.max().item() * 255)
    print(f"{len(paths)} JPEGs: {100 * within / total:.4f}% of values within 1/255 of torchvision; largest difference {worst:.2f}/255")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", metavar="ALEXNET")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    if args.report:
        report(args.report)
    else:
        resize_fixture()
        pixels_fixture()
        tencrop_fixture()
        meta_fixture()
        print("wrote", sorted(os.listdir(OUT)))
