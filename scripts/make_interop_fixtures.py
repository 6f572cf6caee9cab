"""Fixtures for weight interop (tests/weights.rs), written by torch and protobuf.

    /path/to/venv/bin/python scripts/make_interop_fixtures.py   # torch, protobuf, grpcio-tools

* `tests/fixtures/interop/state.pth` (zip) and `legacy.pth` (pre-1.6 format): small state_dicts
  written by torch.save, nested under `state_dict`, with f32/f16/int64 tensors, a transposed
  view and an offset view sharing one storage; `pth_expected.safetensors` holds what they contain.
* `tests/fixtures/interop/caffemodels.json`: sha256 and size of full-size caffemodels in the V1
  (`layers`, legacy num/channels/height/width shapes, fc as (1, 1, out, in)) and V2 (`layer`,
  BlobShape) forms holding the reference weights. They are too large to commit: the test
  re-encodes them, checks its bytes hash to exactly these, then loads them and compares logits
  with tests/fixtures/caffe.safetensors.
* `tests/fixtures/interop/mini_v1.caffemodel`, `mini_v2.caffemodel`: small nets in both forms
  (conv and fc blobs, blob-less layers, double_data), with `mini_expected.safetensors`.
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from reference_pattern import reference_layer  # noqa: E402

OUT = os.path.join(HERE, "..", "tests", "fixtures", "interop")
SEED = 2012
CAFFE_LAYERS = [  # name, weight shape (grouped layout)
    ("conv1", (96, 3, 11, 11)), ("conv2", (256, 48, 5, 5)), ("conv3", (384, 256, 3, 3)),
    ("conv4", (384, 192, 3, 3)), ("conv5", (256, 192, 3, 3)),
    ("fc6", (4096, 9216)), ("fc7", (4096, 4096)), ("fc8", (1000, 4096)),
]


def caffe_pb2():
    from grpc_tools import protoc
    with tempfile.TemporaryDirectory() as gen:
        rc = protoc.main(["protoc", f"-I{HERE}", f"--python_out={gen}", os.path.join(HERE, "caffe_subset.proto")])
        assert rc == 0, "protoc failed"
        sys.path.insert(0, gen)
        import caffe_subset_pb2  # loaded now, so the folder can go
        sys.path.remove(gen)
    return caffe_subset_pb2


def pth_fixtures():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    shared = torch.arange(20, dtype=torch.float32)
    state = {
        "conv.weight": torch.randn(4, 3, 2, 2, generator=g),
        "half": torch.randn(7, generator=g).half(),
        "transposed": base.t(),                 # non-contiguous strides
        "offset_view": shared[5:17].view(3, 4),  # storage offset 5, storage shared with...
        "shared_whole": shared,                  # ...this tensor
        "steps": torch.tensor([3, -1, 7], dtype=torch.int64),
    }
    expected = {k: v.clone().contiguous() for k, v in state.items()}
    checkpoint = {"epoch": 3, "state_dict": state, "lr": 0.01}
    torch.save(checkpoint, os.path.join(OUT, "state.pth"))
    torch.save(checkpoint, os.path.join(OUT, "legacy.pth"), _use_new_zipfile_serialization=False)
    save_file(expected, os.path.join(OUT, "pth_expected.safetensors"))


def blob(pb, values, shape, legacy):
    b = pb.BlobProto()
    if legacy:  # pre-BlobShape: (num, channels, height, width); fc (1, 1, out, in); bias (1, 1, 1, out)
        dims = list(shape) if len(shape) == 4 else [1] * (4 - len(shape)) + list(shape)
        b.num, b.channels, b.height, b.width = dims
    else:
        b.shape.dim.extend(shape)
    b.data.extend(values.ravel().tolist())
    return b


def caffemodel(pb, layers, legacy):
    """A NetParameter with the given (name, weight, bias) layers and one blob-less ReLU."""
    net = pb.NetParameter()
    net.name = "AlexNet"
    for i, (name, w, b) in enumerate(layers):
        if legacy:
            layer = net.layers.add()
            layer.name = name
            layer.type = pb.V1LayerParameter.CONVOLUTION if w.ndim == 4 else pb.V1LayerParameter.INNER_PRODUCT
        else:
            layer = net.layer.add()
            layer.name = name
            layer.type = "Convolution" if w.ndim == 4 else "InnerProduct"
        layer.blobs.append(blob(pb, w, w.shape, legacy))
        layer.blobs.append(blob(pb, b, b.shape, legacy))
        if i == 0:
            relu = net.layers.add() if legacy else net.layer.add()
            relu.name = "relu1"
            relu.type = pb.V1LayerParameter.RELU if legacy else "ReLU"
    return net.SerializeToString()


def caffe_fixtures(pb):
    layers = [(name, *reference_layer(name, SEED, shape)) for name, shape in CAFFE_LAYERS]
    hashes = {}
    for form, legacy in [("v1", True), ("v2", False)]:
        data = caffemodel(pb, layers, legacy)
        hashes[form] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    with open(os.path.join(OUT, "caffemodels.json"), "w") as f:
        json.dump(hashes, f, indent=2)

    rng = np.random.default_rng(0)
    mini = [("conv1", rng.standard_normal((4, 3, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)),
            ("fc6", rng.standard_normal((5, 16)).astype(np.float32), rng.standard_normal(5).astype(np.float32))]
    for form, legacy in [("v1", True), ("v2", False)]:
        with open(os.path.join(OUT, f"mini_{form}.caffemodel"), "wb") as f:
            f.write(caffemodel(pb, mini, legacy))
    # The same net with its conv weight stored as double_data.
    net = pb.NetParameter()
    net.ParseFromString(caffemodel(pb, mini, False))
    w = net.layer[0].blobs[0]
    w.double_data.extend(list(w.data))
    del w.data[:]
    with open(os.path.join(OUT, "mini_double.caffemodel"), "wb") as f:
        f.write(net.SerializeToString())
    expected = {}
    for name, w, b in mini:
        expected[f"{name}.weight"] = torch.from_numpy(w)
        expected[f"{name}.bias"] = torch.from_numpy(b)
    save_file(expected, os.path.join(OUT, "mini_expected.safetensors"))


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    pth_fixtures()
    caffe_fixtures(caffe_pb2())
    print("wrote", sorted(os.listdir(OUT)))
