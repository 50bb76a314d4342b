#!/usr/bin/env python3
"""The inference targets from one run of `benches/infer_side_by_side.sh` (JSON lines).

    python3 benches/summarize_infer.py run.jsonl

For each case (model, variant, batch) the plan's time is the mean of its two medians,
timed before and after the runtimes, which cancels a drift of the machine's speed over
the case; each runtime's is its median. Then the ratios of the inference issue's
targets: the versatile VGG-16-BN at least 1.5x faster than the faster dense runtime and
faster than OpenVINO on the authors' versatile form, the versatile ResNet-50 faster than
the faster dense runtime, the dense models within 1.2x of onnxruntime; and each plan's
share of the FMA peak. Each ratio is also given with the plan's timings one by one
(before / after). Where those differ by more than DRIFT (the VM was slow during one of
them, which no mean cancels), the case's ratios are not judged: rerun it. Only the
standard library.
"""

import json
import sys

# The largest ratio between a case's two plan timings whose mean still measures the plan.
DRIFT = 1.15


def cases(lines):
    """Groups the rows by case, in the order the cases ran."""
    order, by_case, last = [], {}, None
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        if row.get("impl") == "plan":
            key = (row["model"], row["variant"], row["input"][0])
            if key not in by_case:
                by_case[key] = {"plans": [], "runtimes": {}}
                order.append(key)
            by_case[key]["plans"].append(row)
            last = key
        elif "runtime" in row and last is not None:
            by_case[last]["runtimes"][(row["runtime"], row["form"])] = row["ms"]
    return [(key, by_case[key]) for key in order]


def main(path):
    with open(path, encoding="utf-8") as f:
        grouped = cases(f)
    if not grouped:
        sys.exit(f"{path}: no plan rows (is it the output of infer_side_by_side.sh?)")
    verdicts = []
    for (model, variant, batch), case in grouped:
        times = [p["ms"] for p in case["plans"]]
        plan = sum(times) / len(times)
        first = case["plans"][0]
        share = first.get("share_of_fma_peak")
        share = None if share is None else share * first["ms"] / plan
        runtimes = case["runtimes"]
        drifted = max(times) / min(times) > DRIFT
        # The mean first, then each timing alone: every ratio is given for all of them.
        timings = [plan] + times
        line = f"{model} {variant} batch {batch}: plan {plan:.1f} ms ({' / '.join(f'{t:.1f}' for t in times)})"
        if share is not None:
            line += f", {100 * share:.0f} % of the FMA peak"
        print(line)
        for (runtime, form), ms in sorted(runtimes.items()):
            print(f"    {runtime} {form}: {ms:.1f} ms, {ms / plan:.2f}x the plan's time")
        dense = [runtimes[(r, "dense")] for r in ("onnxruntime", "openvino") if (r, "dense") in runtimes]
        if variant != "dense" and dense:
            op, need = (">=", 1.5) if model.startswith("vgg") else (">", 1.0)
            speedups = [min(dense) / t for t in timings]
            verdicts.append((f"{model} {variant} b{batch} vs the faster dense runtime", speedups, op, need, drifted))
            if model.startswith("vgg") and ("openvino", "versatile") in runtimes:
                speedups = [runtimes[("openvino", "versatile")] / t for t in timings]
                verdicts.append((f"{model} {variant} b{batch} vs OpenVINO, authors' form", speedups, ">", 1.0, drifted))
        if variant == "dense" and ("onnxruntime", "dense") in runtimes:
            slowdowns = [t / runtimes[("onnxruntime", "dense")] for t in timings]
            verdicts.append((f"{model} dense b{batch}, plan over onnxruntime", slowdowns, "<=", 1.2, drifted))
    print()
    for name, (ratio, *each), op, need, drifted in verdicts:
        met = {">=": ratio >= need, ">": ratio > need, "<=": ratio <= need}[op]
        verdict = "met" if met else "NOT met"
        if drifted:
            verdict = f"not judged (the plan's two timings differ by over {DRIFT}x): rerun"
        alone = " / ".join(f"{r:.2f}" for r in each)
        print(f"{name}: {ratio:.2f}x ({alone}; target {op} {need}): {verdict}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
