#!/usr/bin/env bash
# The GPU check: one prepared run on a machine with an NVIDIA GPU, PyTorch and no Rust/network.
#
#   here:   scripts/build-cuda.sh                       (target/cuda-dist: alexnet + libcudart)
#   there:  scripts/gpu-check.sh [OUT_DIR]              (with target/cuda-carry carried along)
#
# 1. CPU vs GPU logits of `paper` and `torchvision` (reference-pattern weights, a seeded batch),
#    and PyTorch's logits for the same weights on the same GPU;
# 2. CPU vs GPU gradients: one SGD step of `alexnet train` on the CPU and on the GPU from the same
#    weights, the weight changes compared layer by layer (the change is -lr (grad + wd w));
# 3. the two-tower path: towers on cuda:0,cuda:0 (and cuda:0,cuda:1 where there are two GPUs);
# 4. forward and training throughput at batch 128 and 256, ours against PyTorch (cuDNN) on the
#    same GPU.
# Writes OUT_DIR/gpu-check.md (default: $OUT, else target/gpu-check) and prints it.
# Rehearsal without a GPU (checks the script itself): DEVICE=cpu BATCHES=2 BIN=target/release/alexnet
#   scripts/gpu-check.sh   (PyTorch on the CPU, every "GPU" figure then a CPU one)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-target/gpu-check}}
mkdir -p "$out"
bin=${BIN:-$PWD/target/cuda-dist/alexnet}
if [ ! -x "$bin" ] && [ -e target/cuda-carry/alexnet.xz ]; then
  mkdir -p target/cuda-dist
  xz -dc target/cuda-carry/alexnet.xz > target/cuda-dist/alexnet && chmod +x target/cuda-dist/alexnet
  cp target/cuda-carry/libcudart.so.13 target/cuda-dist/
fi
[ -x "$bin" ] || { echo "no $bin: run scripts/build-cuda.sh first and carry target/cuda-carry" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

# cuBLAS, cuRAND and NVRTC come from PyTorch's NVIDIA wheels; libcudart sits beside the binary.
LD_LIBRARY_PATH=$(python3 - <<'EOF'
import glob, os, site
dirs = set()
for base in site.getsitepackages() + [site.getusersitepackages()]:
    for lib in glob.glob(os.path.join(base, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
EOF
):${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH

BIN=$bin OUT_DIR=$out DEVICE=${DEVICE:-cuda:0} BATCHES=${BATCHES:-128,256} python3 - <<'EOF'
import json, os, struct, subprocess, statistics, time
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

BIN, OUT, DEV = os.environ["BIN"], os.environ["OUT_DIR"], os.environ["DEVICE"]
BATCHES = [int(b) for b in os.environ["BATCHES"].split(",")]
TORCH_DEV = "cuda" if DEV.startswith("cuda") else "cpu"
TOWERS = f"{DEV},{DEV}"
work = os.path.join(OUT, "work")
os.makedirs(work, exist_ok=True)
gpus = torch.cuda.device_count()
name = torch.cuda.get_device_name(0) if gpus else "no GPU (rehearsal on the CPU)"
report = [f"# GPU check: {name}, {gpus} GPU(s), PyTorch {torch.__version__}, alexnet on {DEV}", ""]


def sync():
    if TORCH_DEV == "cuda":
        torch.cuda.synchronize()


def alexnet(*args):
    r = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"alexnet {' '.join(map(str, args))} failed:\n{r.stderr}")
    return r.stdout


def read_st(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(data[a:b], dtype={"F32": np.float32, "I64": np.int64}[v["dtype"]]).reshape(v["shape"])
    return out


def write_st(path, tensors):
    header, blobs, off = {}, [], 0
    for k, a in tensors.items():
        b = np.ascontiguousarray(a, dtype=np.float32).tobytes()
        header[k] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def paper_torch(w):
    """The two towers in grouped form, the paper's LRN (alpha 1e-4 on the sum = 5e-4 / 5)."""
    conv = lambda k, **kw: nn.Conv2d(w[k + ".weight"].shape[1] * kw.get("groups", 1), w[k + ".weight"].shape[0], w[k + ".weight"].shape[2], **kw)
    m = nn.ModuleDict(dict(
        conv1=conv("conv1", stride=4), conv2=conv("conv2", padding=2, groups=2), conv3=conv("conv3", padding=1),
        conv4=conv("conv4", padding=1, groups=2), conv5=conv("conv5", padding=1, groups=2),
        fc6=nn.Linear(9216, 4096), fc7=nn.Linear(4096, 4096), fc8=nn.Linear(4096, w["fc8.weight"].shape[0])))
    lrn = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)

    def forward(x):
        h = F.max_pool2d(lrn(F.relu(m["conv1"](x))), 3, 2)
        h = F.max_pool2d(lrn(F.relu(m["conv2"](h))), 3, 2)
        h = F.relu(m["conv5"](F.relu(m["conv4"](F.relu(m["conv3"](h))))))
        h = torch.flatten(F.max_pool2d(h, 3, 2), 1)
        return m["fc8"](F.dropout(F.relu(m["fc7"](F.dropout(F.relu(m["fc6"](h)), 0.5, m.training))), 0.5, m.training))

    return m, forward


def torchvision_torch(w):
    m = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),
        nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2), nn.AdaptiveAvgPool2d(6), nn.Flatten(),
        nn.Dropout(), nn.Linear(9216, 4096), nn.ReLU(), nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000))
    names = {"0": "features.0", "3": "features.3", "6": "features.6", "8": "features.8", "10": "features.10",
             "16": "classifier.1", "19": "classifier.4", "21": "classifier.6"}
    return m, m, {f"{i}.{p}": f"{k}.{p}" for i, k in names.items() for p in ("weight", "bias")}


