#!/bin/sh
# Training steps side by side in one run: `versatile train --bench-steps` (vgg_small on
# Fashion-MNIST, resnet18 on random 3x32x32 CIFAR-100 images, every variant, 20 steps of
# batch 128 after 3 warm-up steps), then PyTorch's step of the same networks
# (benches/torch_reference.py --training-only). Text on stdout.
#
#   benches/train_side_by_side.sh [THREADS] [PYTHON]     (from the repository root,
#   after `cargo build --release`; PYTHON: a venv with torch)
set -eu
threads=${1:-2}
python=${2:-/tmp/torchenv/bin/python}
versatile=target/release/versatile
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "load average $(cut -d' ' -f1-3 /proc/loadavg); CPU flags: $(grep -o -w 'avx2\|avx512f\|fma' /proc/cpuinfo | sort -u | tr '\n' ' ')"
python3 benches/random_cifar.py "$scratch/cifar100"
fashion=/usr/share/datasets/fashion-mnist
[ -d "$fashion" ] || fashion=data/fashion-mnist-sample
for case in "vgg_small $fashion" "resnet18 $scratch/cifar100"; do
    set -- $case
    for variant in dense spatial spatial+channel; do
        "$versatile" train --model "$1" --variant "$variant" --data "$2" \
            --threads "$threads" --bench-steps 20
    done
done
"$python" benches/torch_reference.py --threads "$threads" --training-only
