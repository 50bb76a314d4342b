"""Inference timings of an ONNX model in onnxruntime and OpenVINO on this machine, for
BENCHMARKS.md, beside `versatile bench --model` on the same weights.

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install onnxruntime==1.22.1 openvino==2026.4.1 numpy==2.2.6
    versatile bench --model vgg16_bn --variant spatial --batch 1 --json --onnx /tmp/m.onnx
    /tmp/refenv/bin/python benches/infer_reference.py /tmp/m.onnx --batch 1 --threads 2

`benches/infer_side_by_side.sh` runs both for a list of models in one go, on the
model's dense ONNX (`versatile export --to onnx`: what a user of these runtimes runs)
and on its versatile form (`--form versatile`: the primary weights once, one smaller
convolution per secondary filter block, the paper's multiply-adds). onnxruntime: all graph optimizations, `threads` intra-op threads, one
inter-op thread. OpenVINO: the CPU plugin, `threads` inference threads, f32
(`INFERENCE_PRECISION_HINT`), latency hint. Medians of repeated runs after warm-up, in
milliseconds; one JSON object per runtime (JSON lines).
"""

import argparse
import json
import os
import statistics
import time

import numpy as np


def median_ms(run, warmup, reps):
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times), max(times)


def onnxruntime_runner(path, threads, shape):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    return lambda: session.run(None, {name: x}), ort.__version__


def openvino_runner(path, threads, shape):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(path)
    model.reshape({model.inputs[0].any_name: ov.PartialShape(list(shape))})
    compiled = core.compile_model(
        model,
        "CPU",
        {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
        },
    )
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    return lambda: request.infer({0: x}), ov.__version__


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("onnx")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--runtimes", default="onnxruntime,openvino")
    parser.add_argument("--form", default="dense", help="a label: which form the file holds")
    args = parser.parse_args()

    import onnx

    graph = onnx.load(args.onnx, load_external_data=False).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    shape = (args.batch, *dims[1:])
    runners = {"onnxruntime": onnxruntime_runner, "openvino": openvino_runner}
    for name in args.runtimes.split(","):
        run, version = runners[name](args.onnx, args.threads, shape)
        median, low, high = median_ms(run, args.warmup, args.reps)
        print(
            json.dumps(
                {
                    "runtime": name,
                    "form": args.form,
                    "version": version,
                    "input": list(shape),
                    "threads": args.threads,
                    "max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
                    "ms": median,
                    "ms_min": low,
                    "ms_max": high,
                    "images_per_s": args.batch / (median * 1e-3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
