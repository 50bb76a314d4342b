#!/bin/sh
# Writes the seed files of every fuzz target into fuzz/seeds/<target>/ (committed; this
# script records how they were made). Needs python3, ImageMagick's `convert`, and a
# built `versatile` CLI (target/release/versatile). Run from the repository root.
set -eu
versatile=${VERSATILE:-target/release/versatile}
convert=${CONVERT:-convert}
seeds=fuzz/seeds
tools=fuzz/tools
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in idx cifar image_folder burnpack safetensors description pytorch run_config; do
    mkdir -p "$seeds/$target"
done

# The small model of fuzz/src/lib.rs (vgg_bn:4-M, spatial, 1 input channel, 10 classes)
# as a PyTorch state dict, then as this crate's checkpoints.
python3 "$tools/make_pth.py" "$seeds/pytorch/small.pth" \
    features.0.weight=2,1,3,3 features.0.bias=4 features.1.weight=4 features.1.bias=4 \
    features.1.running_mean=4 features.1.running_var=4 features.1.num_batches_tracked= \
    classifier.0.weight=10,4 classifier.0.bias=10
python3 "$tools/make_pth.py" "$seeds/pytorch/strided.pth" \
    features.0.weight=2,1,3,3:1,18,6,2 classifier.0.weight=10,4:1,10@40
for ext in bpk safetensors; do
    "$versatile" import "$seeds/pytorch/small.pth" --model vgg_bn:4-M --variant spatial \
        --in-channels 1 --classes 10 --class-names a,b,c,d,e,f,g,h,i,j \
        --output "$scratch/small.$ext" > /dev/null
done
cp "$scratch/small.bpk" "$seeds/burnpack/small.bpk"
cp "$scratch/small.safetensors" "$seeds/safetensors/small.safetensors"

# Model descriptions (the JSON under versatile.model).
python3 - "$scratch/small.safetensors" "$seeds/description" <<'PY'
import json, struct, sys
data = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", data[:8])[0]
base = json.loads(json.loads(data[8:8 + n])["__metadata__"]["versatile.model"])
variants = {
    "base.json": base,
    "preprocess.json": dict(base, preprocess={"input_size": [28, 28], "resize": 32,
                                              "mean": [0.286], "std": [0.353]}),
    "other_arch.json": dict(base, config=dict(base["config"], arch="vgg_bn:4-M-8")),
    "channel.json": dict(base, config=dict(base["config"],
                                           variant="spatial+channel:delta=1,g=1,mode=sliding")),
}
for name, value in variants.items():
    open(f"{sys.argv[2]}/{name}", "w").write(json.dumps(value))
PY

# IDX: 3 images of 4x4 and their labels, raw and gzip.
python3 - "$seeds/idx" <<'PY'
import gzip, struct, sys
out = sys.argv[1]
images = struct.pack(">IIII", 0x803, 3, 4, 4) + bytes(range(48))
labels = struct.pack(">II", 0x801, 3) + bytes([0, 1, 2])
for name, data in [("images", images), ("labels", labels)]:
    open(f"{out}/{name}.idx", "wb").write(data)
    open(f"{out}/{name}.idx.gz", "wb").write(gzip.compress(data, mtime=0))
PY

# CIFAR: one CIFAR-10 record, one CIFAR-100 record.
python3 - "$seeds/cifar" <<'PY'
import sys
out = sys.argv[1]
pixels = bytes((i * 7) % 256 for i in range(3072))
open(f"{out}/cifar10.bin", "wb").write(bytes([3]) + pixels)
open(f"{out}/cifar100.bin", "wb").write(bytes([4, 42]) + pixels)
PY

# Images: PNG in several colour types and depths, JPEG baseline and progressive.
"$convert" -size 12x9 gradient:red-blue "$seeds/image_folder/rgb.png"
"$convert" -size 9x12 gradient:white-black -colorspace Gray "$seeds/image_folder/grey.png"
"$convert" -size 8x8 gradient:red-blue -alpha set -channel A -evaluate set 50% "$seeds/image_folder/rgba.png"
"$convert" -size 8x6 gradient:white-black -depth 16 -colorspace Gray "$seeds/image_folder/grey16.png"
"$convert" -size 8x8 gradient:red-blue -type Palette "$seeds/image_folder/palette.png"
"$convert" -size 16x16 gradient:red-blue -quality 50 "$seeds/image_folder/baseline.jpg"
"$convert" -size 16x16 gradient:red-blue -interlace JPEG "$seeds/image_folder/progressive.jpg"

# Run configurations: the shipped recipe and a short one.
cp configs/fashion-mnist-vgg_small.toml "$seeds/run_config/recipe.toml"
printf 'model = "vgg_small"\nvariant = "spatial+channel:delta=2"\nepochs = 2\n[optimizer]\nkind = "adamw"\n[schedule]\nkind = "step"\n' \
    > "$seeds/run_config/short.toml"
