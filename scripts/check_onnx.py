"""`alexnet convert --to onnx` against ONNX Runtime: the same logits as `alexnet infer`?

    /path/to/venv/bin/python scripts/check_onnx.py WEIGHTS [--preset P] [--input x.safetensors]
        [--alexnet target/release/alexnet] [--batch 2] [--tolerance 1e-4]

Converts WEIGHTS (anything `--weights` takes) to ONNX with this crate, runs the model in ONNX
Runtime (CPU) on the tensor `input` of --input (else a seeded normal batch of the model's input
shape, written to a safetensors file), runs `alexnet infer` on the same file, and prints the
max relative error max|ort - ours| / max|ours|. Exits 1 above --tolerance.
Needs onnxruntime, numpy and safetensors (no PyTorch).
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file, save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("weights")
    ap.add_argument("--preset", help="passed to alexnet (default: detected from the weights)")
    ap.add_argument("--input", help="safetensors file holding tensor `input` (default: a seeded normal batch)")
    ap.add_argument("--alexnet", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "alexnet"))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()
    preset = ["--preset", args.preset] if args.preset else []
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model.onnx")
        subprocess.run([args.alexnet, "convert", args.weights, model, "--to", "onnx", *preset], check=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        (inp,) = session.get_inputs()
        if args.input:
            x_path = args.input
            x = load_file(x_path)["input"]
        else:
            shape = [args.batch] + [int(d) for d in inp.shape[1:]]  # the batch dim is symbolic
            x = np.random.default_rng(2012).standard_normal(shape).astype(np.float32)
            x_path = os.path.join(tmp, "x.safetensors")
            save_file({"input": x}, x_path)
        logits = os.path.join(tmp, "logits.safetensors")
        subprocess.run([args.alexnet, "infer", "--weights", args.weights, "--input", x_path, "--output", logits,
                        *preset], check=True, capture_output=True)
        ours = load_file(logits)["logits"]
        (got,) = session.run(["logits"], {inp.name: x})
    rel = float(np.abs(got - ours).max() / np.abs(ours).max())
    ok = got.shape == ours.shape and rel <= args.tolerance
    print(f"{os.path.basename(args.weights)}: input {list(x.shape)}, logits {list(got.shape)}, "
          f"ONNX Runtime {ort.__version__} vs alexnet infer: max rel error {rel:.2e} "
          f"({'ok' if ok else 'FAIL'}, tolerance {args.tolerance:.0e})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
