//! What a forward pass does to each output value as it writes it: the per-channel affine
//! map of a bias or a folded batch norm, a residual add and a ReLU, in one write instead
//! of a pass each over the output.

use super::plan::ConvPlan;
use super::Real;

/// The output write of a forward pass: `y = acc * scale[ch] + shift[ch] (+ residual[i])`,
/// then `max(y, 0)` when `relu` (NaN stays NaN, as PyTorch's ReLU).
///
/// A versatile layer's batch norm cannot be folded into its weight (the crops of one
/// primary filter are different output channels, each with its own scale), so the scale
/// lives here; a dense layer's can, and then `scale` is `None`.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a, T> {
    /// Per output channel factor (`None`: 1).
    pub scale: Option<&'a [T]>,
    /// Per output channel offset: the bias, or the folded batch norm's shift (`None`: 0).
    pub shift: Option<&'a [T]>,
    /// A tensor of the output's shape added before the ReLU (ResNet's shortcut).
    pub residual: Option<&'a [T]>,
    /// Whether negative values become zero.
    pub relu: bool,
    /// Whether a 2 x 2 max pooling of stride 2 follows (floor mode, no padding; a NaN
    /// wins, as [`crate::pool::max_pool2d`]): the output is then `[batch, n, out_h / 2,
    /// out_w / 2]`, and the full-size output is never written. Not with a residual.
    pub pool: bool,
}

impl<T> Default for Epilogue<'_, T> {
    fn default() -> Self {
        Self {
            scale: None,
            shift: None,
            residual: None,
            relu: false,
            pool: false,
        }
    }
}

/// A method `$name` with the arguments of `write_run_portable`, compiled with the target
/// feature `$feature` (the portable body inlined, so its loops use those vectors).
#[cfg(target_arch = "x86_64")]
macro_rules! isa_version {
    ($name:ident, $feature:literal) => {
        /// `write_run` compiled for one instruction set.
        ///
        /// # Safety
        /// As `write_run`, on a CPU with that instruction set.
        #[target_feature(enable = $feature)]
        unsafe fn $name(
            &self,
            acc: (*const T, usize),
            factors: (T, T),
            out: *mut T,
            at: usize,
            len: usize,
        ) {
            // SAFETY: forwarded to the caller.
            unsafe { self.write_run_portable(acc, factors, out, at, len) }
        }
    };
}

impl<'a, T: Real> Epilogue<'a, T> {
    /// The plain convolution's write: `acc + bias[ch]`.
    pub fn bias(bias: Option<&'a [T]>) -> Self {
        Self {
            shift: bias,
            ..Self::default()
        }
    }

    /// Checks the lengths against `plan`.
    ///
    /// # Panics
    /// If `scale` or `shift` does not hold one value per output channel, or `residual`
    /// one per output value.
    pub(super) fn check(&self, plan: &ConvPlan) {
        for (what, values) in [("scale", self.scale), ("shift", self.shift)] {
            if let Some(values) = values {
                assert_eq!(values.len(), plan.out_channels(), "epilogue {what} length");
            }
        }
        assert!(
            !(self.pool && self.residual.is_some()),
            "an epilogue pools or adds a residual, not both"
        );
        if let Some(residual) = self.residual {
            assert_eq!(
                residual.len(),
                plan.output_len(),
                "epilogue residual length"
            );
        }
    }

    /// Checks the arguments of a pass on channels-last activations: `x` and `out` hold
    /// the lengths given with them, scale and shift one value per output channel, the
    /// residual one per output value, and the epilogue does not pool.
    ///
    /// # Panics
    /// If one of them does not.
    pub(crate) fn check_channels_last(
        &self,
        (x, input_len): (&[T], usize),
        (out, output_len): (&[T], usize),
        out_channels: usize,
    ) {
        assert_eq!(x.len(), input_len, "input length");
        assert_eq!(out.len(), output_len, "output length");
        assert!(!self.pool, "a channels-last convolution does not pool");
        for (what, values) in [("scale", self.scale), ("shift", self.shift)] {
            if let Some(values) = values {
                assert_eq!(values.len(), out_channels, "epilogue {what} length");
            }
        }
        if let Some(residual) = self.residual {
            assert_eq!(residual.len(), out.len(), "epilogue residual length");
        }
    }

    /// Values of the output this epilogue writes for `plan`: the plan's output, or the
    /// pooled one.
    pub fn output_len(&self, plan: &ConvPlan) -> usize {
        if self.pool {
            let [batch, n, h, w] = plan.output_shape();
            batch * n * (h / 2) * (w / 2)
        } else {
            plan.output_len()
        }
    }

