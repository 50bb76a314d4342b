//! Batch normalisation of NCHW activations in training: a batch's per-channel statistics,
//! the normalisation with them (optionally followed by a ReLU, or by a residual add and a
//! ReLU, in the same write), and its gradients, each in one pass over the activation and
//! without moving the channel axis (a generic batch norm transposes the activation to
//! channel-major for every reduction, forward and backward). The backward passes
//! recompute the ReLU's mask from the input, bit for bit as the forward computed it, so
//! no mask or output is kept.
//!
//! Every channel's sums run in one fixed order (image by image; within a plane in eight
//! interleaved f32 lanes, each plane's total added in f64), whatever the thread count, so
//! results are the same bits on every run.

use rayon::prelude::*;

use crate::moments::{channel_moments, lane_sums, Moments};
use crate::pool::Pool2d;
use crate::workspace::zeroed_slots as zeroed;

/// An NCHW activation as the batch-norm kernels see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormShape {
    /// Images.
    pub batch: usize,
    /// Channels.
    pub channels: usize,
    /// Values per channel and image (height × width).
    pub plane: usize,
}

impl NormShape {
    /// Values in the activation.
    pub fn len(&self) -> usize {
        self.batch * self.channels * self.plane
    }

    /// Whether the activation has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values each channel's statistics are taken over.
    fn count(&self) -> f64 {
        (self.batch * self.plane) as f64
    }

    /// Plane `i` of an activation: image `i / channels`, channel `i % channels`.
    fn plane_at<'a, T>(&self, values: &'a [T], i: usize) -> &'a [T] {
        &values[i * self.plane..][..self.plane]
    }

    /// Channel `channel`'s plane of each image, in image order.
    fn planes<'a>(
        &self,
        values: &'a [f32],
        channel: usize,
    ) -> impl Iterator<Item = &'a [f32]> + Clone {
        let (channels, plane) = (self.channels, self.plane);
        (0..self.batch).map(move |b| &values[(b * channels + channel) * plane..][..plane])
    }
}

/// The batch statistics of `x`: `stats[c]` is channel `c`'s mean and
/// `stats[channels + c]` its biased variance (the mean squared deviation, what a
/// training batch norm normalises by).
///
/// # Panics
/// If `x` or `stats` does not have the length `shape` gives them.
pub fn batch_stats(x: &[f32], shape: NormShape, stats: &mut [f32]) {
    assert_eq!(x.len(), shape.len(), "batch_stats: input length");
    let moments = channel_moments(x, [shape.batch, shape.channels, shape.plane]);
    stats_from_moments(&moments, stats);
}

/// `stats` as [`batch_stats`] writes them (means, then biased variances, as f32) from
/// each channel's moments.
///
/// # Panics
/// If `stats` does not hold two values per channel.
pub fn stats_from_moments(moments: &[Moments], stats: &mut [f32]) {
    let channels = moments.len();
    assert_eq!(stats.len(), 2 * channels, "batch_stats: stats length");
    let (means, variances) = stats.split_at_mut(channels);
    for (c, moments) in moments.iter().enumerate() {
        means[c] = moments.mean as f32;
        variances[c] = moments.variance() as f32;
    }
}

/// `1 / sqrt(variance + epsilon)`, as both passes compute it.
fn inv_std(variance: f32, epsilon: f64) -> f32 {
    (1.0 / (f64::from(variance) + epsilon).sqrt()) as f32
}

/// Channel `c`'s affine map `x * scale + shift` equal to `(x - mean) * inv_std * gamma +
/// beta`: the forward pass and the backward's ReLU mask compute it alike, to the bit.
fn affine(c: usize, gamma: &[f32], beta: &[f32], stats: &[f32], epsilon: f64) -> (f32, f32) {
    let channels = gamma.len();
    let scale = gamma[c] * inv_std(stats[channels + c], epsilon);
    (scale, beta[c] - stats[c] * scale)
}

/// A new activation of `shape` whose plane `i` (image `i / channels`, channel
/// `i % channels`) `fill(i, plane)` writes, the planes in parallel, each handed to `fill`
/// zeroed (`T::default()`): a plane is zeroed in cache just before it is written, not the
/// whole activation in a pass of its own (which cost as much as the write).
fn fill_planes<T: Copy + Default + Send>(
    shape: NormShape,
    fill: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    // `()` takes no memory: the second activation is free.
    fill_plane_pairs::<T, ()>(
        shape,
        shape,
        #[inline(always)]
        |i, plane, _| fill(i, plane),
    )
    .0
}

/// Two new activations, of shapes `a` and `b` with the same number of planes, whose
/// planes `i` `fill(i, a_plane, b_plane)` writes, as [`fill_planes`] does.
///
/// # Panics
/// If the shapes have different numbers of planes.
fn fill_plane_pairs<A, B>(
    a: NormShape,
    b: NormShape,
    fill: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) -> (Vec<A>, Vec<B>)
