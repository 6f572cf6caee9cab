"""Makes the PyTorch fixtures the parity tests compare against (tests/fixtures/*.safetensors).

    /path/to/venv/bin/python scripts/make_fixtures.py [ops|activations|PRESET...]   # needs torch, torchvision, safetensors

Weights and inputs are never stored: both sides regenerate them from the reference pattern
(scripts/reference_pattern.py == src/init.rs). What is stored is small: full logits, and for
every intermediate activation and every parameter gradient 1024 evenly spaced samples plus the
whole tensor's |x| sum, L2 norm and max |x|.
"""
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from reference_pattern import reference_layer, reference_pattern  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
SEED = 2012
BATCH = 2
LABELS = [7, 501]
SAMPLES = 1024

torch.set_num_threads(2)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def summarise(prefix, x, out):
    """Samples and statistics of a tensor, as tests/common/mod.rs reads them."""
    flat = x.detach().double().flatten()
    n = min(SAMPLES, flat.numel())
    idx = (torch.arange(n, dtype=torch.int64) * flat.numel()) // n
    out[f"{prefix}/samples"] = flat[idx].float().contiguous()
    out[f"{prefix}/stats"] = torch.tensor(
        [flat.abs().sum(), flat.norm(), flat.abs().max(), float(flat.numel())], dtype=torch.float64
    )


PAPER_GEOMETRY = dict(convs=[(96, 11, 4, 0), (256, 5, 1, 2), (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1)], fc=4096, pool5=6)


class TwoTowerGrouped(nn.Module):
    """The two-tower net in grouped-convolution form, with Caffe's layer names.
    `convs`: whole-layer (out, kernel, stride, padding) of conv1..conv5 (src/model.rs TowerGeometry)."""

    def __init__(self, lrn, convs, fc, pool5, classes=1000):
        super().__init__()
        (c1, k1, s1, p1), (c2, k2, _, p2), (c3, k3, _, p3), (c4, k4, _, p4), (c5, k5, _, p5) = convs
        self.conv1 = nn.Conv2d(3, c1, k1, stride=s1, padding=p1)
        self.conv2 = nn.Conv2d(c1, c2, k2, padding=p2, groups=2)
        self.conv3 = nn.Conv2d(c2, c3, k3, padding=p3)
        self.conv4 = nn.Conv2d(c3, c4, k4, padding=p4, groups=2)
        self.conv5 = nn.Conv2d(c4, c5, k5, padding=p5, groups=2)
        self.fc6 = nn.Linear(c5 * pool5 * pool5, fc)
        self.fc7 = nn.Linear(fc, fc)
        self.fc8 = nn.Linear(fc, classes)
        self.lrn = lrn

    def forward(self, x, acts=None):
        acts = {} if acts is None else acts

        def rec(name, h):
            acts[name] = h
            return h

        h = rec("conv1", F.relu(self.conv1(x)))
        h = rec("norm1", self.lrn(h))
        h = rec("pool1", F.max_pool2d(h, 3, 2))
        h = rec("conv2", F.relu(self.conv2(h)))
        h = rec("norm2", self.lrn(h))
        h = rec("pool2", F.max_pool2d(h, 3, 2))
        h = rec("conv3", F.relu(self.conv3(h)))
        h = rec("conv4", F.relu(self.conv4(h)))
        h = rec("conv5", F.relu(self.conv5(h)))
        h = rec("pool5", torch.flatten(F.max_pool2d(h, 3, 2), 1))
        h = rec("fc6", F.relu(self.fc6(h)))
        h = rec("fc7", F.relu(self.fc7(h)))
        return rec("fc8", self.fc8(h))


TORCHVISION_ACTS = {
    "features.1": "conv1", "features.2": "pool1", "features.4": "conv2", "features.5": "pool2",
    "features.7": "conv3", "features.9": "conv4", "features.11": "conv5", "features.12": "pool5",
    "avgpool": "avgpool", "classifier.2": "fc6", "classifier.5": "fc7", "classifier.6": "fc8",
}


