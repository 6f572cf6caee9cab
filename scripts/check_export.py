"""Round trip through PyTorch: torch.save -> `alexnet convert --to torchvision` -> torchvision.

    /path/to/venv/bin/python scripts/check_export.py [--alexnet target/release/alexnet]

Writes torchvision's AlexNet with the reference weights as a .pth (zip and legacy formats),
converts each with this crate, loads the result with
`torchvision.models.alexnet().load_state_dict(safetensors.torch.load_file(...))` (strict), and
compares its logits with the original model's and with `alexnet infer` on the same batch.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch
import torchvision
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_pattern import reference_layer, reference_pattern  # noqa: E402

SEED = 2012


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--alexnet", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "alexnet"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    original = torchvision.models.alexnet().eval()
    with torch.no_grad():
        for key, p in original.state_dict().items():
            if key.endswith(".weight"):
                w, b = reference_layer(key[: -len(".weight")], SEED, tuple(p.shape))
                original.state_dict()[key].copy_(torch.from_numpy(w))
                original.state_dict()[key[: -len(".weight")] + ".bias"].copy_(torch.from_numpy(b))
    x = torch.from_numpy(reference_pattern("input", SEED, (2, 3, 224, 224), 2.0))
    with torch.no_grad():
        want = original(x)
    with tempfile.TemporaryDirectory() as tmp:  # two .pth and two exports, 1 GB
        save_file({"input": x}, os.path.join(tmp, "x.safetensors"))
        for fmt, zip_format in [("zip", True), ("legacy", False)]:
            pth = os.path.join(tmp, f"alexnet-{fmt}.pth")
            torch.save(original.state_dict(), pth, _use_new_zipfile_serialization=zip_format)
            out = os.path.join(tmp, f"exported-{fmt}.safetensors")
            subprocess.run([args.alexnet, "convert", pth, out, "--to", "torchvision"], check=True)
            model = torchvision.models.alexnet().eval()
            result = model.load_state_dict(load_file(out), strict=True)
            with torch.no_grad():
                got = model(x)
            bitwise = all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), model.state_dict().values()))
            logits = os.path.join(tmp, f"logits-{fmt}.safetensors")
            subprocess.run([args.alexnet, "infer", "--weights", out, "--input", os.path.join(tmp, "x.safetensors"),
                            "--output", logits], check=True, capture_output=True)
            ours = load_file(logits)["logits"]
            rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
            print(f"{fmt:>6} .pth -> safetensors: load_state_dict {result}, weights bit-identical: {bitwise}, "
                  f"torchvision logits max rel diff {rel(got, want):.2e}, alexnet infer vs PyTorch {rel(ours, want):.2e}")


if __name__ == "__main__":
    main()