where
    A: Copy + Default + Send,
    B: Copy + Default + Send,
{
    assert_eq!(
        a.batch * a.channels,
        b.batch * b.channels,
        "fill_plane_pairs: planes"
    );
    let planes = a.batch * a.channels;
    if a.plane == 0 || b.plane == 0 {
        // Nothing to split into chunks on one side: no parallel pass.
        let (mut first, mut second) = (vec![A::default(); a.len()], vec![B::default(); b.len()]);
        for i in 0..planes {
            fill(
                i,
                &mut first[i * a.plane..][..a.plane],
                &mut second[i * b.plane..][..b.plane],
            );
        }
        return (first, second);
    }
    // Planes per task: small maps' planes (ResNet-18's last stages at 32 x 32: 4 values
    // and 1) go several to a task, so that a task is not one call per value.
    let per_task = (PLANE_TASK_VALUES / a.plane.max(b.plane)).max(1);
    let (mut first, mut second) = (Vec::with_capacity(a.len()), Vec::with_capacity(b.len()));
    first.spare_capacity_mut()[..a.len()]
        .par_chunks_mut(a.plane * per_task)
        .zip(second.spare_capacity_mut()[..b.len()].par_chunks_mut(b.plane * per_task))
        .enumerate()
        .for_each(|(task, (a_slots, b_slots))| {
            fill_widest(
                #[inline(always)]
                |a_task: &mut [A], b_task: &mut [B]| {
                    let pairs = a_task.chunks_mut(a.plane).zip(b_task.chunks_mut(b.plane));
                    for (j, (a_plane, b_plane)) in pairs.enumerate() {
                        fill(task * per_task + j, a_plane, b_plane);
                    }
                },
                zeroed(a_slots),
                zeroed(b_slots),
            )
        });
    // SAFETY: `Vec::with_capacity` made room for `a.len()` and `b.len()` values; the
    // chunks cover the first `a.len()` (`b.len()`) spare slots exactly (both have
    // `a.batch * a.channels` planes, `per_task` to a chunk but for the last), and every
    // task wrote each slot of its chunks (`zeroed`, then `fill`) before this line (a
    // task's panic reaches this thread first).
    unsafe {
        first.set_len(a.len());
        second.set_len(b.len());
    }
    (first, second)
}

/// Values a task of [`fill_plane_pairs`] fills at least, where the planes are smaller.
const PLANE_TASK_VALUES: usize = 4096;

/// `fill(a, b)` compiled for the widest vectors of this CPU (the plane loops of the
/// normalisation and its gradient are element by element, so the same bits on every
/// CPU; x86-64's baseline handles four floats at a time).
#[inline(always)]
fn fill_widest<A, B, F: Fn(&mut [A], &mut [B])>(fill: F, a: &mut [A], b: &mut [B]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { wide::fill_avx512(&fill, a, b) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { wide::fill_avx2(&fill, a, b) };
        }
    }
    fill(a, b)
}

/// The plane fills compiled for wider vectors than x86-64's baseline.
#[cfg(target_arch = "x86_64")]
mod wide {
    /// A plane fill compiled with the target feature `$feature`.
    macro_rules! isa_version {
        ($feature:literal, $name:ident) => {
            /// `fill(a, b)` for one instruction set (the closure inlined into it).
            ///
            /// # Safety
            /// The CPU must have the instruction set.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name<A, B, F: Fn(&mut [A], &mut [B])>(
                fill: &F,
                a: &mut [A],
                b: &mut [B],
            ) {
                fill(a, b)
            }
        };
    }

    isa_version!("avx512f", fill_avx512);
    isa_version!("avx2", fill_avx2);
}

/// [`fill_planes`] with each plane's values from an iterator: plane `i` holds the values
/// `plane(i)` yields.
///
/// # Panics
/// If an iterator yields fewer values than a plane holds.
fn write_planes<I: Iterator<Item = f32>>(
    shape: NormShape,
    plane: impl Fn(usize) -> I + Sync,
) -> Vec<f32> {
    fill_planes(
        shape,
        #[inline(always)]
        |i, dst| {
            let mut written = 0;
            for (slot, value) in dst.iter_mut().zip(plane(i)) {
                *slot = value;
                written += 1;
            }
            assert_eq!(written, dst.len(), "write_planes: plane {i} is short");
        },
    )
}

/// Panics (naming `op`) unless every activation in `activations` has `shape`'s length,
/// every vector in `per_channel` one value per channel, and `stats` two.
fn check_lengths(
    op: &str,
    shape: NormShape,
    activations: &[(&str, &[f32])],
    per_channel: &[(&str, &[f32])],
    stats: &[f32],
) {
    for (what, values) in activations {
        assert_eq!(values.len(), shape.len(), "{op}: {what} length");
    }
    for (what, values) in per_channel {
        assert_eq!(values.len(), shape.channels, "{op}: {what} length");
    }
    assert_eq!(stats.len(), 2 * shape.channels, "{op}: stats length");
}

/// `relu?((x - mean) / sqrt(variance + epsilon) * gamma + beta)` per channel, with
/// `stats` as [`batch_stats`] gives them: a new activation of `x`'s shape.
///
/// # Panics
/// If a slice does not have the length `shape` gives it.
pub fn normalize(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: &[f32],
    epsilon: f64,
    relu: bool,
    shape: NormShape,
) -> Vec<f32> {
    // One instance per setting, so the element loop has no test of `relu`.
    if relu {
        normalize_as::<true>(x, gamma, beta, stats, epsilon, shape)
    } else {
        normalize_as::<false>(x, gamma, beta, stats, epsilon, shape)
    }
}

