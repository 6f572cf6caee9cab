"""Fixtures for training (tests/train.rs), made with torch and numpy.

    /path/to/venv/bin/python scripts/make_train_fixtures.py

* `sgd.safetensors`: the cifar-towers net (grouped form, paper LRN) with the reference weights,
  a reference batch, and two steps of torch.optim.SGD(lr=0.01, momentum=0.9,
  weight_decay=5e-4), dropout off: both losses, the first gradients, and every parameter after
  each step (1024 samples plus norms each).
* `stats.safetensors`: numpy's mean image and RGB covariance eigen-decomposition of the base
  images (torchvision Resize(256) + CenterCrop(256)) of 12 sample JPEGs.
"""
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_fixtures import TwoTowerGrouped, summarise  # noqa: E402
from reference_pattern import reference_layer, reference_pattern  # noqa: E402

OUT = os.path.join(HERE, "..", "tests", "fixtures", "train")
DATA = os.path.join(HERE, "..", "..", "shared", "data")
SEED = 2012
LABELS = [1, 5, 9, 0]
STATS_IMAGES = 12  # every 20th of the sorted sample JPEGs


CIFAR_GEOMETRY = dict(convs=[(64, 5, 1, 2), (128, 5, 1, 2), (192, 3, 1, 1), (192, 3, 1, 1), (128, 3, 1, 1)], fc=512, pool5=2, classes=10)


def sgd_fixture():
    model = TwoTowerGrouped(nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0), **CIFAR_GEOMETRY)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, p in params.items():
            if key.endswith(".weight"):
                w, b = reference_layer(key[:-7], SEED, tuple(p.shape))
                p.copy_(torch.from_numpy(w))
                params[key[:-7] + ".bias"].copy_(torch.from_numpy(b))
    x = torch.from_numpy(reference_pattern("train.input", SEED, (4, 3, 28, 28), 2.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    out = {}
    for step in (1, 2):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), torch.tensor(LABELS))
        loss.backward()
        out[f"loss{step}"] = loss.detach().reshape(1)
        if step == 1:
            for k, p in params.items():
                summarise(f"grad1/{k}", p.grad, out)
        opt.step()
        for k, p in params.items():
            summarise(f"step{step}/{k}", p.detach(), out)
    save_file(out, os.path.join(OUT, "sgd.safetensors"))


def stats_fixture():
    names = sorted(os.listdir(os.path.join(DATA, "imagenet-sample")))[::20][:STATS_IMAGES]
    base = T.Compose([T.Resize(256), T.CenterCrop(256)])
    imgs = np.stack([np.asarray(base(Image.open(os.path.join(DATA, "imagenet-sample", n)).convert("RGB")), dtype=np.float64) for n in names])
    mean_image = imgs.mean(0).transpose(2, 0, 1)  # [3, 256, 256]
    cov = np.cov(imgs.reshape(-1, 3), rowvar=False)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    out = {"eigvals": torch.tensor(vals[order]), "eigvecs": torch.tensor(vecs[:, order].copy())}
    summarise("mean_image", torch.from_numpy(mean_image), out)
    save_file(out, os.path.join(OUT, "stats.safetensors"))
    with open(os.path.join(OUT, "stats_images.txt"), "w") as f:
        f.write("\n".join(names) + "\n")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    sgd_fixture()
    stats_fixture()
    print("wrote", sorted(os.listdir(OUT)))
