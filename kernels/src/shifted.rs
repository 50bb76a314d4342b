//! The stride-1 path without a column matrix: gemm straight on shifted views of a padded
//! image.
//!
//! With stride 1, the column-matrix row of kernel position `(ky, kx)` is the padded image
//! shifted by `ky * dh * wp + kx * dw` when the output is computed on the padded width
//! `wp` ("wide" columns `oy * wp + ox`; the columns `ox >= out_w` are junk, never emitted,
//! and carry zero gradient). So each kernel position is one gemm over a window's channels
//! (row stride `hp * wp`) with no copy; positions are visited ring by ring from the centre
//! outwards, and the partial sum is emitted after each ring exactly as in the im2col path.
//! Backwards, the weight gradient of a position reads the same shifted view and the input
//! gradient of a position is added into a padded gradient image at the same shift.

use std::mem::MaybeUninit;
use std::ops::Range;

use super::epilogue::Epilogue;
use super::moments::TileMoments;
use super::nested::{
    accumulator_strides, add_into, gemm, gemm_gathered, push_segment, tile_moments,
    windows_partition_channels, Accumulator, BackwardArgs, ForwardPanels, ForwardTiles, SharedMut,
    TaskInput, TileSegments,
};
use super::plan::{ConvPlan, Window};
use super::workspace::{grow, Workspace};
use super::Real;

/// Inputs of at most this many channels keep the input-gradient tile pixel-major.
const PIXEL_MAJOR_CHANNELS: usize = 32;

/// Padded image geometry of a stride-1 plan.
#[derive(Debug, Clone, Copy)]
pub struct Padded {
    /// Padded height (`out_h + (kh - 1) * dh`).
    pub hp: usize,
    /// Padded width (`out_w + (kw - 1) * dw`).
    pub wp: usize,
}

impl Padded {
    pub fn new(plan: &ConvPlan) -> Self {
        Self {
            hp: plan.output[0] + (plan.kernel[0] - 1) * plan.dilation[0],
            wp: plan.output[1] + (plan.kernel[1] - 1) * plan.dilation[1],
        }
    }

    /// Values of one padded channel.
    pub fn plane(&self) -> usize {
        self.hp * self.wp
    }

    /// Padded rows a forward tile of `tile` wide columns pads: the rows it reads (its own,
    /// one more where it starts inside a row, and the kernel's reach below them); or
    /// every row where the padded image is small enough to stay in the cache, padded
    /// once (the plan's [`band_bytes`](crate::tuning::Tuning::band_bytes)).
    pub fn band_rows<T>(&self, plan: &ConvPlan, tile: usize) -> usize {
        let image_bytes = plan.in_channels * self.plane() * std::mem::size_of::<T>();
        if image_bytes <= plan.tuning.band_bytes {
            return self.hp;
        }
        let reach = (plan.kernel[0] - 1) * plan.dilation[0];
        (tile.div_ceil(self.wp) + 1 + reach).min(self.hp)
    }

    /// Values of a band of `rows` padded rows of every channel, with slack for the junk
    /// columns' reads past the last plane.
    pub fn band_len(&self, plan: &ConvPlan, rows: usize) -> usize {
        plan.in_channels * rows * self.wp + plan.kernel[1] * plan.dilation[1]
    }

    /// Wide output columns of one image.
    pub fn wide_columns(&self, plan: &ConvPlan) -> usize {
        plan.output[0] * self.wp
    }
}

/// Whether the shifted path applies to the plan and is expected to beat im2col: stride 1,
/// few junk columns, images large enough for gemms of a few hundred columns (tiles do
/// not span images here) and windows deep enough for a per-position gemm.
pub fn suits(plan: &ConvPlan) -> bool {
    let padded = Padded::new(plan);
    plan.stride == [1, 1]
        && plan.output[1] > 0
        && padded.wp * 3 <= plan.output[1] * 4
        && padded.wide_columns(plan) >= 128
        && plan.window_depth >= 16
}

/// Whether the forward pass reads the image in place: a 1 x 1 kernel without padding,
/// whose view of each plane is the plane itself (no shift, no junk columns, no read past
/// it). Other kernels read padded copies, gathered row by row.
pub fn reads_in_place(plan: &ConvPlan) -> bool {
    plan.kernel == [1, 1] && plan.pad == [0, 0] && plan.input == plan.output
}