fn normalize_as<const RELU: bool>(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: &[f32],
    epsilon: f64,
    shape: NormShape,
) -> Vec<f32> {
    let per_channel = [("gamma", gamma), ("beta", beta)];
    check_lengths("normalize", shape, &[("input", x)], &per_channel, stats);
    write_planes(
        shape,
        #[inline(always)]
        |i| {
            let (scale, shift) = affine(i % shape.channels, gamma, beta, stats, epsilon);
            shape.plane_at(x, i).iter().map(move |&v| {
                let y = v * scale + shift;
                // NaN passes the ReLU, so that a diverging run still shows in its loss.
                if RELU && y < 0.0 {
                    0.0
                } else {
                    y
                }
            })
        },
    )
}

/// `relu(normalize(x) + residual)`: the end of a residual block (the second batch norm,
/// the shortcut's add and the ReLU) in one pass; a new activation of `x`'s shape.
///
/// # Panics
/// If a slice does not have the length `shape` gives it.
pub fn normalize_add_relu(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: &[f32],
    epsilon: f64,
    residual: &[f32],
    shape: NormShape,
) -> Vec<f32> {
    let activations = [("input", x), ("residual", residual)];
    let per_channel = [("gamma", gamma), ("beta", beta)];
    check_lengths(
        "normalize_add_relu",
        shape,
        &activations,
        &per_channel,
        stats,
    );
    let sums = ResidualSums::new(x, residual, gamma, beta, stats, epsilon, shape);
    write_planes(
        shape,
        #[inline(always)]
        |i| sums.plane(i).map(|y| if y < 0.0 { 0.0 } else { y }),
    )
}

/// `normalize(x) + residual`, plane by plane: what [`normalize_add_relu`] writes before
/// its ReLU and [`add_relu_backward`] recomputes, to the bit, for the ReLU's mask.
struct ResidualSums<'a> {
    x: &'a [f32],
    residual: &'a [f32],
    gamma: &'a [f32],
    beta: &'a [f32],
    stats: &'a [f32],
    epsilon: f64,
    shape: NormShape,
}

impl<'a> ResidualSums<'a> {
    /// The sums of `x`'s normalisation (with `gamma`, `beta`, `stats` and `epsilon`) and
    /// `residual`, activations of `shape`.
    fn new(
        x: &'a [f32],
        residual: &'a [f32],
        gamma: &'a [f32],
        beta: &'a [f32],
        stats: &'a [f32],
        epsilon: f64,
        shape: NormShape,
    ) -> Self {
        Self {
            x,
            residual,
            gamma,
            beta,
            stats,
            epsilon,
            shape,
        }
    }

    /// Plane `i`'s values.
    #[inline(always)]
    fn plane(&self, i: usize) -> impl Iterator<Item = f32> + '_ {
        let shape = self.shape;
        let (scale, shift) = affine(
            i % shape.channels,
            self.gamma,
            self.beta,
            self.stats,
            self.epsilon,
        );
        shape
            .plane_at(self.x, i)
            .iter()
            .zip(shape.plane_at(self.residual, i))
            .map(move |(&v, &r)| v * scale + shift + r)
    }
}

/// The gradient of [`normalize_add_relu`] at its ReLU: `grad` where `normalize(x) +
/// residual`, recomputed to the bit, is above zero, else zero. It is the residual's
/// gradient, and [`normalize_backward`] (without ReLU) of it gives the others.
///
/// # Panics
/// If a slice does not have the length `shape` gives it.
#[allow(clippy::too_many_arguments)]
pub fn add_relu_backward(
    x: &[f32],
    grad: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: &[f32],
    epsilon: f64,
    residual: &[f32],
    shape: NormShape,
) -> Vec<f32> {
    let activations = [("input", x), ("gradient", grad), ("residual", residual)];
    let per_channel = [("gamma", gamma), ("beta", beta)];
    check_lengths(
        "add_relu_backward",
        shape,
        &activations,
        &per_channel,
        stats,
    );
    let sums = ResidualSums::new(x, residual, gamma, beta, stats, epsilon, shape);
    write_planes(
        shape,
        #[inline(always)]
        |i| {
            sums.plane(i)
                .zip(shape.plane_at(grad, i))
                .map(|(y, &g)| if y <= 0.0 { 0.0 } else { g })
        },
    )
}

/// Where each output of [`normalize_relu_max_pool`] took its value: an index into its
/// input plane, or [`NOT_PASSED`].
pub type PoolSources = Vec<u32>;

/// A [`PoolSources`] entry for an output whose ReLU passes no gradient (its window's
/// maximum is at or below zero, or the window is empty).
pub const NOT_PASSED: u32 = u32::MAX;

