"""Runs ONNX models in onnxruntime for tests/export.rs.

Usage: python3 onnx_run.py JOBS.json

JOBS.json is a list of {"model": PATH, "input": PATH, "shape": [N, C, H, W],
"output": PATH}; inputs and outputs are raw little-endian float32. Exit code 3 when
onnxruntime or numpy is missing, so the caller can tell absence from failure.
"""

import json
import sys

try:
    import numpy as np
    import onnxruntime as ort
except ImportError as err:  # absent locally: the Rust test skips with a note
    print(f"missing: {err}", file=sys.stderr)
    sys.exit(3)


def main(jobs_path):
    with open(jobs_path) as f:
        jobs = json.load(f)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for job in jobs:
        session = ort.InferenceSession(
            job["model"], options, providers=["CPUExecutionProvider"]
        )
        x = np.fromfile(job["input"], dtype="<f4").reshape(job["shape"])
        name = session.get_inputs()[0].name
        (y,) = session.run(None, {name: x})
        np.ascontiguousarray(y, dtype="<f4").tofile(job["output"])
        print(job["model"], list(x.shape), "->", list(y.shape))


if __name__ == "__main__":
    main(sys.argv[1])
