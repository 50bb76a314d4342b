//! Batch normalisation of NCHW activations in training: a batch's per-channel statistics,
//! the normalisation with them, and its gradients, each in one pass over the activation
//! and without moving the channel axis (a generic batch norm transposes the activation to
//! channel-major for every reduction, forward and backward).
//!
//! Every channel's sums run in one fixed order (image by image; within a plane in eight
//! interleaved f32 lanes, each plane's total added in f64), whatever the thread count, so
//! results are the same bits on every run.

use rayon::prelude::*;

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

    /// Channel `channel`'s plane of each image, in image order.
    fn planes<'a>(&self, values: &'a [f32], channel: usize) -> impl Iterator<Item = &'a [f32]> {
        let (channels, plane) = (self.channels, self.plane);
        (0..self.batch).map(move |b| &values[(b * channels + channel) * plane..][..plane])
    }
}

const LANES: usize = 8;

/// `(sum of f(a, b), sum of g(a, b))` over two equally long slices, in eight f32 lanes
/// added in a fixed order: the shape of every reduction here.
fn lane_sums(
    a: &[f32],
    b: &[f32],
    f: impl Fn(f32, f32) -> f32,
    g: impl Fn(f32, f32) -> f32,
) -> (f64, f64) {
    let mut first = [0f32; LANES];
    let mut second = [0f32; LANES];
    let (a_body, a_tail) = a.split_at(a.len() / LANES * LANES);
    let (b_body, b_tail) = b.split_at(a_body.len());
    for (a, b) in a_body.chunks_exact(LANES).zip(b_body.chunks_exact(LANES)) {
        for k in 0..LANES {
            first[k] += f(a[k], b[k]);
            second[k] += g(a[k], b[k]);
        }
    }
    let (mut f_sum, mut g_sum) = (0f64, 0f64);
    for k in 0..LANES {
        f_sum += f64::from(first[k]);
        g_sum += f64::from(second[k]);
    }
    for (&a, &b) in a_tail.iter().zip(b_tail) {
        f_sum += f64::from(f(a, b));
        g_sum += f64::from(g(a, b));
    }
    (f_sum, g_sum)
}

/// The batch statistics of `x`: `stats[c]` is channel `c`'s mean and
/// `stats[channels + c]` its biased variance (the mean squared deviation, what a
/// training batch norm normalises by).
///
/// # Panics
/// If `x` or `stats` does not have the length `shape` gives them.
pub fn batch_stats(x: &[f32], shape: NormShape, stats: &mut [f32]) {
    assert_eq!(x.len(), shape.len(), "batch_stats: input length");
    assert_eq!(stats.len(), 2 * shape.channels, "batch_stats: stats length");
    let per_channel: Vec<(f32, f32)> = (0..shape.channels)
        .into_par_iter()
        .map(|c| {
            let sum: f64 = shape
                .planes(x, c)
                .map(|p| lane_sums(p, p, |v, _| v, |_, _| 0.0).0)
                .sum();
            let mean = (sum / shape.count()) as f32;
            let squares: f64 = shape
                .planes(x, c)
                .map(|p| lane_sums(p, p, |v, _| (v - mean) * (v - mean), |_, _| 0.0).0)
                .sum();
            (mean, (squares / shape.count()) as f32)
        })
        .collect();
    let (means, variances) = stats.split_at_mut(shape.channels);
    for (c, (mean, variance)) in per_channel.into_iter().enumerate() {
        means[c] = mean;
        variances[c] = variance;
    }
}

/// `1 / sqrt(variance + epsilon)`, as both passes compute it.
fn inv_std(variance: f32, epsilon: f64) -> f32 {
    (1.0 / (f64::from(variance) + epsilon).sqrt()) as f32
}

/// `out = (x - mean) / sqrt(variance + epsilon) * gamma + beta` per channel, with
/// `stats` as [`batch_stats`] gives them.
///
/// # Panics
/// If a slice does not have the length `shape` gives it.
pub fn normalize(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: &[f32],
    epsilon: f64,
    shape: NormShape,
    out: &mut [f32],
) {
    let channels = shape.channels;
    assert_eq!(x.len(), shape.len(), "normalize: input length");
    assert_eq!(out.len(), shape.len(), "normalize: output length");
    assert_eq!(stats.len(), 2 * channels, "normalize: stats length");
    assert!(
        gamma.len() == channels && beta.len() == channels,
        "normalize: gamma/beta length"
    );
    if shape.is_empty() {
        return;
    }
    out.par_chunks_mut(shape.plane)
        .zip(x.par_chunks(shape.plane))
        .enumerate()
        .for_each(|(i, (out, x))| {
            let c = i % channels;
            let scale = gamma[c] * inv_std(stats[channels + c], epsilon);
            let shift = beta[c] - stats[c] * scale;
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v * scale + shift;
            }
        });
}