/// `max_pool(relu(normalize(x)))` with `pool`'s window (the input `pool.input`, the
/// statistics as [`batch_stats`] gives them): a convolution block's batch norm, ReLU and
/// max pooling in one pass that writes only the pooled activation, and for each output
/// where in its plane its value came from (what [`relu_max_pool_backward`] needs). The
/// maximum is the first largest value of the window in row-major order, a NaN winning
/// (the last NaN), as PyTorch and burn take it, so the gradient goes where theirs goes;
/// an output whose maximum is at or below zero is 0, as after a ReLU.
///
/// # Panics
/// If a slice does not have the length `pool` gives it, the window is empty, or a plane
/// has more than `u32::MAX - 1` values.
pub fn normalize_relu_max_pool(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: &[f32],
    epsilon: f64,
    pool: &Pool2d,
) -> (Vec<f32>, PoolSources) {
    let (shape, pooled) = pool_shapes(pool);
    let per_channel = [("gamma", gamma), ("beta", beta)];
    check_lengths(
        "normalize_relu_max_pool",
        shape,
        &[("input", x)],
        &per_channel,
        stats,
    );
    assert!(
        shape.plane < NOT_PASSED as usize,
        "normalize_relu_max_pool: a plane of {} values",
        shape.plane
    );
    let windows = pool.windows();
    fill_plane_pairs(
        pooled,
        pooled,
        |i, values: &mut [f32], sources: &mut [u32]| {
            let (scale, shift) = affine(i % shape.channels, gamma, beta, stats, epsilon);
            let plane = shape.plane_at(x, i);
            // The ReLU passes above zero and NaN, as in `normalize`.
            if !windows.relu_pairs_max(plane, [scale, shift], values, sources, NOT_PASSED) {
                windows.relu_any_max(plane, [scale, shift], values, sources, NOT_PASSED);
            }
        },
    )
}