def build(preset, w):
    if preset == "paper":
        m, fwd = paper_torch(w)
        keys = {k: k for k in m.state_dict()}
    else:
        m, fwd, keys = torchvision_torch(w)
    m.load_state_dict({k: torch.from_numpy(w[keys[k]].copy()) for k in m.state_dict()})
    return m, fwd


# ---- 1. logits: CPU vs GPU vs PyTorch --------------------------------------------------------
report += ["## Logits (max |a-b| / max |b|)", "", f"| preset | GPU vs CPU | GPU towers {TOWERS} vs CPU | GPU vs PyTorch GPU |", "|---|---|---|---|"]
rng = np.random.default_rng(2012)
for preset in ("paper", "torchvision"):
    wpath, xpath = f"{work}/{preset}.safetensors", f"{work}/{preset}-x.safetensors"
    alexnet("init", "--preset", preset, "--scheme", "reference", wpath)
    write_st(xpath, {"input": rng.standard_normal((8, 3, 227, 227)).astype(np.float32)})
    logits = {}
    for name, flags in (("cpu", ["--device", "cpu"]), ("gpu", ["--device", DEV]),
                        ("towers", ["--tower-devices", TOWERS])):
        alexnet("infer", "--preset", preset, "--weights", wpath, "--input", xpath, "--output", f"{work}/{preset}-{name}.safetensors", *flags)
        logits[name] = read_st(f"{work}/{preset}-{name}.safetensors")["logits"]
    m, fwd = build(preset, read_st(wpath))
    m.to(TORCH_DEV).eval()
    with torch.no_grad():
        ref = fwd(torch.from_numpy(read_st(xpath)["input"].copy()).to(TORCH_DEV)).cpu().numpy()
    report.append(f"| {preset} | {rel(logits['gpu'], logits['cpu']):.2e} | {rel(logits['towers'], logits['cpu']):.2e} | {rel(logits['gpu'], ref):.2e} |")
if gpus >= 2:
    alexnet("infer", "--preset", "paper", "--weights", f"{work}/paper.safetensors", "--input", f"{work}/paper-x.safetensors",
            "--output", f"{work}/paper-two-gpus.safetensors", "--tower-devices", "cuda:0,cuda:1")
    two = read_st(f"{work}/paper-two-gpus.safetensors")["logits"]
    cpu = read_st(f"{work}/paper-cpu.safetensors")["logits"]
    report.append(f"\npaper with towers on cuda:0 and cuda:1 vs CPU: {rel(two, cpu):.2e}")

