#!/bin/sh
# Runs every fuzz target for SECONDS seconds each, one after the other, one job each,
# then prints a summary (seconds, executions, crashes) per target.
#
#   fuzz/run.sh SECONDS [TARGET...]        (from the repository root; nightly toolchain)
#
# Each target starts from its committed seeds (fuzz/seeds/TARGET) plus a few larger
# files of the repository, and keeps its corpus in fuzz/corpus/TARGET between runs.
# Crashes land in fuzz/artifacts/TARGET; logs in fuzz/logs/TARGET.log. Memory is capped
# (-rss_limit_mb, -malloc_limit_mb): a parser that allocates on a file's say-so is a
# crash here. The targets are built first (`cargo +nightly fuzz build`, address
# sanitizer, debug assertions) unless FUZZ_NO_BUILD=1, then run as plain binaries.
set -eu
seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
targets=${*:-idx cifar image_folder burnpack safetensors description pytorch run_config}
limits="-rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=30"
mkdir -p fuzz/corpus fuzz/logs

# Larger real files the committed seeds leave out.
extra_seeds() {
    case $1 in
        idx) echo data/fashion-mnist-sample/t10k-labels-idx1-ubyte.gz ;;
        pytorch) echo tests/data/torch/small_vgg_authors_layout.pth ;;
        safetensors) echo tests/data/golden/spatial_k3.f32.safetensors ;;
        *) ;;
    esac
}

if [ "${FUZZ_NO_BUILD:-0}" != 1 ]; then
    for target in $targets; do
        cargo +nightly fuzz build "$target"
    done
fi
bin=fuzz/target/x86_64-unknown-linux-gnu/release
for target in $targets; do
    corpus=fuzz/corpus/$target
    mkdir -p "$corpus"
    cp fuzz/seeds/"$target"/* "$corpus"/
    for file in $(extra_seeds "$target"); do
        cp "$file" "$corpus"/
    done
    echo "== $target: $seconds s"
    mkdir -p fuzz/artifacts/"$target"
    # libFuzzer exits non-zero on a crash; the summary reports it.
    "$bin/$target" -artifact_prefix=fuzz/artifacts/"$target"/ -max_total_time="$seconds" \
        $limits "$corpus" > fuzz/logs/"$target".log 2>&1 || true
    tail -n 3 fuzz/logs/"$target".log
done

echo
printf '%-14s %8s %12s %8s %8s\n' target seconds executions exec/s crashes
for target in $targets; do
    log=fuzz/logs/$target.log
    # libFuzzer's closing line, "Done N runs in S second(s)"; after a crash, its last
    # status line "#N ... exec/s: E ..." (seconds then about N / E).
    runs=$(grep -o 'Done [0-9]* runs' "$log" | tail -n 1 | cut -d' ' -f2)
    took=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | tail -n 1 | cut -d' ' -f5)
    rate=$(grep -o 'exec/s: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2)
    if [ -z "$runs" ]; then
        runs=$(grep -o '^#[0-9]*' "$log" | tail -n 1 | tr -d '#')
        took="~$(( ${runs:-0} / ${rate:-1} ))"
    fi
    # libFuzzer stops at the first crash, out-of-memory or timeout, writing its input.
    crashes=$(grep -c 'Test unit written to' "$log" || true)
    printf '%-14s %8s %12s %8s %8s\n' "$target" "${took:-?}" "${runs:-?}" "${rate:-?}" "$crashes"
done