/// The gradients of [`normalize_relu_max_pool`] for the pooled output gradient `grad`,
/// with the `sources` its forward pass gave: returns `dx` and writes per channel `dgamma`
/// and `dbeta`, the statistics' dependence on `x` included. Each output's gradient goes
/// to its source (added up where overlapping windows share one), so the reductions visit
/// the outputs only, and `dx` is written in one pass.
///
/// # Panics
/// If a slice does not have the length `pool` gives it, or a source is outside its plane.
#[allow(clippy::too_many_arguments)]
pub fn relu_max_pool_backward(
    x: &[f32],
    grad: &[f32],
    sources: &[u32],
    gamma: &[f32],
    stats: &[f32],
    epsilon: f64,
    pool: &Pool2d,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Vec<f32> {
    let (shape, pooled) = pool_shapes(pool);
    let per_channel = [("gamma", gamma), ("dgamma", &*dgamma), ("dbeta", &*dbeta)];
    check_lengths(
        "relu_max_pool_backward",
        shape,
        &[("input", x)],
        &per_channel,
        stats,
    );
    assert_eq!(
        grad.len(),
        pooled.len(),
        "relu_max_pool_backward: gradient length"
    );
    assert_eq!(
        sources.len(),
        pooled.len(),
        "relu_max_pool_backward: sources length"
    );
    // Each passed output's gradient and its source's input value, plane `i`'s.
    let passed = |i: usize| {
        let plane = shape.plane_at(x, i);
        pooled
            .plane_at(grad, i)
            .iter()
            .zip(pooled.plane_at(sources, i))
            .filter(|&(_, &at)| at != NOT_PASSED)
            .map(move |(&g, &at)| (g, at as usize, plane[at as usize]))
    };
    let sums: Vec<(f64, f64)> = (0..shape.channels)
        .into_par_iter()
        .map(|c| {
            let mean = stats[c];
            let (mut sum_g, mut sum_gc) = (0f64, 0f64);
            for b in 0..shape.batch {
                for (g, _, v) in passed(b * shape.channels + c) {
                    sum_g += f64::from(g);
                    sum_gc += f64::from(g * (v - mean));
                }
            }
            (sum_g, sum_gc)
        })
        .collect();
    let coefficients = gradient_coefficients(&sums, gamma, stats, epsilon, shape, dgamma, dbeta);
    fill_planes(
        shape,
        #[inline(always)]
        |i, dst: &mut [f32]| {
            let (a, b, k) = coefficients[i % shape.channels];
            for (dx, &v) in dst.iter_mut().zip(shape.plane_at(x, i)) {
                *dx = b * v + k;
            }
            for (g, at, _) in passed(i) {
                dst[at] += a * g;
            }
        },
    )
}

/// The input's and the output's shapes of `pool` as the batch-norm kernels see them.
fn pool_shapes(pool: &Pool2d) -> (NormShape, NormShape) {
    pool.check_window();
    let [batch, channels, h, w] = pool.input;
    let input = NormShape {
        batch,
        channels,
        plane: h * w,
    };
    let output = NormShape {
        plane: pool.output[0] * pool.output[1],
        ..input
    };
    (input, output)
}

/// The gradients of [`normalize`] (with the same `relu`) with the batch's own statistics
/// (the statistics' dependence on `x` included) for the output gradient `grad`: returns
/// `dx` (same shape as `x`) and writes per channel `dgamma` and `dbeta`. With `relu`, the
/// gradient passes where the normalised value, recomputed from `x`, is above zero.
///
/// # Panics
/// If a slice does not have the length `shape` gives it.
#[allow(clippy::too_many_arguments)]
pub fn normalize_backward(
    x: &[f32],
    grad: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: &[f32],
    epsilon: f64,
    relu: bool,
    shape: NormShape,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Vec<f32> {
    // One instance per setting, as in `normalize`.
    let backward = if relu {
        normalize_backward_as::<true>
    } else {
        normalize_backward_as::<false>
    };
    backward(x, grad, gamma, beta, stats, epsilon, shape, dgamma, dbeta)
}

#[allow(clippy::too_many_arguments)]
fn normalize_backward_as<const RELU: bool>(
    x: &[f32],
    grad: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: &[f32],
    epsilon: f64,
    shape: NormShape,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Vec<f32> {
    let channels = shape.channels;
    let per_channel = [
        ("gamma", gamma),
        ("beta", beta),
        ("dgamma", &*dgamma),
        ("dbeta", &*dbeta),
    ];
    let activations = [("input", x), ("gradient", grad)];
    check_lengths(
        "normalize_backward",
        shape,
        &activations,
        &per_channel,
        stats,
    );
    let passed = |g: f32, v: f32, map: (f32, f32)| passed_gradient::<RELU>(g, v, map);
    // Per channel: the sum of the gradient and of the gradient times the centred input.
    let sums: Vec<(f64, f64)> = (0..channels)
        .into_par_iter()
        .map(|c| {
            let mean = stats[c];
            let map = affine(c, gamma, beta, stats, epsilon);
            shape
                .planes(grad, c)
                .zip(shape.planes(x, c))
                .map(|(g, x)| gradient_sums::<RELU>(g, x, map, mean))
                .fold((0.0, 0.0), |(a, b), (p, q)| (a + p, b + q))
        })
        .collect();
    let coefficients = gradient_coefficients(&sums, gamma, stats, epsilon, shape, dgamma, dbeta);
    write_planes(
        shape,
        #[inline(always)]
        |i| {
            let c = i % channels;
            let (a, b, k) = coefficients[c];
            let map = affine(c, gamma, beta, stats, epsilon);
            shape
                .plane_at(grad, i)
                .iter()
                .zip(shape.plane_at(x, i))
                .map(move |(&g, &v)| a * passed(g, v, map) + b * v + k)
        },
    )
}

/// The output gradient `g` where the ReLU passes it (everywhere without ReLU): not where
/// the normalised value `v * scale + shift` is at or below zero (burn's and PyTorch's ReLU
/// gradient; NaN passes).
#[inline(always)]
fn passed_gradient<const RELU: bool>(g: f32, v: f32, (scale, shift): (f32, f32)) -> f32 {
    if RELU && v * scale + shift <= 0.0 {
        0.0
    } else {
        g
    }
}

/// `(sum of p, sum of p * (x - mean))` over one plane of the output gradient `g` and the
/// input `x`, `p` the [passed](passed_gradient) gradient: [`lane_sums`]'s lanes and order,
/// in AVX2 where the CPU has it (the compiler leaves the ReLU's select scalar).
fn gradient_sums<const RELU: bool>(g: &[f32], x: &[f32], map: (f32, f32), mean: f32) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { avx2::gradient_sums::<RELU>(g, x, map, mean) };
    }
    lane_sums(
        g,
        x,
        |g, x| passed_gradient::<RELU>(g, x, map),
        |g, x| passed_gradient::<RELU>(g, x, map) * (x - mean),
    )
}

/// The backward's reductions in AVX2.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::passed_gradient;

    /// `super::gradient_sums` in AVX2: eight lanes, each the portable version's lane
    /// (the same operations on the same values in the same order, no fused multiply-add),
    /// added into f64 in lane order, then the tail.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    ///
    /// # Panics
    /// If the slices differ in length.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn gradient_sums<const RELU: bool>(
        g: &[f32],
        x: &[f32],
        (scale, shift): (f32, f32),
        mean: f32,
    ) -> (f64, f64) {
        assert_eq!(g.len(), x.len(), "gradient_sums: lengths");
        let body = g.len() / 8 * 8;
        let zero = _mm256_setzero_ps();
        let (scale_v, shift_v, mean_v) = (
            _mm256_set1_ps(scale),
            _mm256_set1_ps(shift),
            _mm256_set1_ps(mean),
        );
        let (mut first, mut second) = (zero, zero);
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 <= body <= the length of both slices.
            let (gv, xv) = unsafe {
                (
                    _mm256_loadu_ps(g.as_ptr().add(i)),
                    _mm256_loadu_ps(x.as_ptr().add(i)),
                )
            };
            let passed = if RELU {
                let y = _mm256_add_ps(_mm256_mul_ps(xv, scale_v), shift_v);
                // Not (y <= 0): above zero, or NaN.
                _mm256_and_ps(_mm256_cmp_ps::<_CMP_NLE_UQ>(y, zero), gv)
            } else {
                gv
            };
            first = _mm256_add_ps(first, passed);
            second = _mm256_add_ps(second, _mm256_mul_ps(passed, _mm256_sub_ps(xv, mean_v)));
        }
        let (mut first_lanes, mut second_lanes) = ([0f32; 8], [0f32; 8]);
        // SAFETY: each array holds eight f32 values; unaligned stores.
        unsafe {
            _mm256_storeu_ps(first_lanes.as_mut_ptr(), first);
            _mm256_storeu_ps(second_lanes.as_mut_ptr(), second);
        }
        let (mut sum, mut centred) = (0f64, 0f64);
        for (&f, &s) in first_lanes.iter().zip(&second_lanes) {
            sum += f64::from(f);
            centred += f64::from(s);
        }
        for (&g, &x) in g[body..].iter().zip(&x[body..]) {
            let passed = passed_gradient::<RELU>(g, x, (scale, shift));
            sum += f64::from(passed);
            centred += f64::from(passed * (x - mean));
        }
        (sum, centred)
    }
}

