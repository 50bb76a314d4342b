#!/usr/bin/env bash
# Runs the kernel crate's tests (kernels/tests/kernels.rs and its unit tests) under
# AddressSanitizer and ThreadSanitizer with the nightly toolchain (`-Zsanitizer`; the
# runtimes ship with nightly's rust-std). Without rust-src, std is not rebuilt with the
# sanitizer; see docs/sanitizers.md for what each run covers and how to read it.
#
# Usage: kernels/scripts/sanitizers.sh [address] [thread]   (default: both)
set -euo pipefail
cd "$(dirname "$0")/../.."
target=$(rustc +nightly -vV | sed -n 's/^host: //p')
sanitizers=("$@")
[ ${#sanitizers[@]} -eq 0 ] && sanitizers=(address thread)
for s in "${sanitizers[@]}"; do
  echo "== $s sanitizer =="
  dir="target/sanitizer-$s"
  flags="-Zsanitizer=$s -Cdebug-assertions=on"
  if [ "$s" = thread ]; then
    # An ABI-changing flag that the prebuilt std does not carry: accept the mismatch
    # (std's own synchronisation is then invisible to ThreadSanitizer). It keeps going
    # and logs every report under $dir.
    flags="$flags -Cunsafe-allow-abi-mismatch=sanitizer"
    mkdir -p "$dir" && rm -f "$dir"/tsan.*
    export KERNEL_TEST_THREADS="${KERNEL_TEST_THREADS:-1,2,3}"
    export TSAN_OPTIONS="halt_on_error=0 exitcode=0 suppressions=$PWD/kernels/scripts/tsan.supp log_path=$PWD/$dir/tsan"
  else
    export ASAN_OPTIONS="detect_leaks=1"
  fi
  RUSTFLAGS="$flags" CARGO_TARGET_DIR="$dir" \
    cargo +nightly test --release -p versatile-kernels --target "$target" --lib --tests
  if [ "$s" = thread ]; then
    echo "ThreadSanitizer reports: $(cat "$dir"/tsan.* 2>/dev/null | grep -c 'WARNING: ThreadSanitizer' || true) (logs: $dir/tsan.*)"
  fi
done
