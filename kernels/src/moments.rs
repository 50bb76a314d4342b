//! Per-channel moments (count, mean, sum of squared deviations) of an activation, taken
//! part by part and merged in a fixed order: what a training batch norm's statistics are
//! made of, whether a separate pass takes them over whole planes
//! ([`crate::norm::batch_stats`]) or a convolution takes them over each tile of its output
//! while the tile is still in the cache ([`crate::forward_with_moments`]).
//!
//! Each part is summed in two passes (its mean, then the squared deviations from it), and
//! parts merge with Chan et al.'s pairwise formula in f64, so the variance does not lose
//! its digits when the mean is large against the spread (a one-pass sum of squares
//! would).

use rayon::prelude::*;

use crate::Real;

/// Lanes of the reductions: eight independent partial sums that vectorize, added in a
/// fixed order.
const LANES: usize = 8;

/// `(sum of f(a, b), sum of g(a, b))` over two equally long slices, in eight lanes of `T`
/// added in a fixed order into f64, then the tail: the batch-norm backward's reductions
/// over a plane (the moments run across segments: [`lane_sum`]).
pub(crate) fn lane_sums<T: Real>(
    a: &[T],
    b: &[T],
    f: impl Fn(T, T) -> T,
    g: impl Fn(T, T) -> T,
) -> (f64, f64) {
    let mut first = [T::ZERO; LANES];
    let mut second = [T::ZERO; LANES];
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
        f_sum += first[k].to_f64();
        g_sum += second[k].to_f64();
    }
    for (&a, &b) in a_tail.iter().zip(b_tail) {
        f_sum += f(a, b).to_f64();
        g_sum += g(a, b).to_f64();
    }
    (f_sum, g_sum)
}

/// Values a lane sum takes in `T` before it adds its lanes into f64: short segments
/// share lanes, long sums do not lose digits in `T`.
const FLUSH_VALUES: usize = 1024;

/// The sum of `f(v)` over the values of `segments`: in [`LANES`] lanes of `T` (a
/// segment's tail into the first lanes), the lanes added into f64 in order once
/// [`FLUSH_VALUES`] values have gone in since the last time, and at the end.
fn lane_sum<'a, T: Real>(segments: impl Iterator<Item = &'a [T]>, f: impl Fn(T) -> T) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { wide::lane_sum_avx512(segments, f) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { wide::lane_sum_avx2(segments, f) };
        }
    }
    lane_sum_portable(segments, f)
}

/// [`lane_sum`] in portable code (inlined into each instruction set's version).
#[inline(always)]
fn lane_sum_portable<'a, T: Real>(
    segments: impl Iterator<Item = &'a [T]>,
    f: impl Fn(T) -> T,
) -> f64 {
    let mut lanes = [T::ZERO; LANES];
    let mut pending = 0;
    let mut total = 0f64;
    for segment in segments {
        let (body, tail) = segment.split_at(segment.len() / LANES * LANES);
        for chunk in body.chunks_exact(LANES) {
            for k in 0..LANES {
                lanes[k] += f(chunk[k]);
            }
        }
        for (lane, &v) in lanes.iter_mut().zip(tail) {
            *lane += f(v);
        }
        pending += segment.len();
        if pending >= FLUSH_VALUES {
            drain(&mut lanes, &mut total);
            pending = 0;
        }
    }
    drain(&mut lanes, &mut total);
    total
}

/// Adds the lanes into `total` in order and zeroes them.
fn drain<T: Real>(lanes: &mut [T; LANES], total: &mut f64) {
    for lane in lanes.iter_mut() {
        *total += lane.to_f64();
        *lane = T::ZERO;
    }
}

/// The moments' lane sum compiled for wider vectors than x86-64's baseline (lane by lane
/// the same operations, so the same bits on every CPU).
#[cfg(target_arch = "x86_64")]
mod wide {
    use super::lane_sum_portable;
    use crate::Real;

    /// `lane_sum` compiled with the target feature `$feature`.
    macro_rules! isa_version {
        ($feature:literal, $name:ident) => {
            /// `lane_sum` for one instruction set.
            ///
            /// # Safety
            /// The CPU must have the instruction set.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name<'a, T: Real>(
                segments: impl Iterator<Item = &'a [T]>,
                f: impl Fn(T) -> T,
            ) -> f64 {
                lane_sum_portable(segments, f)
            }
        };
    }

    isa_version!("avx512f", lane_sum_avx512);
    isa_version!("avx2", lane_sum_avx2);
}

/// The moments of a set of values.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    /// How many values.
    pub count: f64,
    /// Their mean (0 for none).
    pub mean: f64,
    /// The sum of their squared deviations from the mean.
    pub squares: f64,
}

