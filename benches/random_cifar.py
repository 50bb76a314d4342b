"""Writes a CIFAR-100 binary dataset of random images (train.bin, test.bin and
fine_label_names.txt), so that `versatile train --bench-steps` times a network on 3x32x32
inputs, as PyTorch's reference does on random tensors:

    python3 benches/random_cifar.py /tmp/random-cifar100 [--train 2560] [--test 256]
    versatile train --model resnet18 --data /tmp/random-cifar100 --threads 2 --bench-steps 20

Each record: coarse label byte, fine label byte, 3072 image bytes (three 32x32 planes).
Seeded, so the same command writes the same files.
"""

import argparse
import os
import random


def write(path, records, rng):
    with open(path, "wb") as f:
        for _ in range(records):
            fine = rng.randrange(100)
            f.write(bytes([fine // 5, fine]))
            f.write(rng.randbytes(3 * 32 * 32))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--train", type=int, default=2560)
    parser.add_argument("--test", type=int, default=256)
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    rng = random.Random(0)
    write(os.path.join(args.dir, "train.bin"), args.train, rng)
    write(os.path.join(args.dir, "test.bin"), args.test, rng)
    with open(os.path.join(args.dir, "fine_label_names.txt"), "w") as f:
        f.write("".join(f"class{i}\n" for i in range(100)))


if __name__ == "__main__":
    main()