/// The batch-norm gradient `dx = a * g + b * x + k` per channel, `(a, b, k)`, from the
/// sums over each channel of the gradient `g` at the normalisation's output and of `g`
/// times the centred input, `sums[c]`; writes `dgamma` and `dbeta`. From
/// `dx = gamma * inv_std * (g - mean(g) - x_hat * mean(g * x_hat))`.
fn gradient_coefficients(
    sums: &[(f64, f64)],
    gamma: &[f32],
    stats: &[f32],
    epsilon: f64,
    shape: NormShape,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Vec<(f32, f32, f32)> {
    let (channels, count) = (shape.channels, shape.count());
    (0..channels)
        .map(|c| {
            let (sum_g, sum_gc) = sums[c];
            let inv = f64::from(inv_std(stats[channels + c], epsilon));
            let dgamma_c = sum_gc * inv;
            dgamma[c] = dgamma_c as f32;
            dbeta[c] = sum_g as f32;
            let a = f64::from(gamma[c]) * inv;
            let b = -a * inv * dgamma_c / count;
            let k = -a * sum_g / count - b * f64::from(stats[c]);
            (a as f32, b as f32, k as f32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vector_gradient_sums_are_the_portable_ones_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            let mut state = 7u64;
            let mut next = || {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            };
            for len in (0..40).chain([257, 1000]) {
                let g: Vec<f32> = (0..len).map(|_| next()).collect();
                let mut x: Vec<f32> = (0..len).map(|_| next()).collect();
                if len > 5 {
                    // At zero after the map, and NaN: the ReLU's edge cases.
                    x[1] = 0.25;
                    x[4] = f32::NAN;
                }
                let (map, mean) = ((2.0, -0.5), 0.125);
                let portable = |relu: bool| {
                    let passed = |g: f32, x: f32| {
                        if relu {
                            passed_gradient::<true>(g, x, map)
                        } else {
                            passed_gradient::<false>(g, x, map)
                        }
                    };
                    lane_sums(&g, &x, passed, |g, x| passed(g, x) * (x - mean))
                };
                // SAFETY: the CPU has AVX2.
                let vector = unsafe {
                    [
                        avx2::gradient_sums::<false>(&g, &x, map, mean),
                        avx2::gradient_sums::<true>(&g, &x, map, mean),
                    ]
                };
                for (relu, got) in [false, true].into_iter().zip(vector) {
                    let want = portable(relu);
                    let same = |a: f64, b: f64| a.to_bits() == b.to_bits();
                    assert!(
                        same(got.0, want.0) && same(got.1, want.1),
                        "length {len}, relu {relu}: {got:?} against {want:?}"
                    );
                }
            }
        }
    }

    /// Deterministic values in [-1, 1) with an offset per channel.
    fn values(shape: NormShape, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..shape.len())
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let c = (i / shape.plane) % shape.channels;
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 + c as f32
            })
            .collect()
    }

    /// The normalised output's loss `sum(relu?(out) * r)` in f64, straight from the
    /// definition.
    #[allow(clippy::too_many_arguments)]
    fn loss(
        x: &[f64],
        gamma: &[f64],
        beta: &[f64],
        r: &[f32],
        shape: NormShape,
        eps: f64,
        relu: bool,
    ) -> f64 {
        let mut total = 0.0;
        for c in 0..shape.channels {
            let idx = |b: usize, k: usize| (b * shape.channels + c) * shape.plane + k;
            let all = || (0..shape.batch).flat_map(|b| (0..shape.plane).map(move |k| idx(b, k)));
            let mean = all().map(|i| x[i]).sum::<f64>() / shape.count();
            let var = all().map(|i| (x[i] - mean).powi(2)).sum::<f64>() / shape.count();
            for i in all() {
                let y = (x[i] - mean) / (var + eps).sqrt() * gamma[c] + beta[c];
                total += if relu { y.max(0.0) } else { y } * f64::from(r[i]);
            }
        }
        total
    }

    /// Small planes go several to a task (one value, three, and a plane larger than a
    /// task's share; the last task short): each value is its own channel's affine map of
    /// the input, bit for bit.
    #[test]
    fn planes_grouped_into_tasks_are_each_their_own_channel() {
        for (batch, channels, plane) in [(5, 1000, 1), (7, 700, 3), (2, 3, 5000)] {
            let shape = NormShape {
                batch,
                channels,
                plane,
            };
            let x = values(shape, 3);
            let gamma: Vec<f32> = (0..channels).map(|c| 0.5 + (c % 7) as f32 * 0.25).collect();
            let beta: Vec<f32> = (0..channels).map(|c| (c % 5) as f32 * 0.1 - 0.2).collect();
            let mut stats = vec![0.0; 2 * channels];
            batch_stats(&x, shape, &mut stats);
            let out = normalize(&x, &gamma, &beta, &stats, 1e-5, true, shape);
            for (i, (&y, &v)) in out.iter().zip(&x).enumerate() {
                let channel = i / plane % channels;
                let (scale, shift) = affine(channel, &gamma, &beta, &stats, 1e-5);
                let want = (v * scale + shift).max(0.0);
                assert_eq!(y.to_bits(), want.to_bits(), "{shape:?} at {i}");
            }
        }
    }

    #[test]
    fn forward_and_gradients_match_the_definition() {
        let eps = 1e-5;
        let shapes = [
            NormShape {
                batch: 3,
                channels: 4,
                plane: 13,
            },
            NormShape {
                batch: 1,
                channels: 2,
                plane: 20,
            },
        ];
        for (shape, relu) in shapes.into_iter().flat_map(|s| [(s, false), (s, true)]) {
            let x = values(shape, 1);
            let r = values(shape, 2);
            let gamma: Vec<f32> = (0..shape.channels).map(|c| 0.5 + c as f32 * 0.25).collect();
            let beta: Vec<f32> = (0..shape.channels).map(|c| c as f32 * 0.1 - 0.2).collect();
            let mut stats = vec![0.0; 2 * shape.channels];
            batch_stats(&x, shape, &mut stats);
            let out = normalize(&x, &gamma, &beta, &stats, eps, relu, shape);
            let wide = |v: &[f32]| v.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
            let (xw, gw, bw) = (wide(&x), wide(&gamma), wide(&beta));
            let got: f64 = out.iter().zip(&r).map(|(o, r)| f64::from(o * r)).sum();
            let want = loss(&xw, &gw, &bw, &r, shape, eps, relu);
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1.0),
                "{got} vs {want}"
            );

            let (mut dgamma, mut dbeta) = (vec![0.0; shape.channels], vec![0.0; shape.channels]);
            let dx = normalize_backward(
                &x,
                &r,
                &gamma,
                &beta,
                &stats,
                eps,
                relu,
                shape,
                &mut dgamma,
                &mut dbeta,
            );
            // Central differences of the f64 definition.
            let h = 1e-6;
            let diff = |f: &dyn Fn(f64) -> f64| (f(h) - f(-h)) / (2.0 * h);
            for i in [0, 7, shape.len() / 2, shape.len() - 1] {
                let numeric = diff(&|d| {
                    let mut x = xw.clone();
                    x[i] += d;
                    loss(&x, &gw, &bw, &r, shape, eps, relu)
                });
                assert!(
                    (f64::from(dx[i]) - numeric).abs() < 1e-3,
                    "dx[{i}]: {} vs {numeric}",
                    dx[i]
                );
            }
            for c in 0..shape.channels {
                let numeric = diff(&|d| {
                    let mut g = gw.clone();
                    g[c] += d;
                    loss(&xw, &g, &bw, &r, shape, eps, relu)
                });
                assert!((f64::from(dgamma[c]) - numeric).abs() < 1e-3, "dgamma[{c}]");
                let numeric = diff(&|d| {
                    let mut b = bw.clone();
                    b[c] += d;
                    loss(&xw, &gw, &b, &r, shape, eps, relu)
                });
                assert!((f64::from(dbeta[c]) - numeric).abs() < 1e-3, "dbeta[{c}]");
            }
        }
    }
    /// `normalize_add_relu` and its gradients (`add_relu_backward`, then
    /// `normalize_backward` without ReLU) against central differences of the f64 loss
    /// `sum(relu(batch_norm(x) + residual) * r)`.
    #[test]
    fn add_relu_matches_the_definition() {
        let eps = 1e-5;
        let shape = NormShape {
            batch: 3,
            channels: 4,
            plane: 13,
        };
        let x = values(shape, 3);
        let residual: Vec<f32> = values(shape, 4).iter().map(|v| v * 0.5 - 1.0).collect();
        let r = values(shape, 5);
        let gamma: Vec<f32> = (0..shape.channels).map(|c| 0.5 + c as f32 * 0.25).collect();
        let beta: Vec<f32> = (0..shape.channels).map(|c| c as f32 * 0.1 - 0.2).collect();
        let wide = |v: &[f32]| v.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
        let (gw, bw) = (wide(&gamma), wide(&beta));
        let loss = |x: &[f64], res: &[f64]| {
            let mut total = 0.0;
            for c in 0..shape.channels {
                let idx = |b: usize, k: usize| (b * shape.channels + c) * shape.plane + k;
                let all =
                    || (0..shape.batch).flat_map(|b| (0..shape.plane).map(move |k| idx(b, k)));
                let mean = all().map(|i| x[i]).sum::<f64>() / shape.count();
                let var = all().map(|i| (x[i] - mean).powi(2)).sum::<f64>() / shape.count();
                for i in all() {
                    let y = (x[i] - mean) / (var + eps).sqrt() * gw[c] + bw[c] + res[i];
                    total += y.max(0.0) * f64::from(r[i]);
                }
            }
            total
        };
        let mut stats = vec![0.0; 2 * shape.channels];
        batch_stats(&x, shape, &mut stats);
        let out = normalize_add_relu(&x, &gamma, &beta, &stats, eps, &residual, shape);
        let (xw, rw) = (wide(&x), wide(&residual));
        let got: f64 = out.iter().zip(&r).map(|(o, r)| f64::from(o * r)).sum();
        let want = loss(&xw, &rw);
        assert!(
            (got - want).abs() < 1e-4 * want.abs().max(1.0),
            "{got} vs {want}"
        );
        assert!(out.contains(&0.0) && out.iter().any(|&v| v > 0.0));

        let passed = add_relu_backward(&x, &r, &gamma, &beta, &stats, eps, &residual, shape);
        let (mut dgamma, mut dbeta) = (vec![0.0; shape.channels], vec![0.0; shape.channels]);
        let dx = normalize_backward(
            &x,
            &passed,
            &gamma,
            &beta,
            &stats,
            eps,
            false,
            shape,
            &mut dgamma,
            &mut dbeta,
        );
        let h = 1e-6;
        for i in [0, 7, shape.len() / 2, shape.len() - 1] {
            let nudged = |v: &[f64], d: f64| {
                let mut v = v.to_vec();
                v[i] += d;
                v
            };
            let dx_numeric = (loss(&nudged(&xw, h), &rw) - loss(&nudged(&xw, -h), &rw)) / (2.0 * h);
            let dres_numeric =
                (loss(&xw, &nudged(&rw, h)) - loss(&xw, &nudged(&rw, -h))) / (2.0 * h);
            assert!((f64::from(dx[i]) - dx_numeric).abs() < 1e-3, "dx[{i}]");
            assert!(
                (f64::from(passed[i]) - dres_numeric).abs() < 1e-3,
                "dresidual[{i}]"
            );
        }
    }

    /// `normalize_relu_max_pool` equals `normalize` (with ReLU) then `max_pool2d` to the
    /// bit, and its gradients (`relu_max_pool_backward`) match central differences of the f64 loss
    /// `sum(max_pool(relu(batch_norm(x))) * r)`, for a 2x2 window and for an overlapping,
    /// padded 3x3 one (ResNet's stem).
    #[test]
    fn relu_max_pool_matches_the_definition() {
        let eps = 1e-5;
        for (kernel, stride, padding, [h, w]) in [(2, 2, 0, [6, 5]), (3, 2, 1, [7, 6])] {
            let out = |size: usize| (size + 2 * padding - kernel) / stride + 1;
            let pool = Pool2d {
                input: [3, 2, h, w],
                output: [out(h), out(w)],
                kernel: [kernel; 2],
                stride: [stride; 2],
                padding: [padding; 2],
            };
            let (shape, pooled) = pool_shapes(&pool);
            let x = values(shape, 6);
            let r = values(pooled, 7);
            let gamma = [0.7f32, 1.3];
            let beta = [-0.4f32, 0.2];
            let mut stats = vec![0.0; 2 * shape.channels];
            batch_stats(&x, shape, &mut stats);
            let (got, sources) = normalize_relu_max_pool(&x, &gamma, &beta, &stats, eps, &pool);
            let mut want = vec![0.0; pooled.len()];
            let normalized = normalize(&x, &gamma, &beta, &stats, eps, true, shape);
            crate::pool::max_pool2d(&pool, &normalized, &mut want);
            assert_eq!(got, want);
            assert!(
                got.contains(&0.0),
                "no window all below zero: the ReLU is untested"
            );

            let wide = |v: &[f32]| v.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
            let (xw, gw, bw) = (wide(&x), wide(&gamma), wide(&beta));
            let loss = |x: &[f64], gamma: &[f64], beta: &[f64]| {
                let mut total = 0.0;
                for c in 0..shape.channels {
                    let plane = |b: usize| (b * shape.channels + c) * shape.plane;
                    let all = || {
                        (0..shape.batch).flat_map(|b| (0..shape.plane).map(move |k| plane(b) + k))
                    };
                    let mean = all().map(|i| x[i]).sum::<f64>() / shape.count();
                    let var = all().map(|i| (x[i] - mean).powi(2)).sum::<f64>() / shape.count();
                    let y = |i: usize| (x[i] - mean) / (var + eps).sqrt() * gamma[c] + beta[c];
                    for b in 0..shape.batch {
                        for oy in 0..pool.output[0] {
                            for ox in 0..pool.output[1] {
                                let mut max = 0.0f64; // the ReLU
                                for ky in 0..kernel {
                                    for kx in 0..kernel {
                                        let iy = (oy * stride + ky).checked_sub(padding);
                                        let ix = (ox * stride + kx).checked_sub(padding);
                                        if let (Some(iy), Some(ix)) = (iy, ix) {
                                            if iy < h && ix < w {
                                                max = max.max(y(plane(b) + iy * w + ix));
                                            }
                                        }
                                    }
                                }
                                let o = (b * shape.channels + c) * pooled.plane
                                    + oy * pool.output[1]
                                    + ox;
                                total += max * f64::from(r[o]);
                            }
                        }
                    }
                }
                total
            };
            let (mut dgamma, mut dbeta) = (vec![0.0; 2], vec![0.0; 2]);
            let dx = relu_max_pool_backward(
                &x,
                &r,
                &sources,
                &gamma,
                &stats,
                eps,
                &pool,
                &mut dgamma,
                &mut dbeta,
            );
            let h = 1e-6;
            let nudged = |v: &[f64], i: usize, d: f64| {
                let mut v = v.to_vec();
                v[i] += d;
                v
            };
            for (i, &dx) in dx.iter().enumerate() {
                let numeric = (loss(&nudged(&xw, i, h), &gw, &bw)
                    - loss(&nudged(&xw, i, -h), &gw, &bw))
                    / (2.0 * h);
                assert!(
                    (f64::from(dx) - numeric).abs() < 1e-3,
                    "dx[{i}]: {dx} vs {numeric}"
                );
            }
            for c in 0..shape.channels {
                let numeric = (loss(&xw, &nudged(&gw, c, h), &bw)
                    - loss(&xw, &nudged(&gw, c, -h), &bw))
                    / (2.0 * h);
                assert!((f64::from(dgamma[c]) - numeric).abs() < 1e-3, "dgamma[{c}]");
                let numeric = (loss(&xw, &gw, &nudged(&bw, c, h))
                    - loss(&xw, &gw, &nudged(&bw, c, -h)))
                    / (2.0 * h);
                assert!((f64::from(dbeta[c]) - numeric).abs() < 1e-3, "dbeta[{c}]");
            }
        }
    }
}