/// Writes padded rows `rows` (of `0..hp`) of image `image` of `x` into their places in
/// `dst`, a band of padded rows `first..first + band` (rows past `hp` zero): `c` planes of
/// `band x wp`, with zero borders, then slack for the junk columns' reads past the last
/// plane ([`Padded::band_len`]), zeroed with the band's last row.
fn pad_rows<T: Real>(
    plan: &ConvPlan,
    padded: Padded,
    x: &[T],
    image: usize,
    ((first, band), rows): ((usize, usize), Range<usize>),
    dst: &mut [T],
) {
    let [h, w] = plan.input;
    let [pt, pl] = plan.pad;
    let c = plan.in_channels;
    let wp = padded.wp;
    let cols = w.min(wp.saturating_sub(pl));
    let (planes, slack) = dst.split_at_mut(c * band * wp);
    // Each value written once: the image's values, zeros around them (not a fill of the
    // whole buffer first, which cost as much as the copy).
    for (ch, dst) in planes.chunks_exact_mut(band * wp).enumerate() {
        let src = &x[(image * c + ch) * h * w..][..h * w];
        for (y, row) in (first..).zip(dst.chunks_exact_mut(wp)) {
            if !rows.contains(&y) {
                continue;
            }
            match y.checked_sub(pt).filter(|&iy| iy < h && y < padded.hp) {
                Some(iy) => {
                    row[..pl].fill(T::ZERO);
                    row[pl..pl + cols].copy_from_slice(&src[iy * w..iy * w + cols]);
                    row[pl + cols..].fill(T::ZERO);
                }
                None => row.fill(T::ZERO),
            }
        }
    }
    if rows.end >= first + band {
        slack.fill(T::ZERO);
    }
}

/// The padded rows that the valid wide columns `[q0, q1)` of an image read (a junk
/// column may read one row further; its values are never emitted).
fn rows_read(plan: &ConvPlan, padded: Padded, (q0, q1): (usize, usize)) -> Range<usize> {
    let wp = padded.wp;
    let reach = (plan.kernel[0] - 1) * plan.dilation[0];
    q0 / wp..((q1 - 1) / wp + reach + 1).min(padded.hp)
}

/// Values of one padded image in pixel-major order (`hp * wp` pixels of `c` channels),
/// with slack for the junk columns' reads past the end.
fn pixel_major_len(plan: &ConvPlan, padded: Padded) -> usize {
    (padded.plane() + plan.kernel[1] * plan.dilation[1] + 1) * plan.in_channels
}

/// Copies image `image` of `x` into `dst` in pixel-major order (`[hp * wp, c]`, channels
/// contiguous), zero borders and slack: the layout in which a shifted view, read as
/// `[channels, pixels]`, is column-major for gemm.
fn pad_image_pixel_major<T: Real>(
    plan: &ConvPlan,
    padded: Padded,
    x: &[T],
    image: usize,
    dst: &mut [T],
) {
    let [h, w] = plan.input;
    let [pt, pl] = plan.pad;
    let c = plan.in_channels;
    dst.fill(T::ZERO);
    let rows = h.min(padded.hp.saturating_sub(pt));
    let cols = w.min(padded.wp.saturating_sub(pl));
    if rows > 0 {
        let out = &mut dst[(pt * padded.wp + pl) * c..];
        let rows = (image, 0..rows, cols);
        crate::rows_to_pixel_major(x, [c, h, w], rows, (out, padded.wp * c));
    }
}

/// Visits the valid pixels of wide columns `[q0, q1)` (of one image): `f(tile column,
/// oy, ox, len)`, `len` output pixels in a row from `(oy, ox)`. Without junk columns (a
/// wide row as long as an output row: a 1 x 1 kernel read in place) the columns are the
/// output pixels themselves, visited as one run across rows (a 14 x 14 map's 196 pixels
/// in one write, not 14 of 14: the epilogue of 256 -> 1024 at 14 x 14 was 16 % of it).
fn valid_segments(
    plan: &ConvPlan,
    padded: Padded,
    q0: usize,
    q1: usize,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    let ow = plan.output[1];
    if padded.wp == ow {
        if q1 > q0 {
            f(0, q0 / ow, q0 % ow, q1 - q0);
        }
        return;
    }
    let mut q = q0;
    while q < q1 {
        let (oy, ox) = (q / padded.wp, q % padded.wp);
        let row_end = (oy + 1) * padded.wp;
        if ox < ow {
            let len = (ow - ox).min(q1 - q);
            f(q - q0, oy, ox, len);
        }
        q = row_end.min(q1).max(q + 1);
    }
}