# ---- 2. gradients: one SGD step on the CPU and on the GPU ------------------------------------
from PIL import Image
data = f"{work}/images"
for c in range(2):
    os.makedirs(f"{data}/class{c}", exist_ok=True)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(f"{data}/class{c}/{i}.png")
alexnet("data-stats", "--data", data, "--preset", "paper")
report += ["", "## Gradients: one SGD step (batch 32), change of each weight, GPU vs CPU (max |a-b| / max |b|)", "",
           "| preset | tensor | rel error |", "|---|---|---|"]
for preset in ("paper", "torchvision"):
    w0 = read_st(f"{work}/{preset}.safetensors")
    finals = {}
    for dev in ("cpu", DEV):
        run = f"{work}/train-{preset}-{dev.replace(':', '')}"
        alexnet("train", "--preset", preset, "--data", data, "--out", run, "--epochs", 1, "--batch-size", 32,
                "--no-augment", "--no-dropout", "--init", "reference", "--input-scale", 0.01736, "--lr", 0.001,
                "--device", dev, "--quiet")
        finals[dev] = read_st(f"{run}/final.safetensors")
    for k in w0:
        if k in finals["cpu"] and w0[k].shape == finals["cpu"][k].shape and not k.startswith(("fc8", "classifier.6")):
            d_cpu, d_gpu = finals["cpu"][k] - w0[k], finals[DEV][k] - w0[k]
            report.append(f"| {preset} | {k} | {rel(d_gpu, d_cpu):.2e} |")

# ---- 3./4. throughput ------------------------------------------------------------------------
def ours(preset, batch, train, towers=None):
    j = f"{work}/bench.json"
    flags = ["--tower-devices", towers] if towers else ["--device", DEV]
    alexnet("bench", "--preset", preset, "--batch-sizes", batch, "--runs", 10, "--warmup", 3, "--json", j, *flags, *(["--train"] if train else []))
    return json.load(open(j))[0]["images_per_s"]


def pytorch(preset, batch, train):
    torch.backends.cudnn.benchmark = True
    m, fwd = build(preset, read_st(f"{work}/{preset}.safetensors"))
    m.to(TORCH_DEV).train(train)
    x = torch.randn(batch, 3, 227, 227, device=TORCH_DEV)
    y = torch.randint(0, 1000, (batch,), device=TORCH_DEV)
    opt = torch.optim.SGD(m.parameters(), lr=1e-6, momentum=0.9, weight_decay=5e-4)
    times = []
    for i in range(13):
        sync()
        t = time.perf_counter()
        if train:
            opt.zero_grad()
            F.cross_entropy(fwd(x), y).backward()
            opt.step()
        else:
            with torch.no_grad():
                fwd(x)
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


report += ["", "## Throughput, images/s (median of 10 after 3 warm-up runs)", "",
           "| preset | mode | batch | ours | PyTorch | ours / PyTorch |", "|---|---|---|---|---|---|"]
for preset in ("paper", "torchvision"):
    for train in (False, True):
        for batch in BATCHES:
            a, b = ours(preset, batch, train), pytorch(preset, batch, train)
            report.append(f"| {preset} | {'train' if train else 'forward'} | {batch} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
a = ours("paper", BATCHES[0], True, TOWERS)
report.append(f"| paper, towers {TOWERS} | train | {BATCHES[0]} | {a:.1f} | - | - |")
if gpus >= 2:
    a = ours("paper", BATCHES[0], True, "cuda:0,cuda:1")
    report.append(f"| paper, towers cuda:0,cuda:1 | train | {BATCHES[0]} | {a:.1f} | - | - |")

text = "\n".join(report) + "\n"
open(os.path.join(OUT, "gpu-check.md"), "w").write(text)
print(text)
EOF