/// The gradients of [`normalize`] with the batch's own statistics (the statistics'
/// dependence on `x` included) for the output gradient `grad`: `dx` (same shape as `x`),
/// and per channel `dgamma` and `dbeta`.
///
/// # Panics
/// If a slice does not have the length `shape` gives it.
#[allow(clippy::too_many_arguments)]
pub fn normalize_backward(
    x: &[f32],
    grad: &[f32],
    gamma: &[f32],
    stats: &[f32],
    epsilon: f64,
    shape: NormShape,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let channels = shape.channels;
    for (what, len) in [
        ("input", x.len()),
        ("gradient", grad.len()),
        ("dx", dx.len()),
    ] {
        assert_eq!(len, shape.len(), "normalize_backward: {what} length");
    }
    assert_eq!(
        stats.len(),
        2 * channels,
        "normalize_backward: stats length"
    );
    assert!(
        gamma.len() == channels && dgamma.len() == channels && dbeta.len() == channels,
        "normalize_backward: per-channel lengths"
    );
    // Per channel: the sum of the gradient and of the gradient times the centred input.
    let sums: Vec<(f64, f64)> = (0..channels)
        .into_par_iter()
        .map(|c| {
            let mean = stats[c];
            shape
                .planes(grad, c)
                .zip(shape.planes(x, c))
                .map(|(g, x)| lane_sums(g, x, |g, _| g, |g, x| g * (x - mean)))
                .fold((0.0, 0.0), |(a, b), (p, q)| (a + p, b + q))
        })
        .collect();
    // dx = a * grad + b * x + k per channel, from
    // dx = gamma * inv_std * (grad - mean(grad) - x_hat * mean(grad * x_hat)).
    let count = shape.count();
    let coefficients: Vec<(f32, f32, f32)> = (0..channels)
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
        .collect();
    if shape.is_empty() {
        return;
    }
    dx.par_chunks_mut(shape.plane)
        .zip(grad.par_chunks(shape.plane).zip(x.par_chunks(shape.plane)))
        .enumerate()
        .for_each(|(i, (dx, (grad, x)))| {
            let (a, b, k) = coefficients[i % channels];
            for ((d, &g), &v) in dx.iter_mut().zip(grad).zip(x) {
                *d = a * g + b * v + k;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The normalised output's loss `sum(out * r)` in f64, straight from the definition.
    fn loss(x: &[f64], gamma: &[f64], beta: &[f64], r: &[f32], shape: NormShape, eps: f64) -> f64 {
        let mut total = 0.0;
        for c in 0..shape.channels {
            let idx = |b: usize, k: usize| (b * shape.channels + c) * shape.plane + k;
            let all = || (0..shape.batch).flat_map(|b| (0..shape.plane).map(move |k| idx(b, k)));
            let mean = all().map(|i| x[i]).sum::<f64>() / shape.count();
            let var = all().map(|i| (x[i] - mean).powi(2)).sum::<f64>() / shape.count();
            for i in all() {
                total +=
                    ((x[i] - mean) / (var + eps).sqrt() * gamma[c] + beta[c]) * f64::from(r[i]);
            }
        }
        total
    }

    #[test]
    fn forward_and_gradients_match_the_definition() {
        let eps = 1e-5;
        for shape in [
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
        ] {
            let x = values(shape, 1);
            let r = values(shape, 2);
            let gamma: Vec<f32> = (0..shape.channels).map(|c| 0.5 + c as f32 * 0.25).collect();
            let beta: Vec<f32> = (0..shape.channels).map(|c| c as f32 * 0.1 - 0.2).collect();
            let mut stats = vec![0.0; 2 * shape.channels];
            batch_stats(&x, shape, &mut stats);
            let mut out = vec![0.0; shape.len()];
            normalize(&x, &gamma, &beta, &stats, eps, shape, &mut out);
            let wide = |v: &[f32]| v.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
            let (xw, gw, bw) = (wide(&x), wide(&gamma), wide(&beta));
            let got: f64 = out.iter().zip(&r).map(|(o, r)| f64::from(o * r)).sum();
            let want = loss(&xw, &gw, &bw, &r, shape, eps);
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1.0),
                "{got} vs {want}"
            );

            let (mut dx, mut dgamma, mut dbeta) = (
                vec![0.0; shape.len()],
                vec![0.0; shape.channels],
                vec![0.0; shape.channels],
            );
            normalize_backward(
                &x,
                &r,
                &gamma,
                &stats,
                eps,
                shape,
                &mut dx,
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
                    loss(&x, &gw, &bw, &r, shape, eps)
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
                    loss(&xw, &g, &bw, &r, shape, eps)
                });
                assert!((f64::from(dgamma[c]) - numeric).abs() < 1e-3, "dgamma[{c}]");
                let numeric = diff(&|d| {
                    let mut b = bw.clone();
                    b[c] += d;
                    loss(&xw, &gw, &b, &r, shape, eps)
                });
                assert!((f64::from(dbeta[c]) - numeric).abs() < 1e-3, "dbeta[{c}]");
            }
        }
    }
}