/// Forward pass of wide columns `[start, end)` of the flattened `(image, wide column)`
/// range; each tile's per-channel moments appended to `moments` where given (a plain
/// epilogue's output).
pub fn forward_task<T: Real>(
    (plan, layout, x, ringed): TaskInput<'_, T>,
    panels: Option<&ForwardPanels>,
    ws: &mut Workspace<T>,
    epilogue: &Epilogue<'_, T>,
    out: SharedMut<T>,
    ((start, end), tile, parallelism): ForwardTiles,
    mut moments: Option<&mut Vec<TileMoments>>,
) {
    let ow = plan.output[1];
    let mut segments = TileSegments::new();
    let padded = Padded::new(plan);
    let wide = padded.wide_columns(plan);
    let plane = padded.plane();
    let rings = plan.rings_count();
    if epilogue.pool {
        let pair = 2 * padded.wp;
        assert!(
            plan.output[0].is_multiple_of(2)
                && [start, end, tile].iter().all(|v| v.is_multiple_of(pair)),
            "a pooled shifted task holds whole pairs of output rows"
        );
    }
    // Scratch of a pooled write: two rows through the epilogue.
    let mut pooled_rows = Vec::new();
    // Per ring, each position's shift in the padded image, and where the gathered
    // product finds row (channel, position) of the ring's column matrix.
    let shifts: Vec<Vec<usize>> = plan
        .rings
        .iter()
        .map(|ring| {
            ring.iter()
                .map(|&(ky, kx)| ky * plan.dilation[0] * padded.wp + kx * plan.dilation[1])
                .collect()
        })
        .collect();
    // Unless the pass reads the image in place ([`reads_in_place`]), the image is padded
    // tile by tile (threads splitting one image pad only their rows, and a tile's rows
    // are still in the cache when the product reads them): a small image whole, each
    // tile adding the rows it reads that earlier ones did not; a large one a band of rows
    // per tile, in a buffer the size of the band ([`crate::tuning::BAND_BYTES`]).
    let in_place = reads_in_place(plan);
    let band = padded.band_rows::<T>(plan, tile);
    // Values between the planes the views read.
    let view_plane = if in_place { plane } else { band * padded.wp };
    let gathers: Vec<Vec<usize>> = if panels.is_some() {
        shifts
            .iter()
            .map(|ring| {
                (0..plan.window_depth)
                    .flat_map(|ch| ring.iter().map(move |&shift| ch * view_plane + shift))
                    .collect()
            })
            .collect()
    } else {
        Vec::new()
    };
    {
        let mut own = (!in_place).then(|| grow(&mut ws.cols, padded.band_len(plan, band)));
        let mut t = start;
        while t < end {
            let image = t / wide;
            let stop = end.min((image + 1) * wide);
            let mut q0 = t - image * wide;
            let q_end = stop - image * wide;
            // The rows of a whole padded image written so far.
            let mut padded_to = None;
            while q0 < q_end {
                let q1 = (q0 + tile).min(q_end);
                let width = q1 - q0;
                // The views' buffer, and where in it wide column q0 of the first plane is.
                let (image_buf, q0_at): (&[T], usize) = match own.as_deref_mut() {
                    Some(buf) if band < padded.hp => {
                        let first = q0 / padded.wp;
                        let rows = first..first + band;
                        pad_rows(plan, padded, x, image, ((first, band), rows), buf);
                        (buf, q0 - first * padded.wp)
                    }
                    Some(buf) => {
                        let rows = rows_read(plan, padded, (q0, q1));
                        let from = padded_to.unwrap_or(rows.start).max(rows.start);
                        if rows.end > from {
                            pad_rows(plan, padded, x, image, ((0, band), from..rows.end), buf);
                            padded_to = Some(rows.end);
                        }
                        (buf, q0)
                    }
                    None => {
                        let len = plan.in_channels * plane;
                        (&x[image * len..(image + 1) * len], q0)
                    }
                };
                for (w, window) in plan.windows.iter().enumerate() {
                    if window.rows == 0 {
                        continue;
                    }
                    let acc = grow(&mut ws.acc, window.rows * width);
                    // acc[p, q] at p * acc_rs + q * acc_cs (pixel-major for narrow windows).
                    let (acc_rs, acc_cs) = accumulator_strides::<T>(window.rows, width);
                    // One pointer for the products' writes and the epilogue's reads.
                    let acc = acc.as_mut_ptr();
                    let finished = Accumulator {
                        ptr: acc.cast_const(),
                        rs: acc_rs,
                        cs: acc_cs,
                    };
                    let mut first = true;
                    for r in (0..rings).rev() {
                        // Crop r of the tile, once the ring's product has written it.
                        let crop = CropWrite {
                            plan,
                            padded,
                            window,
                            crop: r,
                            acc: finished,
                            image,
                            columns: (q0, q1),
                            epilogue,
                            out,
                        };
                        // Crop r is written block by block as the product finishes them.
                        let write = |rows: [usize; 2], [col0, cols]: [usize; 2]| {
                            // SAFETY: the block (columns from col0 of the tile) is final
                            // and inside the accumulator; its pixels belong to this task.
                            unsafe { crop.block(rows, [col0, cols]) };
                        };
                        let view = window.in_offset * view_plane + q0_at;
                        if let Some(lhs) = panels.and_then(|p| p.get(w, r)) {
                            // One product for the ring: its column matrix's rows
                            // (channel, position) are gathered from the views while sgemm
                            // packs them.
                            // SAFETY: acc is rows x width, primary-major (unit column
                            // stride: accumulator_strides on sgemm, where panels exist);
                            // the panels hold the ring's weight block; row (ch, pos) reads
                            // the view's plane of channel in_offset + ch from wide column
                            // q0 + shift, the same values as the per-position views below,
                            // inside the buffer.
                            unsafe {
                                gemm_gathered(
                                    [window.rows, width, gathers[r].len()],
                                    (acc, acc_rs),
                                    !first,
                                    lhs,
                                    (image_buf.as_ptr().add(view), &gathers[r]),
                                    parallelism,
                                    (!epilogue.pool).then_some(&write),
                                );
                            }
                            first = false;
                        } else {
                            assert!(!ringed.is_empty(), "a weight kept as panels only");
                            let npos = layout.positions[r];
                            let block = layout.weight_block(plan, r, window);
                            for (pos, &shift) in shifts[r].iter().enumerate() {
                                // SAFETY: acc is rows x width; the weight block addresses
                                // rows x window_depth values of ring r's matrix (column
                                // stride npos); the view reads window_depth planes from
                                // wide column q0 + shift: in place, columns of the plane
                                // itself (no shift); else the tile's band, whose valid
                                // columns read its rows and whose junk columns at most
                                // kw * dw values past the last plane, into the slack of
                                // band_len.
                                unsafe {
                                    gemm(
                                        [window.rows, width, plan.window_depth],
                                        acc,
                                        [acc_cs, acc_rs],
                                        !first,
                                        ringed.as_ptr().add(block + pos),
                                        [npos, layout.weight_ld(plan, r)],
                                        image_buf.as_ptr().add(view + shift),
                                        [1, view_plane],
                                        parallelism,
                                    );
                                }
                                first = false;
                            }
                            if !epilogue.pool {
                                write([0, window.rows], [0, width]);
                            }
                        }
                        if epilogue.pool {
                            // A pooled write needs whole pairs of rows: the tile's, after
                            // its product (tiles hold whole pairs when pooling).
                            // SAFETY: the ring's product is done, so the accumulator is
                            // final; the tile's pixels belong to this task.
                            unsafe { crop.pooled(&mut pooled_rows) };
                        }
                    }
                }
                if let Some(moments) = moments.as_deref_mut() {
                    segments.clear();
                    valid_segments(plan, padded, q0, q1, |_, oy, ox, len| {
                        push_segment(&mut segments, (image, oy * ow + ox, len));
                    });
                    // SAFETY: every window's product and its writes are done: the tile's
                    // pixels of every channel are written, by this task, into the plan's
                    // output.
                    let tile = unsafe { tile_moments(plan, out, &segments) };
                    moments.push((image * wide + q0, tile));
                }
                q0 = q1;
            }
            t = stop;
        }
    }
}