class Torchvision(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torchvision.models.alexnet()
        self.acts = {}
        for module_name, act in TORCHVISION_ACTS.items():
            module = self.net.get_submodule(module_name)
            module.register_forward_hook(lambda m, i, o, act=act: self.acts.__setitem__(act, o.clone()))

    def forward(self, x, acts):
        self.acts = acts
        out = self.net(x)
        acts["avgpool"] = torch.flatten(acts["avgpool"], 1)
        return out


def build(preset):
    if preset == "torchvision":
        model = Torchvision()
        params = dict(model.net.named_parameters())
    else:
        lrn = (nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0) if preset == "paper"
               else nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0))
        model = TwoTowerGrouped(lrn, **PAPER_GEOMETRY)
        params = dict(model.named_parameters())
    with torch.no_grad():
        for key, p in params.items():
            if key.endswith(".weight"):
                prefix = key[: -len(".weight")]
                w, b = reference_layer(prefix, SEED, tuple(p.shape))
                p.copy_(t(w))
                params[prefix + ".bias"].copy_(t(b))
    return model.eval(), params


def model_fixture(preset):
    side = 224 if preset == "torchvision" else 227
    model, params = build(preset)
    x = t(reference_pattern("input", SEED, (BATCH, 3, side, side), 2.0))
    acts = {}
    logits = model(x, acts)
    loss = F.cross_entropy(logits, torch.tensor(LABELS))
    loss.backward()
    out = {"logits": logits.detach().contiguous(), "loss": loss.detach().reshape(1)}
    for name, a in acts.items():
        summarise(f"act/{name}", a, out)
    for key, p in params.items():
        summarise(f"grad/{key}", p.grad, out)
    save_file(out, os.path.join(OUT, f"{preset}.safetensors"))
    print(preset, "loss", loss.item(), "logits[0,:4]", logits[0, :4].tolist())


def lrn_case(out, name, x, lrn):
    x = x.clone().requires_grad_(True)
    y = lrn(x)
    g = t(reference_pattern(f"{name}.grad", 1, tuple(y.shape), 1.0))
    y.backward(g)
    out[f"{name}/y"] = y.detach().contiguous()
    out[f"{name}/grad_x"] = x.grad.contiguous()