    /// Writes one pooled output row: `out[at + i]` for `i < len`, the maximum of the
    /// 2 x 2 window at column `2i` of the two accumulated rows `top` and `bottom` (each
    /// `2 * len` values, `acc_cs` apart) of a channel with factors `factors`, each value
    /// through [`write_run`](Self::write_run) first. `rows` is scratch of `4 * len`
    /// values. (The same selects, in the same order, as `max_pool2d` on the written
    /// output, so the same values.)
    ///
    /// # Safety
    /// `out + at + [0, len)` must be valid for writes and not accessed by anyone else
    /// meanwhile; `top + i * acc_cs` and `bottom + i * acc_cs` must be valid for reads,
    /// and not written meanwhile, for every `i < 2 * len`. No residual (`check`).
    pub(super) unsafe fn write_pooled_row(
        &self,
        ([top, bottom], acc_cs): ([*const T; 2], usize),
        factors: (T, T),
        rows: &mut [T],
        out: *mut T,
        at: usize,
        len: usize,
    ) {
        let (top_row, bottom_row) = rows[..4 * len].split_at_mut(2 * len);
        // SAFETY: the caller's promise for the accumulator; the scratch rows hold 2 * len
        // values each; without a residual `write_run` reads nothing at `at`.
        unsafe {
            self.write_run((top, acc_cs), factors, top_row.as_mut_ptr(), 0, 2 * len);
            self.write_run(
                (bottom, acc_cs),
                factors,
                bottom_row.as_mut_ptr(),
                0,
                2 * len,
            );
        }
        // SAFETY: the caller grants exclusive access to out[at..at + len].
        let dst = unsafe { std::slice::from_raw_parts_mut(out.add(at), len) };
        crate::pool::pool_row_pair(top_row, bottom_row, dst);
    }

    /// The `(scale, shift)` of output channel `ch`.
    #[inline]
    pub(super) fn channel(&self, ch: usize) -> (T, T) {
        (
            self.scale.map_or(T::ONE, |s| s[ch]),
            self.shift.map_or(T::ZERO, |s| s[ch]),
        )
    }

    /// The value written at output index `index` for the accumulated `acc` of a channel
    /// whose [`channel`](Self::channel) factors are `(scale, shift)`.
    #[inline]
    pub(super) fn apply(&self, acc: T, (scale, shift): (T, T), index: usize) -> T {
        let mut y = acc * scale + shift;
        if let Some(residual) = self.residual {
            y += residual[index];
        }
        if self.relu && y <= T::ZERO {
            T::ZERO
        } else {
            y
        }
    }

    /// Writes the `len` output values from index `at` on, from the accumulated values
    /// `acc[i * acc_cs]` of a channel with factors `(scale, shift)`: the same values as
    /// [`apply`](Self::apply) one by one, with the branches taken once per run so that a
    /// unit-stride run vectorizes. (The accumulator is a pointer: other threads may be
    /// writing other parts of its buffer meanwhile.)
    ///
    /// # Safety
    /// `out + at + [0, len)` must be valid for writes and not accessed by anyone else
    /// meanwhile; `at + len` must not exceed the residual's length; `acc + i * acc_cs`
    /// must be valid for reads, and not written meanwhile, for every `i < len`.
    #[inline]
    pub(super) unsafe fn write_run(
        &self,
        acc: (*const T, usize),
        factors: (T, T),
        out: *mut T,
        at: usize,
        len: usize,
    ) {
        // The widest vectors this CPU has (the same operations, so the same bits).
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F; the rest is the caller's promise.
                return unsafe { self.write_run_avx512(acc, factors, out, at, len) };
            }
            if is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2; the rest is the caller's promise.
                return unsafe { self.write_run_avx2(acc, factors, out, at, len) };
            }
        }
        // SAFETY: the caller's promise.
        unsafe { self.write_run_portable(acc, factors, out, at, len) }
    }

    // `write_run` compiled for AVX-512F and for AVX2, each to be called on a CPU that
    // has it (safety: as `write_run`, on such a CPU).
    #[cfg(target_arch = "x86_64")]
    isa_version!(write_run_avx512, "avx512f");
    #[cfg(target_arch = "x86_64")]
    isa_version!(write_run_avx2, "avx2");

    /// [`write_run`](Self::write_run) for any CPU, inlined into the versions above.
    ///
    /// # Safety
    /// As `write_run`.
    #[inline(always)]
    unsafe fn write_run_portable(
        &self,
        (acc, acc_cs): (*const T, usize),
        (scale, shift): (T, T),
        out: *mut T,
        at: usize,
        len: usize,
    ) {
        if len == 0 {
            return;
        }
        // SAFETY: the caller grants exclusive access to out[at..at + len].
        let dst = unsafe { std::slice::from_raw_parts_mut(out.add(at), len) };
        if acc_cs != 1 {
            for (i, d) in dst.iter_mut().enumerate() {
                // SAFETY: i < len, granted by the caller.
                let a = unsafe { *acc.add(i * acc_cs) };
                *d = self.apply(a, (scale, shift), at + i);
            }
            return;
        }
        // SAFETY: unit stride: the caller grants the len values from acc.
        let src = unsafe { std::slice::from_raw_parts(acc, len) };
        let relu = |y: T| if y <= T::ZERO { T::ZERO } else { y };
        match (self.residual.map(|r| &r[at..at + len]), self.relu) {
            (None, false) => {
                for (d, &a) in dst.iter_mut().zip(src) {
                    *d = a * scale + shift;
                }
            }
            (None, true) => {
                for (d, &a) in dst.iter_mut().zip(src) {
                    *d = relu(a * scale + shift);
                }
            }
            (Some(residual), false) => {
                for ((d, &a), &r) in dst.iter_mut().zip(src).zip(residual) {
                    *d = a * scale + shift + r;
                }
            }
            (Some(residual), true) => {
                for ((d, &a), &r) in dst.iter_mut().zip(src).zip(residual) {
                    *d = relu(a * scale + shift + r);
                }
            }
        }
    }
}