impl Moments {
    /// The moments of the values of `segments`, in two passes: their sum gives the mean;
    /// the squared deviations from that mean (rounded to `T`) are summed alike. Each sum
    /// runs in lanes of `T` across segments (a tile's rows are short), added into f64
    /// every `FLUSH_VALUES` (1024) values or so and at the end.
    pub fn of_segments<'a, T: Real>(segments: impl Iterator<Item = &'a [T]> + Clone) -> Self {
        let mut count = 0usize;
        let sum = lane_sum(segments.clone().inspect(|s| count += s.len()), |v| v);
        if count == 0 {
            return Self::default();
        }
        let count = count as f64;
        let mean = sum / count;
        let centre = T::from_f64(mean);
        let squares = lane_sum(segments, |v| (v - centre) * (v - centre));
        Self {
            count,
            mean,
            squares,
        }
    }

    /// The moments of the union of the values of `self` and `other` (Chan, Golub and
    /// LeVeque's pairwise update).
    pub fn merge(self, other: Self) -> Self {
        if other.count == 0.0 {
            return self;
        }
        if self.count == 0.0 {
            return other;
        }
        let count = self.count + other.count;
        let delta = other.mean - self.mean;
        Self {
            count,
            mean: self.mean + delta * (other.count / count),
            squares: self.squares
                + other.squares
                + delta * delta * (self.count * other.count / count),
        }
    }

    /// The biased variance (the mean squared deviation, what a training batch norm
    /// normalises by); 0 for no values.
    pub fn variance(&self) -> f64 {
        if self.count == 0.0 {
            0.0
        } else {
            self.squares / self.count
        }
    }
}

/// Each channel's moments over an NCHW activation `x` of `batch` images of `channels`
/// planes of `plane` values: its planes, image by image (channels in parallel).
///
/// # Panics
/// If `x` holds fewer values than that.
pub(crate) fn channel_moments<T: Real>(
    x: &[T],
    [batch, channels, plane]: [usize; 3],
) -> Vec<Moments> {
    if (1..LANES).contains(&plane) {
        return small_plane_moments(x, [batch, channels, plane]);
    }
    (0..channels)
        .into_par_iter()
        .map(|c| {
            Moments::of_segments((0..batch).map(|b| &x[(b * channels + c) * plane..][..plane]))
        })
        .collect()
}

/// Channels a task of [`small_plane_moments`] takes.
const CHANNEL_BLOCK: usize = 64;

/// [`channel_moments`] of planes shorter than the lanes (ResNet's last stages at small
/// inputs: 1, 4 values). There each plane is a lane sum's tail, so lane `k` of a channel
/// sums value `k` of its planes, image by image: the same sums, taken here for a block of
/// channels at once. A plane at a time, they were a call and a dependent add per value
/// (at `[128, 512, 1, 1]` most of a convolution's time).
fn small_plane_moments<T: Real>(x: &[T], [batch, channels, plane]: [usize; 3]) -> Vec<Moments> {
    assert!(
        x.len() >= batch * channels * plane,
        "channel moments: input length"
    );
    let count = batch * plane;
    let blocks: Vec<Vec<Moments>> = (0..channels.div_ceil(CHANNEL_BLOCK))
        .into_par_iter()
        .map(|block| {
            let first = block * CHANNEL_BLOCK;
            let width = CHANNEL_BLOCK.min(channels - first);
            // Value `k` of image `b`'s plane of channel `first + i`.
            let value = |b: usize, k: usize, i: usize| x[((b * channels) + first + i) * plane + k];
            let sums = block_lane_sums([batch, plane, width], value);
            if count == 0 {
                return vec![Moments::default(); width];
            }
            let count = count as f64;
            let means: Vec<f64> = sums.iter().map(|&sum| sum / count).collect();
            let centres: Vec<T> = means.iter().map(|&mean| T::from_f64(mean)).collect();
            let squares = block_lane_sums([batch, plane, width], |b, k, i| {
                let d = value(b, k, i) - centres[i];
                d * d
            });
            means
                .iter()
                .zip(squares)
                .map(|(&mean, squares)| Moments {
                    count,
                    mean,
                    squares,
                })
                .collect()
        })
        .collect();
    blocks.concat()
}

/// For each of `width` channels `i`, [`lane_sum`] of `f(b, k, i)` over its segments `b`
/// of `plane < LANES` values `k`: lane `k` takes value `k`, the lanes are added into f64
/// in order once [`FLUSH_VALUES`] values have gone in since the last time, and at the end.
fn block_lane_sums<T: Real>(
    [segments, plane, width]: [usize; 3],
    f: impl Fn(usize, usize, usize) -> T,
) -> Vec<f64> {
    // lanes[k * width + i]: lane k of channel i (the lanes from `plane` on stay zero).
    let mut lanes = vec![T::ZERO; LANES * width];
    let mut totals = vec![0f64; width];
    let drain = |lanes: &mut [T], totals: &mut [f64]| {
        for (i, total) in totals.iter_mut().enumerate() {
            for k in 0..LANES {
                *total += lanes[k * width + i].to_f64();
                lanes[k * width + i] = T::ZERO;
            }
        }
    };
    let mut pending = 0;
    for b in 0..segments {
        for k in 0..plane {
            for (i, lane) in lanes[k * width..(k + 1) * width].iter_mut().enumerate() {
                *lane += f(b, k, i);
            }
        }
        pending += plane;
        if pending >= FLUSH_VALUES {
            drain(&mut lanes, &mut totals);
            pending = 0;
        }
    }
    drain(&mut lanes, &mut totals);
    totals
}