def ops_fixture():
    out = {}
    # The generator itself: a few values the Rust side must reproduce bit for bit.
    out["pattern/w"] = t(reference_pattern("features.0.weight", SEED, (64,), 0.5))
    # LRN on inputs large enough that alpha vs alpha/n changes the output by far more than 10%.
    x = t(reference_pattern("lrn.x", 1, (2, 7, 5, 4), 40.0))
    lrn_case(out, "lrn_paper", x, nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0))
    lrn_case(out, "lrn_caffe", x, nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0))
    lrn_case(out, "lrn_even", x, nn.LocalResponseNorm(4, alpha=1e-3, beta=0.6, k=1.5))
    # Max-pooling 3/2 on integer-valued inputs: many ties inside and between windows.
    for name, shape in [("pool_ties", (2, 3, 9, 11)), ("pool_alexnet", (1, 4, 13, 13))]:
        xi = torch.floor(t(reference_pattern(f"{name}.x", 1, shape, 2.0))).requires_grad_(True)
        y = F.max_pool2d(xi, 3, 2)
        y.backward(t(reference_pattern(f"{name}.grad", 1, tuple(y.shape), 1.0)))
        out[f"{name}/y"] = y.detach().contiguous()
        out[f"{name}/grad_x"] = xi.grad.contiguous()
    # Adaptive average pooling, shrinking (uneven bins) and growing (overlapping bins).
    for name, shape in [("adaptive_shrink", (2, 3, 13, 11)), ("adaptive_grow", (1, 2, 5, 4))]:
        xi = t(reference_pattern(f"{name}.x", 1, shape, 1.0)).requires_grad_(True)
        y = F.adaptive_avg_pool2d(xi, (6, 6))
        y.backward(t(reference_pattern(f"{name}.grad", 1, tuple(y.shape), 1.0)))
        out[f"{name}/y"] = y.detach().contiguous()
        out[f"{name}/grad_x"] = xi.grad.contiguous()
    # Convolution + bias (+ ReLU): the Winograd paths (3x3 and 5x5 stride 1; map sizes that
    # leave partial tiles; Winograd needs 196 tiles a core: 64 images of 7x7 and 6x5 maps give
    # 1024 and 576, enough for 5 and 2 cores, one 27x27 map gives 196 whatever the cores; the
    # weight gradient takes Winograd where the forward does) and
    # the direct path (conv1's 11x11 stride 4). src/ops/conv.rs's unit tests hold every path to
    # the others on any machine.
    for name, xs, ws, stride, pad, relu in [
        ("conv3x3_pad1", (64, 4, 7, 7), (5, 4, 3, 3), 1, 1, True),
        ("conv3x3_pad0", (64, 3, 6, 5), (4, 3, 3, 3), 1, 0, False),
        ("conv5x5_pad2", (8, 4, 27, 27), (6, 4, 5, 5), 1, 2, True),
        ("conv11_stride4", (2, 3, 35, 31), (4, 3, 11, 11), 4, 2, True),
    ]:
        xi = t(reference_pattern(f"{name}.x", 1, xs, 1.0)).requires_grad_(True)
        wi = t(reference_pattern(f"{name}.w", 1, ws, 0.5)).requires_grad_(True)
        bi = t(reference_pattern(f"{name}.b", 1, (ws[0],), 0.5)).requires_grad_(True)
        y = F.conv2d(xi, wi, bi, stride=stride, padding=pad)
        if relu:
            y = F.relu(y)
        y.backward(t(reference_pattern(f"{name}.grad", 1, tuple(y.shape), 1.0)))
        out[f"{name}/y"] = y.detach().contiguous()
        out[f"{name}/grad_x"] = xi.grad.contiguous()
        out[f"{name}/grad_w"] = wi.grad.contiguous()
        out[f"{name}/grad_b"] = bi.grad.contiguous()
    save_file(out, os.path.join(OUT, "ops.safetensors"))


def activations_fixture():
    """tanh forward and backward: on the reference pattern over [-6, 6] and on values that probe
    its ends (zeros, tiny, where the kernel's ranges meet, where f32 tanh becomes 1, inf)."""
    out = {}
    special = [0.0, -0.0, 1e-30, -1e-8, 1e-4, 0.1, 0.17, 0.18, 0.35, 0.55, 0.625, 1.0, 2.0, 5.0,
               8.0, 9.0, 9.01, 9.1, 10.0, 20.0, 100.0, float("inf"), -0.3, -4.0, -9.05, -float("inf")]
    cases = [("tanh", t(reference_pattern("tanh.x", 1, (4, 8, 16, 16), 6.0))),
             ("tanh_special", torch.tensor(special, dtype=torch.float32))]
    for name, x in cases:
        x = x.clone().requires_grad_(True)
        y = torch.tanh(x)
        y.backward(t(reference_pattern(f"{name}.grad", 1, tuple(y.shape), 1.0)))
        if name == "tanh_special":
            out[f"{name}/x"] = x.detach().contiguous()
        out[f"{name}/y"] = y.detach().contiguous()
        out[f"{name}/grad_x"] = x.grad.contiguous()
    save_file(out, os.path.join(OUT, "activations.safetensors"))


if __name__ == "__main__":
    # scripts/make_fixtures.py [ops|activations|PRESET...]: the fixtures named (default all)
    os.makedirs(OUT, exist_ok=True)
    for target in sys.argv[1:] or ["ops", "activations", "paper", "caffe", "torchvision"]:
        if target == "ops":
            ops_fixture()
        elif target == "activations":
            activations_fixture()
        else:
            model_fixture(target)
