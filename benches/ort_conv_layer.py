"""One convolution (+ ReLU) in onnxruntime, for a layer-by-layer comparison with
`examples/conv_steps.rs` (the same shape through our inference kernel) on this machine.

    /tmp/refenv/bin/python benches/ort_conv_layer.py 512 512 3 28 --threads 2
    target/release/examples/conv_steps 512 512 3 28 1 1 100

Batch 1, stride 1, padding kernel // 2, random weights; all graph optimizations, `threads`
intra-op threads. Prints the median and fastest time and GFLOP/s (2 per multiply-add).
"""

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def conv_model(cin, cout, kernel, side):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((cout, cin, kernel, kernel), dtype=np.float32) * 0.01
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[kernel // 2] * 4),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, side, side])],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.zeros(cout, np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnxruntime 1.22 reads IR versions up to 10
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("cin", "cout", "kernel", "side"):
        parser.add_argument(name, type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    model = conv_model(args.cin, args.cout, args.kernel, args.side)
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(1).standard_normal(
        (1, args.cin, args.side, args.side), dtype=np.float32
    )
    for _ in range(3):
        session.run(None, {"x": x})
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    flops = 2 * args.cin * args.cout * args.kernel**2 * args.side**2
    print(
        f"onnxruntime {ort.__version__} conv {args.cin}->{args.cout} "
        f"{args.kernel}x{args.kernel} {args.side}x{args.side}: median {median * 1e3:.3f} ms "
        f"(min {times[0] * 1e3:.3f}), {flops / median / 1e9:.1f} GFLOP/s"
    )


if __name__ == "__main__":
    main()