/// Crop `crop` of a window over one tile, as the ring products leave it in `acc`: its
/// writes into the output.
#[derive(Clone, Copy)]
struct CropWrite<'a, T> {
    plan: &'a ConvPlan,
    padded: Padded,
    window: &'a Window,
    crop: usize,
    /// The tile's accumulator; its column 0 is wide column `columns.0`.
    acc: Accumulator<T>,
    image: usize,
    /// The tile's wide columns `[q0, q1)` of `image`.
    columns: (usize, usize),
    epilogue: &'a Epilogue<'a, T>,
    out: SharedMut<T>,
}

impl<T: Real> CropWrite<'_, T> {
    /// Writes rows `[first row, rows]` of the crop (the emitted ones among them, through
    /// the epilogue) into the valid output pixels of the tile's columns `[col0, col0 +
    /// cols)`.
    ///
    /// # Safety
    /// That block of `acc` must be final (not written meanwhile) and inside the tile's
    /// accumulator; the output pixels must belong to the caller's task.
    unsafe fn block(&self, [row0, rows]: [usize; 2], [col0, cols]: [usize; 2]) {
        let Self { plan, window, .. } = *self;
        let q0 = self.columns.0 + col0;
        let base = plan.channel_base(self.crop, window);
        let pixels = plan.out_pixels();
        let ow = plan.output[1];
        for p in row0..(row0 + rows).min(plan.emitted(self.crop, window)) {
            let ch = base + p;
            let factors = self.epilogue.channel(ch);
            valid_segments(plan, self.padded, q0, q0 + cols, |col, oy, ox, len| {
                let at = (self.image * plan.out_channels + ch) * pixels + oy * ow + ox;
                // SAFETY: the pixels lie inside the output's allocation (the residual has
                // the output's length) and belong to this task only; the accumulators are
                // final, from column col0 of the tile on.
                unsafe {
                    let from = self
                        .acc
                        .ptr
                        .add(p * self.acc.rs + (col0 + col) * self.acc.cs);
                    self.epilogue
                        .write_run((from, self.acc.cs), factors, self.out.ptr(), at, len);
                }
            });
        }
    }

    /// Writes the crop pooled (2 x 2, stride 2) into the pooled output: the windows of the
    /// pairs of output rows in the tile's columns (whole pairs). `rows` is scratch.
    ///
    /// # Safety
    /// As [`block`](Self::block) for the whole tile.
    unsafe fn pooled(&self, rows: &mut Vec<T>) {
        let Self { plan, window, .. } = *self;
        let (q0, q1) = self.columns;
        let (acc, wp) = (self.acc, self.padded.wp);
        let [pooled_h, pooled_w] = [plan.output[0] / 2, plan.output[1] / 2];
        let first_pair = q0 / (2 * wp);
        let scratch = grow(rows, 4 * pooled_w);
        let base = plan.channel_base(self.crop, window);
        for p in 0..window.rows.min(plan.emitted(self.crop, window)) {
            let ch = base + p;
            let factors = self.epilogue.channel(ch);
            for pair in 0..(q1 - q0) / (2 * wp) {
                let row = (self.image * plan.out_channels + ch) * pooled_h + first_pair + pair;
                // SAFETY: the two rows' first 2 * pooled_w <= out_w columns lie in the
                // tile's accumulator (row p, wide columns 2 * pair * wp and one row
                // further); the pooled row lies in the pooled output and belongs to this
                // task (its pair of rows is in the task's columns).
                unsafe {
                    let top = acc.ptr.add(p * acc.rs + 2 * pair * wp * acc.cs);
                    let bottom = top.add(wp * acc.cs);
                    self.epilogue.write_pooled_row(
                        ([top, bottom], acc.cs),
                        factors,
                        scratch,
                        self.out.ptr(),
                        row * pooled_w,
                        pooled_w,
                    );
                }
            }
        }
    }
}

