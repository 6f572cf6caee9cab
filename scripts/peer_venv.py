"""The venv the peer benchmarks (`bench_peers.py`, `bench_data_peers.py`) run PyTorch and ONNX
Runtime from: made with PyPI's wheels unless it exists, and the calling script run again inside
it."""
import os
import subprocess
import sys

PACKAGES = ["torch", "torchvision", "onnxruntime", "onnx"]


def ensure_venv(venv, modules):
    """Returns when `modules` import here; else re-runs the script with `venv`'s Python."""
    try:
        for module in modules:
            __import__(module)
        return
    except ImportError:
        pass
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *PACKAGES], check=True)
    os.execv(python, [python, *sys.argv])
