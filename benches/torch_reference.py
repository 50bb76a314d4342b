"""PyTorch reference timings on this machine, for BENCHMARKS.md.

The layer as the authors run it: one small convolution per secondary filter (centre
crop i of the primary weight, channel window j), concatenated; written here from
SPEC.md section 1 (their loop structure, correct padding), not copied from their code.
Also PyTorch's dense conv2d with the same c -> n, and one training step (cross-entropy,
SGD with Nesterov momentum) of the small VGG (32-32-M-64-64-M-128-128-M, batch norm,
global average pooling, linear head; batch 128 of 1x28x28) and of ResNet-18 (torchvision's;
batch 128 of 3x32x32, 100 classes), each dense and with that layer, with how far the
resident set rose during the steps.

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    # (or plain `pip install torch` from PyPI, where that index cannot be reached)
    /tmp/torchenv/bin/python benches/torch_reference.py [--threads 2] [--json] [--training-only]

On a GPU (a CUDA build of torch), the same layers and step on the same GPU as
`versatile bench --device wgpu|cuda`:

    python benches/torch_reference.py --device cuda [--json]

Medians of repeated runs after warm-up, in milliseconds (training: images/s); on CUDA
each timed run ends with `torch.cuda.synchronize()`.
"""

import argparse
import json
import math
import multiprocessing
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
    channel windows j inner), shared channel mode, dilation 1. Crop i is the kernel
    shifted by i, so it runs with padding - i (or on the input cropped by i - padding),
    at the same stride."""

    def __init__(self, c, n, d, padding, delta=0, g=1, bias=True, stride=1):
        super().__init__()
        self.s = math.ceil(d / 2)
        self.n_c = delta // g + 1
        self.c_hat = c - delta
        self.m = math.ceil(n / (self.s * self.n_c))
        self.n, self.d, self.padding, self.g, self.stride = n, d, padding, g, stride
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
                outs.append(F.conv2d(x_i[:, j * self.g : j * self.g + self.c_hat], w, None, self.stride, pad))
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


def conv_factory(versatile):
    """A bias-free convolution: the authors' loop layer for kernels above 1x1 when
    `versatile` (Versatile-v1: every such convolution, the 7x7 stem included), else
    PyTorch's conv2d."""

    def conv(c, n, k, stride=1, padding=0):
        if versatile and k > 1:
            return LoopVConv2d(c, n, k, padding, bias=False, stride=stride)
        return nn.Conv2d(c, n, k, stride, padding, bias=False)

    return conv


class BasicBlock(nn.Module):
    def __init__(self, conv, inplanes, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = conv(inplanes, planes, 3, stride, 1), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3, 1, 1), nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(conv(inplanes, planes, 1, stride), nn.BatchNorm2d(planes))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


def resnet18(versatile, in_channels, classes):
    """torchvision's ResNet-18 (the zoo's `resnet18`), with `conv_factory`'s layers."""
    conv = conv_factory(versatile)
    layers = [conv(in_channels, 64, 7, 2, 3), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    inplanes = 64
    for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [BasicBlock(conv, inplanes, planes, stride), BasicBlock(conv, planes, planes, 1)]
        inplanes = planes
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))


def small_vgg_net(versatile, in_channels, classes):
    return small_vgg(versatile)


# (name, builder, input [batch, c, h, w], classes): the networks `versatile train
# --bench-steps` times (vgg_small on Fashion-MNIST, resnet18 on the random CIFAR-100 of
# benches/random_cifar.py).
NETWORKS = [
    ("vgg_small", small_vgg_net, [128, 1, 28, 28], 10),
    ("resnet18", resnet18, [128, 3, 32, 32], 100),
]


def resident():
    """VmRSS and VmHWM of this process in bytes (Linux), as `versatile train` reads them."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def training_row(name, variant, warmup, steps, threads, device):
    """One network's training step, timed in a process of its own (see `training_rows`)."""
    global DEVICE
    DEVICE = torch.device(device)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    _, build, shape, classes = next(n for n in NETWORKS if n[0] == name)
    x = torch.randn(*shape, device=DEVICE)
    y = torch.randint(0, classes, (shape[0],), device=DEVICE)
    model = build(variant == "spatial", shape[1], classes).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()

    # The step's memory as `versatile train --bench-steps` reports it: how far the
    # resident set's high-water mark rises above the resident set before the first step
    # (writing 5 to clear_refs resets the mark).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss_before, _ = resident()
    ms = median_ms(step, warmup, steps)
    _, rss_peak = resident()
    return {
        "model": name,
        "variant": variant,
        "input": shape,
        "params": sum(p.numel() for p in model.parameters()),
        "step_ms": ms,
        "images_per_second": shape[0] / (ms / 1e3),
        "rss_growth_bytes": rss_peak - rss_before,
        "rss_peak_bytes": rss_peak,
    }


def training_rows(warmup, steps, threads):
    """Each network and variant in a fresh process, as each `versatile train` run is: in
    one process the allocator would reuse what the previous network freed, and the
    resident set would not grow."""
    ctx = multiprocessing.get_context("spawn")
    rows = []
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        for name, _, _, _ in NETWORKS:
            for variant in ["dense", "spatial"]:
                rows.append(pool.apply(training_row, (name, variant, warmup, steps, threads, DEVICE.type)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--training-only", action="store_true", help="skip the layer shapes")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = [] if args.training_only else layer_rows(args.warmup, args.reps)
    training = training_rows(3, 20, args.threads)
    if args.json:
        device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
        print(json.dumps({"torch": torch.__version__, "device": device, "threads": args.threads, "layers": layers, "training": training}, indent=1))
        return
    print(f"PyTorch {torch.__version__}, {DEVICE}, {args.threads} threads")
    for r in layers:
        print(f"{r['shape']:5} {r['impl']:13} fwd {r['fwd_ms']:9.2f} ms  fwd+bwd {r['fwd_bwd_ms']:9.2f} ms")
    for r in training:
        mib = 1 << 20
        print(f"train {r['model']:9} {r['variant']:8} {r['params']:>8} params  {r['step_ms']:8.1f} ms/step  {r['images_per_second']:7.0f} img/s  "
              f"resident set +{r['rss_growth_bytes'] / mib:.1f} MiB (peak {r['rss_peak_bytes'] / mib:.1f} MiB)")


if __name__ == "__main__":
    main()