/// Per-channel moments of one output tile, found by the tile's first column (in the
/// pass's own column numbering; tiles never share a first column).
pub(crate) type TileMoments = (usize, Vec<Moments>);

/// Each channel's moments over all tiles of a pass, merged in column order (the tiles'
/// order is fixed by the plan and the thread count, never by timing).
///
/// # Panics
/// If a tile's moments do not hold `channels` values.
pub(crate) fn merge_tiles(mut tiles: Vec<TileMoments>, channels: usize) -> Vec<Moments> {
    tiles.sort_by_key(|&(first_column, _)| first_column);
    let mut total = vec![Moments::default(); channels];
    for (_, tile) in tiles {
        assert_eq!(tile.len(), channels, "tile moments: channels");
        for (sum, part) in total.iter_mut().zip(tile) {
            *sum = sum.merge(part);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(values: &[f64]) -> (f64, f64) {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        (
            mean,
            values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n,
        )
    }

    #[test]
    fn merged_parts_give_the_moments_of_the_whole() {
        // A large mean against a small spread: a one-pass sum of squares in f32 would
        // lose every digit of the variance here.
        let values: Vec<f32> = (0..1000)
            .map(|i| 1000.0 + ((i * 37) % 101) as f32 * 0.01)
            .collect();
        let wide: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
        let (mean, variance) = exact(&wide);
        for cuts in [
            vec![0, 1000],
            vec![0, 3, 500, 999, 1000],
            vec![0, 0, 17, 1000],
        ] {
            let merged = cuts
                .windows(2)
                .map(|w| Moments::of_segments([&values[w[0]..w[1]]].into_iter()))
                .fold(Moments::default(), Moments::merge);
            assert_eq!(merged.count, 1000.0);
            assert!((merged.mean - mean).abs() < 1e-6 * mean, "{cuts:?}");
            assert!(
                (merged.variance() - variance).abs() < 1e-4 * variance,
                "{cuts:?}: {} against {variance}",
                merged.variance()
            );
        }
        // Segments of one part are one set of values.
        let split = Moments::of_segments([&values[..10], &values[10..]].into_iter());
        let (mean, _) = exact(&wide);
        assert!((split.mean - mean).abs() < 1e-6 * mean);
        assert_eq!(
            Moments::of_segments::<f32>([].into_iter()),
            Moments::default()
        );
        assert_eq!(Moments::default().variance(), 0.0);
    }

    #[test]
    fn tiles_merge_in_column_order_whatever_order_they_arrive_in() {
        let part = |v: f32| Moments::of_segments([&[v, v + 1.0, v * 3.0][..]].into_iter());
        let tiles = vec![
            (0, vec![part(1.0)]),
            (5, vec![part(7.5)]),
            (9, vec![part(-2.0)]),
        ];
        let mut shuffled = tiles.clone();
        shuffled.swap(0, 2);
        let in_order = merge_tiles(tiles, 1);
        assert_eq!(merge_tiles(shuffled, 1), in_order);
        assert_eq!(in_order[0].count, 9.0);
    }

    /// Planes shorter than the lanes take their own loop: the same bits as each channel's
    /// planes summed one by one (flushes into f64 included: 300 images of 4 values).
    #[test]
    fn small_planes_give_the_same_moments_as_plane_by_plane() {
        for (batch, channels, plane) in
            [(3, 5, 1), (128, 70, 1), (300, 3, 4), (7, 130, 7), (0, 4, 2)]
        {
            let x: Vec<f32> = (0..batch * channels * plane)
                .map(|i| ((i * 7919) % 1013) as f32 * 0.37 - 150.0 + (i % 3) as f32 * 1e-3)
                .collect();
            let got = channel_moments(&x, [batch, channels, plane]);
            assert_eq!(got.len(), channels);
            for (c, got) in got.iter().enumerate() {
                let want = Moments::of_segments(
                    (0..batch).map(|b| &x[(b * channels + c) * plane..][..plane]),
                );
                let bits = |m: &Moments| [m.count, m.mean, m.squares].map(f64::to_bits);
                assert_eq!(
                    bits(got),
                    bits(&want),
                    "{batch}x{channels}x{plane}, channel {c}"
                );
            }
        }
    }
}
