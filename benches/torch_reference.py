"""PyTorch reference timings on this machine, for BENCHMARKS.md.

The layer as the authors run it: one small convolution per secondary filter (centre
crop i of the primary weight, channel window j), concatenated; written here from
SPEC.md section 1 (their loop structure, correct padding), not copied from their code.
Also PyTorch's dense conv2d with the same c -> n, and one training step of the small VGG
(32-32-M-64-64-M-128-128-M, batch norm, global average pooling, linear head) dense and
with that layer, batch 128 on 28x28 inputs, SGD with Nesterov momentum.

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /tmp/torchenv/bin/python benches/torch_reference.py [--threads 2] [--json]

On a GPU (a CUDA build of torch), the same layers and step on the same GPU as
`versatile bench --device wgpu|cuda`:

    python benches/torch_reference.py --device cuda [--json]

Medians of repeated runs after warm-up, in milliseconds (training: images/s); on CUDA
each timed run ends with `torch.cuda.synchronize()`.
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# (name, batch, in, out, side, kernel, padding, delta, g): the default set.
SHAPES = [
    ("S1", 16, 64, 64, 56, 3, 1, 0, 1),
    ("S2", 16, 128, 128, 28, 3, 1, 0, 1),
    ("S3", 16, 256, 256, 14, 3, 1, 0, 1),
    ("S4", 16, 64, 96, 28, 5, 2, 0, 1),
    ("S5", 16, 512, 4096, 7, 7, 0, 0, 1),
    ("S6", 128, 32, 64, 28, 3, 1, 0, 1),
    ("S1d1", 16, 64, 64, 56, 3, 1, 1, 1),
]


class LoopVConv2d(nn.Module):
    """Versatile convolution as a loop of small convolutions (spatial crops i outer,
    channel windows j inner), shared channel mode, stride 1, dilation 1."""

    def __init__(self, c, n, d, padding, delta=0, g=1, bias=True):
        super().__init__()
        self.s = math.ceil(d / 2)
        self.n_c = delta // g + 1
        self.c_hat = c - delta
        self.m = math.ceil(n / (self.s * self.n_c))
        self.n, self.d, self.padding, self.g = n, d, padding, g
        self.weight = nn.Parameter(torch.empty(self.m, self.c_hat, d, d))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x):
        outs = []
        for i in range(self.s):
            w = self.weight[:, :, i : self.d - i, i : self.d - i]
            pad = self.padding - i
            if pad < 0:
                x_i = x[:, :, -pad : x.shape[2] + pad, -pad : x.shape[3] + pad]
                pad = 0
            else:
                x_i = x
            for j in range(self.n_c):
                outs.append(F.conv2d(x_i[:, j * self.g : j * self.g + self.c_hat], w, None, 1, pad))
        y = torch.cat(outs, 1)[:, : self.n]
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y


DEVICE = torch.device("cpu")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def layer_rows(warmup, reps):
    rows = []
    for name, batch, c, n, side, d, p, delta, g in SHAPES:
        x = torch.randn(batch, c, side, side, device=DEVICE, requires_grad=True)
        layers = {"authors_loop": LoopVConv2d(c, n, d, p, delta, g).to(DEVICE)}
        if delta == 0:
            layers["torch_conv2d"] = nn.Conv2d(c, n, d, padding=p).to(DEVICE)
        for impl, layer in layers.items():
            with torch.no_grad():
                gout = torch.randn_like(layer(x))

            def fwd():
                with torch.no_grad():
                    layer(x)

            def fwd_bwd():
                x.grad = None
                layer.zero_grad(set_to_none=True)
                layer(x).backward(gout)

            slow = 3 if name == "S5" else reps
            rows.append({
                "shape": name,
                "impl": impl,
                "fwd_ms": median_ms(fwd, warmup, slow),
                "fwd_bwd_ms": median_ms(fwd_bwd, warmup, slow),
            })
    return rows


def small_vgg(versatile):
    layers, c = [], 1
    for v in [32, 32, "M", 64, 64, "M", 128, 128, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        conv = LoopVConv2d(c, v, 3, 1, bias=False) if versatile else nn.Conv2d(c, v, 3, padding=1, bias=False)
        layers += [conv, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        c = v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def training_rows(warmup, steps):
    rows = []
    x = torch.randn(128, 1, 28, 28, device=DEVICE)
    y = torch.randint(0, 10, (128,), device=DEVICE)
    for variant in ["dense", "spatial"]:
        model = small_vgg(variant == "spatial").to(DEVICE)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            loss.item()

        ms = median_ms(step, warmup, steps)
        rows.append({
            "model": "vgg_small",
            "variant": variant,
            "params": sum(p.numel() for p in model.parameters()),
            "step_ms": ms,
            "images_per_second": 128 / (ms / 1e3),
        })
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = layer_rows(args.warmup, args.reps)
    training = training_rows(3, 20)
    if args.json:
        device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
        print(json.dumps({"torch": torch.__version__, "device": device, "threads": args.threads, "layers": layers, "training": training}, indent=1))
        return
    print(f"PyTorch {torch.__version__}, {DEVICE}, {args.threads} threads")
    for r in layers:
        print(f"{r['shape']:5} {r['impl']:13} fwd {r['fwd_ms']:9.2f} ms  fwd+bwd {r['fwd_bwd_ms']:9.2f} ms")
    for r in training:
        print(f"train vgg_small {r['variant']:8} {r['params']:>8} params  {r['step_ms']:8.1f} ms/step  {r['images_per_second']:7.0f} img/s")


if __name__ == "__main__":
    main()
