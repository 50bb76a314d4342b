#!/bin/sh
# Inference side by side in one run: `versatile bench --model` (the compiled plan and
# burn's module forward) and onnxruntime and OpenVINO on the same model's dense ONNX and
# versatile-form ONNX, same threads and batch. JSON lines on stdout. Each case times the
# plan before the runtimes and again after them (`--plan-only`), so the VM's drift over
# a case shows and averages out; `benches/summarize_infer.py` reads the lines and prints
# the ratios.
#
#   benches/infer_side_by_side.sh [THREADS] [PYTHON] > run.jsonl   (from the repository
#   root, after `cargo build --release`; PYTHON: a venv with onnxruntime, openvino, onnx)
#   python3 benches/summarize_infer.py run.jsonl
#
# ISA=avx2 in the environment holds an AVX-512 machine to AVX2 on both sides: our
# kernels (VERSATILE_SGEMM=avx2) and OpenVINO's (ONEDNN_MAX_CPU_ISA=AVX2). onnxruntime
# has no such setting, so it is left out of that run.
set -eu
threads=${1:-2}
python=${2:-/tmp/refenv/bin/python}
runtimes=onnxruntime,openvino
if [ "${ISA:-}" = avx2 ]; then
    export VERSATILE_SGEMM=avx2 ONEDNN_MAX_CPU_ISA=AVX2
    runtimes=openvino
fi
versatile=target/release/versatile
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "{\"load_average\": \"$(cut -d' ' -f1-3 /proc/loadavg)\", \"cpu_flags\": \"$(grep -o -w 'avx2\|avx512f\|fma' /proc/cpuinfo | sort -u | tr '\n' ' ')\", \"isa\": \"${ISA:-native}\"}"
for case in vgg16_bn:spatial:1 vgg16_bn:dense:1 vgg16_bn:spatial:8 resnet50:spatial:1 resnet50:dense:1; do
    model=${case%%:*}
    rest=${case#*:}
    variant=${rest%%:*}
    batch=${rest#*:}
    RAYON_NUM_THREADS=$threads "$versatile" bench --model "$model" --variant "$variant" \
        --batch "$batch" --reps 7 --json --onnx "$scratch/dense.onnx" \
        --onnx-versatile "$scratch/versatile.onnx"
    for form in dense versatile; do
        if [ "$form" = versatile ] && [ "$variant" = dense ]; then
            continue
        fi
        "$python" benches/infer_reference.py "$scratch/$form.onnx" --batch "$batch" \
            --threads "$threads" --reps 7 --form "$form" --runtimes "$runtimes"
    done
    RAYON_NUM_THREADS=$threads "$versatile" bench --model "$model" --variant "$variant" \
        --batch "$batch" --reps 7 --json --plan-only --peak-size 0
done