/// Backward pass of images `[first, last)` through the shifted views: their input
/// gradient into `dx` (those images only: every value written once, so `dx` need not be
/// initialised), their weight-gradient contribution into `dw` (ring layout).
///
/// Per image, the running sums `S_r` of every window come first, on the wide columns
/// (junk columns zero). The weight gradient of a position is one gemm of `S_r` with the
/// shifted view of the pixel-major image. The input gradient of a tile of padded pixels
/// `q'` is one gemm over every position at once: the rows `(position, primary)` of its
/// right operand are `S_r` shifted back (`S_r[p, q' - shift]`), the left operand the
/// weight rearranged to `[(position, primary), channel]`.
pub fn backward_task<T: Real>(
    (plan, layout, x, ringed): TaskInput<'_, T>,
    ws: &mut Workspace<T>,
    (grad_out, (first, last), mut dx, mut dw, fresh, tile, parallelism): BackwardArgs<
        '_,
        T,
        MaybeUninit<T>,
    >,
) {
    let _ = tile;
    let mut overwrite = fresh;
    let padded = Padded::new(plan);
    let wide = padded.wide_columns(plan);
    let plane = padded.plane();
    let pixels = plan.out_pixels();
    let ow = plan.output[1];
    let [h, w] = plan.input;
    let [pt, pl] = plan.pad;
    let c = plan.in_channels;
    let depth = plan.window_depth;
    // Every kernel position, ring by ring: (ring, index in ring, shift).
    let positions: Vec<(usize, usize, usize)> = plan
        .rings
        .iter()
        .enumerate()
        .flat_map(|(r, ring)| {
            ring.iter().enumerate().map(move |(pos, &(ky, kx))| {
                let shift = ky * plan.dilation[0] * padded.wp + kx * plan.dilation[1];
                (r, pos, shift)
            })
        })
        .collect();
    let rings = plan.rings_count();
    // Offsets of each window's running sums in `ws.acc` and of its rearranged weight in
    // `ws.wt`.
    let mut sums_at = Vec::with_capacity(plan.windows.len());
    let mut wt_at = Vec::with_capacity(plan.windows.len());
    let (mut sums_len, mut wt_len) = (0, 0);
    for window in &plan.windows {
        sums_at.push(sums_len);
        wt_at.push(wt_len);
        sums_len += rings * window.rows * wide;
        wt_len += positions.len() * window.rows * depth;
    }
    let max_k = plan.windows.iter().map(|w| w.rows).max().unwrap_or(0) * positions.len();
    let dx_tile = (super::tuning::TILE_VALUES / max_k.max(1)).clamp(32, 4096) / 16 * 16;
    let exclusive = windows_partition_channels(plan);
    if dx.is_some() {
        // W rearranged to [(position, primary), channel] per window.
        let wt = grow(&mut ws.wt, wt_len);
        for (wi, window) in plan.windows.iter().enumerate() {
            for (g, &(r, pos, _)) in positions.iter().enumerate() {
                let ld = layout.weight_ld(plan, r);
                let block = layout.weight_block(plan, r, window) + pos;
                let npos = layout.positions[r];
                for p in 0..window.rows {
                    let dst = wt_at[wi] + (g * window.rows + p) * depth;
                    for (ch, v) in wt[dst..dst + depth].iter_mut().enumerate() {
                        *v = ringed[block + p * ld + ch * npos];
                    }
                }
            }
        }
    }
    for image in first..last {
        // Running sums S_r = S_{r-1} + G_r of every window over the wide columns.
        let sums = grow(&mut ws.acc, sums_len);
        for (wi, window) in plan.windows.iter().enumerate() {
            for r in 0..rings {
                let at = sums_at[wi] + r * window.rows * wide;
                if r == 0 {
                    sums[at..at + window.rows * wide].fill(T::ZERO);
                } else {
                    let prev = at - window.rows * wide;
                    sums.copy_within(prev..at, at);
                }
                let base = plan.channel_base(r, window);
                for p in 0..plan.emitted(r, window) {
                    let row = &mut sums[at + p * wide..at + (p + 1) * wide];
                    let channel = (image * plan.out_channels + base + p) * pixels;
                    valid_segments(plan, padded, 0, wide, |col, oy, ox, len| {
                        let g = &grad_out[channel + oy * ow + ox..][..len];
                        add_into(&mut row[col..col + len], g);
                    });
                }
            }
        }
        let sums: &[T] = sums;
        if let Some(dw) = dw.as_deref_mut() {
            let image_buf = grow(&mut ws.cols, pixel_major_len(plan, padded));
            pad_image_pixel_major(plan, padded, x, image, image_buf);
            for (wi, window) in plan.windows.iter().enumerate() {
                if window.rows == 0 {
                    continue;
                }
                for &(r, pos, shift) in &positions {
                    let s_r = sums_at[wi] + r * window.rows * wide;
                    // dW_pos^T[depth, rows] (+)= X_shift[depth, wide] * S_r[rows, wide]^T, the
                    // shifted view read from the pixel-major image (column-major for gemm).
                    // SAFETY: dw has the ring layout (window block, column stride npos); the
                    // view covers `wide` pixels of `depth` channels inside the pixel-major
                    // image and its slack; S_r is rows x wide.
                    unsafe {
                        gemm(
                            [depth, window.rows, wide],
                            dw.as_mut_ptr()
                                .add(layout.weight_block(plan, r, window) + pos),
                            [layout.weight_ld(plan, r), layout.positions[r]],
                            !overwrite,
                            image_buf.as_ptr().add(shift * c + window.in_offset),
                            [c, 1],
                            sums.as_ptr().add(s_r),
                            [wide, 1],
                            parallelism,
                        );
                    }
                }
            }
            overwrite = false;
        }
        let Some(dx) = dx.as_deref_mut() else {
            continue;
        };
        let wt: &[T] = &ws.wt;
        // Padded pixels of the interior rows, tile by tile.
        let (start, end) = (pt * padded.wp, (pt + h) * padded.wp);
        let mut a = start;
        while a < end {
            let b = (a + dx_tile).min(end);
            let width = b - a;
            let dtile = grow(&mut ws.dcols, c * width);
            // dtile[ch, q] at ch * d_rs + q * d_cs: pixel-major when the input has few
            // channels, so gemm's micro-kernel rows run over them (no ragged 6-wide edge).
            let (d_rs, d_cs) = if c <= PIXEL_MAJOR_CHANNELS {
                (1, c)
            } else {
                (width, 1)
            };
            if !exclusive {
                dtile.fill(T::ZERO);
            }
            for (wi, window) in plan.windows.iter().enumerate() {
                if window.rows == 0 {
                    continue;
                }
                let k = positions.len() * window.rows;
                let scol = grow(&mut ws.scol, k * width);
                for (g, &(r, _, shift)) in positions.iter().enumerate() {
                    let s_r = sums_at[wi] + r * window.rows * wide;
                    // Columns q' of the tile read S_r at q' - shift, inside [0, wide).
                    let lo = (a.max(shift) - a).min(width);
                    let hi = ((wide + shift).clamp(a, b) - a).max(lo);
                    for p in 0..window.rows {
                        let row = &mut scol[(g * window.rows + p) * width..][..width];
                        row[..lo].fill(T::ZERO);
                        row[hi..].fill(T::ZERO);
                        if hi > lo {
                            let src = s_r + p * wide + (a + lo - shift);
                            row[lo..hi].copy_from_slice(&sums[src..src + (hi - lo)]);
                        }
                    }
                }
                // dX_tile[depth, width] (+)= Wt[k, depth]^T * Scol[k, width]
                // SAFETY: dtile is c x width, the window's rows start at in_offset; Wt is
                // k x depth; Scol is k x width.
                unsafe {
                    gemm(
                        [depth, width, k],
                        dtile.as_mut_ptr().add(window.in_offset * d_rs),
                        [d_cs, d_rs],
                        !exclusive,
                        wt.as_ptr().add(wt_at[wi]),
                        [depth, 1],
                        scol.as_ptr(),
                        [1, width],
                        parallelism,
                    );
                }
            }
            // Interior pixels of the tile into the input gradient. The tiles run over
            // every padded pixel of the interior rows, so every value of the image's
            // input gradient (each channel, row and column) is written here, once.
            let dtile: &[T] = dtile;
            let mut q = a;
            while q < b {
                let (yp, xp) = (q / padded.wp, q % padded.wp);
                let row_end = ((yp + 1) * padded.wp).min(b);
                let x0 = xp.max(pl);
                let x1 = (row_end - yp * padded.wp).min(pl + w);
                if x1 > x0 {
                    let y = yp - pt;
                    for ch in 0..c {
                        let dst = ((image - first) * c + ch) * h * w + y * w + (x0 - pl);
                        let src = ch * d_rs + (yp * padded.wp + x0 - a) * d_cs;
                        let dst = &mut dx[dst..dst + (x1 - x0)];
                        if d_cs == 1 {
                            for (d, &v) in dst.iter_mut().zip(&dtile[src..src + (x1 - x0)]) {
                                d.write(v);
                            }
                        } else {
                            for (i, d) in dst.iter_mut().enumerate() {
                                d.write(dtile[src + i * d_cs]);
                            }
                        }
                    }
                }
                q = row_end;
            }
            a = b;
        }
    }
    let _ = plane;
}
