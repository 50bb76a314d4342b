//! [`ConvPlan`]: everything the nested kernels need to know about one call, as plain
//! sizes. A versatile layer and a dense convolution are both plans: the dense one has a
//! single ring holding every kernel position.
//!
//! A plan is only made by [`ConvPlan::new`], which checks every invariant the kernels'
//! unchecked memory accesses rely on (rings that partition the kernel, windows inside the
//! input and the weight, output channels each produced exactly once, sizes that fit in
//! memory arithmetic); its fields are private to the kernels. So a plan that exists is
//! one the kernels can run without reading or leaving uninitialised memory.

use thiserror::Error;

use super::tuning::{self, Tuning};

/// A set of primary filters that read one contiguous range of input channels with one
/// contiguous range of weight channels (a channel window `j`, or a group of a grouped
/// layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Channel window index `j` in the output block layout (0 for groups).
    pub j: usize,
    /// First input channel the window reads.
    pub in_offset: usize,
    /// First weight channel the window uses.
    pub weight_offset: usize,
    /// First primary filter of the window.
    pub first_primary: usize,
    /// Primary filters of the window.
    pub rows: usize,
}

impl Window {
    /// The one window of a plan without channel windows or groups: every input channel,
    /// the weight's channels from the first, primaries `0..rows`.
    pub fn whole(rows: usize) -> Self {
        Self {
            j: 0,
            in_offset: 0,
            weight_offset: 0,
            first_primary: 0,
            rows,
        }
    }
}

/// What a caller describes to make a [`ConvPlan`] (see [`ConvPlan::new`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanSpec {
    /// Input shape `[batch, c, h, w]`.
    pub input: [usize; 4],
    /// Kernel `[height, width]`.
    pub kernel: [usize; 2],
    /// Stride `[height, width]`.
    pub stride: [usize; 2],
    /// Dilation `[height, width]`.
    pub dilation: [usize; 2],
    /// Padding `[(top, bottom), (left, right)]`.
    pub padding: [(usize, usize); 2],
    /// Output channels `n`.
    pub out_channels: usize,
    /// Primary filters `m` (rows of the weight).
    pub primaries: usize,
    /// Channel windows per primary `n_c` (1 for dense and grouped layers).
    pub n_c: usize,
    /// Input channels one window reads.
    pub window_depth: usize,
    /// Channels of the weight, `[m, weight_depth, kh, kw]`.
    pub weight_depth: usize,
    /// Kernel positions `(ky, kx)` of each ring, ring 0 the outermost; crop `i` is the
    /// union of rings `i..`. The rings must partition the kernel's positions.
    pub rings: Vec<Vec<(usize, usize)>>,
    /// The windows, each producing its own blocks of output channels
    /// (`channel = (crop * n_c + j) * m + primary`; channels from `out_channels` on are
    /// not emitted).
    pub windows: Vec<Window>,
}

/// Why a [`PlanSpec`] does not describe a convolution the kernels can run.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    /// A size that must be at least 1 is 0.
    #[error("{what} must be at least 1")]
    Zero {
        /// Which size.
        what: &'static str,
    },
    /// The padded input is smaller than the dilated kernel.
    #[error(
        "the padded input ({padded}) is smaller than the dilated kernel ({extent}) along {axis}"
    )]
    InputTooSmall {
        /// `height` or `width`.
        axis: &'static str,
        /// Input size plus padding.
        padded: usize,
        /// Dilated kernel extent.
        extent: usize,
    },
    /// The rings do not visit every kernel position exactly once.
    #[error("the rings must hold each of the {kh}x{kw} kernel positions exactly once: {problem}")]
    Rings {
        /// Kernel height.
        kh: usize,
        /// Kernel width.
        kw: usize,
        /// What is wrong.
        problem: String,
    },
    /// A window reaches outside the input, the weight or the primaries.
    #[error("window {index} {problem}")]
    Window {
        /// The window's index in the spec.
        index: usize,
        /// What is wrong.
        problem: String,
    },
    /// The windows do not produce every output channel exactly once.
    #[error("output channel {channel} is {state} (each must be produced exactly once)")]
    Channels {
        /// The first channel at fault.
        channel: usize,
        /// `never produced` or `produced more than once`.
        state: &'static str,
    },
    /// The groups of a dense convolution do not divide its channels.
    #[error(
        "{groups} groups do not divide {in_channels} input and {out_channels} output channels"
    )]
    Groups {
        /// Groups.
        groups: usize,
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
    },
    /// A buffer size overflows the address space.
    #[error("the {what} is too large to address")]
    TooLarge {
        /// Which buffer.
        what: &'static str,
    },
}

/// A plan narrowed to the kernel positions that read the input ([`ConvPlan::live_crops`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LiveCrops {
    /// The narrowed plan: kernel `[rows, columns]` of the window, the rings from the
    /// first live one on.
    pub plan: ConvPlan,
    /// `[[first row, rows], [first column, columns]]` of the kernel.
    pub window: [[usize; 2]; 2],
    /// Leading crops whose own ring reads padding only: crops `0..=merged_crops` of the
    /// plan are all the narrowed plan's crop 0.
    pub merged_crops: usize,
}

impl LiveCrops {
    /// The narrowed plan's output channel that holds channel `channel` of the plan's.
    pub fn channel(&self, channel: usize) -> usize {
        let block = self.plan.n_c * self.plan.primaries;
        let dropped = self.merged_crops * block;
        if channel >= dropped {
            channel - dropped
        } else {
            channel % block
        }
    }
}

/// The shape of one nested convolution call: input, output, kernel rings, windows and
/// the output channel layout (`channel = (crop * n_c + j) * m + primary`, channels from
/// `out_channels` on not emitted), and the work split ([`Tuning`]) the call uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvPlan {
    pub(super) batch: usize,
    pub(super) in_channels: usize,
    /// Input `[height, width]`.
    pub(super) input: [usize; 2],
    /// Output `[height, width]`.
    pub(super) output: [usize; 2],
    pub(super) kernel: [usize; 2],
    pub(super) stride: [usize; 2],
    pub(super) dilation: [usize; 2],
    /// Padding before the first row and column `[top, left]` (the bottom and right
    /// padding only show in the output size).
    pub(super) pad: [usize; 2],
    pub(super) out_channels: usize,
    pub(super) primaries: usize,
    pub(super) n_c: usize,
    pub(super) window_depth: usize,
    pub(super) weight_depth: usize,
    pub(super) rings: Vec<Vec<(usize, usize)>>,
    /// The windows, trimmed to the primaries that reach an emitted channel.
    pub(super) windows: Vec<Window>,
    pub(super) tuning: Tuning,
}

/// Elements of any one buffer stay below this (bytes of an `f64` buffer fit in `isize`).
const MAX_ELEMENTS: usize = isize::MAX as usize / 8;

fn product(what: &'static str, factors: &[usize]) -> Result<usize, PlanError> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or(PlanError::TooLarge { what })
}

/// Whether `[start, start + len)` reaches past `limit` (or overflows).
fn reaches_past(start: usize, len: usize, limit: usize) -> bool {
    start.checked_add(len).is_none_or(|end| end > limit)
}

fn at_least_one(what: &'static str, value: usize) -> Result<(), PlanError> {
    if value == 0 {
        Err(PlanError::Zero { what })
    } else {
        Ok(())
    }
}

impl ConvPlan {
    /// Checks `spec` and makes its plan, with the calling thread's [`Tuning`]
    /// ([`tuning::current`]). The output size follows from the input, kernel, stride,
    /// dilation and padding.
    pub fn new(spec: PlanSpec) -> Result<Self, PlanError> {
        let PlanSpec {
            input: [batch, in_channels, height, width],
            kernel,
            stride,
            dilation,
            padding,
            out_channels,
            primaries,
            n_c,
            window_depth,
            weight_depth,
            rings,
            windows,
        } = spec;
        for (what, value) in [
            ("the input channel count", in_channels),
            ("the kernel height", kernel[0]),
            ("the kernel width", kernel[1]),
            ("the vertical stride", stride[0]),
            ("the horizontal stride", stride[1]),
            ("the vertical dilation", dilation[0]),
            ("the horizontal dilation", dilation[1]),
            ("the output channel count", out_channels),
            ("the primary filter count", primaries),
            ("the channel window count", n_c),
            ("the window depth", window_depth),
            ("the weight depth", weight_depth),
        ] {
            at_least_one(what, value)?;
        }
        let mut output = [0; 2];
        for (axis, i, size) in [("height", 0, height), ("width", 1, width)] {
            let too_large = PlanError::TooLarge { what: "input" };
            let padded = size
                .checked_add(padding[i].0)
                .and_then(|p| p.checked_add(padding[i].1))
                .ok_or(too_large.clone())?;
            let extent = (kernel[i] - 1)
                .checked_mul(dilation[i])
                .and_then(|e| e.checked_add(1))
                .ok_or(too_large)?;
            if padded < extent {
                return Err(PlanError::InputTooSmall {
                    axis,
                    padded,
                    extent,
                });
            }
            output[i] = (padded - extent) / stride[i] + 1;
        }
        // Buffers the kernels index with unchecked arithmetic: the tensors, the column
        // matrix of all columns (twice: the streaming path's transposed copy), and the
        // padded images of the shifted path.
        product("input", &[batch, in_channels, height, width])?;
        product("output", &[batch, out_channels, output[0], output[1]])?;
        product("weight", &[primaries, weight_depth, kernel[0], kernel[1]])?;
        product("kernel", &[kernel[0], kernel[1], dilation[0], dilation[1]])?;
        let col_rows = product("column matrix", &[in_channels, kernel[0], kernel[1]])?;
        product("column matrix", &[col_rows, batch, output[0], output[1], 2])?;
        // Shifted path: `c` planes of the padded output extent, plus slack rows.
        let padded_plane = [0, 1].map(|i| {
            output[i]
                .saturating_add((kernel[i] - 1).saturating_mul(dilation[i]))
                .saturating_add(2)
        });
        product(
            "padded image",
            &[
                in_channels.saturating_add(1),
                padded_plane[0],
                padded_plane[1],
            ],
        )?;
        product("channel blocks", &[rings.len().max(1), n_c, primaries, 2])?;
        check_rings(&rings, kernel)?;
        for (index, w) in windows.iter().enumerate() {
            let problem = if w.j >= n_c {
                Some(format!("has index j = {} but n_c = {n_c}", w.j))
            } else if reaches_past(w.in_offset, window_depth, in_channels) {
                Some(format!(
                    "reads input channels {}..{}, past the input's {in_channels}",
                    w.in_offset,
                    w.in_offset.saturating_add(window_depth)
                ))
            } else if reaches_past(w.weight_offset, window_depth, weight_depth) {
                Some(format!(
                    "uses weight channels {}..{}, past the weight's {weight_depth}",
                    w.weight_offset,
                    w.weight_offset.saturating_add(window_depth)
                ))
            } else if reaches_past(w.first_primary, w.rows, primaries) {
                Some(format!(
                    "uses primaries {}..{}, past the weight's {primaries}",
                    w.first_primary,
                    w.first_primary.saturating_add(w.rows)
                ))
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(PlanError::Window { index, problem });
            }
        }
        let mut plan = Self {
            batch,
            in_channels,
            input: [height, width],
            output,
            kernel,
            stride,
            dilation,
            pad: [padding[0].0, padding[1].0],
            out_channels,
            primaries,
            n_c,
            window_depth,
            weight_depth,
            rings,
            windows,
            tuning: tuning::current(),
        };
        plan.check_channels()?;
        plan.trim();
        Ok(plan)
    }

    /// The plan of a dense (possibly grouped) convolution with weight
    /// `[out_channels, in_channels / groups, kh, kw]`: one ring holding every position.
    pub fn dense(
        input: [usize; 4],
        out_channels: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
        padding: [(usize, usize); 2],
    ) -> Result<Self, PlanError> {
        at_least_one("the group count", groups)?;
        let in_channels = input[1];
        if !in_channels.is_multiple_of(groups) || !out_channels.is_multiple_of(groups) {
            return Err(PlanError::Groups {
                groups,
                in_channels,
                out_channels,
            });
        }
        let depth = in_channels / groups;
        let per_group = out_channels / groups;
        let ring = (0..kernel[0])
            .flat_map(|ky| (0..kernel[1]).map(move |kx| (ky, kx)))
            .collect();
        let windows = (0..groups)
            .map(|q| Window {
                j: 0,
                in_offset: q * depth,
                weight_offset: 0,
                first_primary: q * per_group,
                rows: per_group,
            })
            .collect();
        Self::new(PlanSpec {
            input,
            kernel,
            stride,
            dilation,
            padding,
            out_channels,
            primaries: out_channels,
            n_c: 1,
            window_depth: depth,
            weight_depth: depth,
            rings: vec![ring],
            windows,
        })
    }

    /// This plan with another work split (the calling thread's, [`tuning::current`], is
    /// the default).
    pub fn with_tuning(mut self, tuning: Tuning) -> Self {
        self.tuning = tuning;
        self
    }

    /// The work split this plan's calls use.
    pub fn tuning(&self) -> Tuning {
        self.tuning
    }

    /// Checks that the channel ranges of every (crop, window) tile `[0, out_channels)`:
    /// each output channel produced exactly once.
    fn check_channels(&self) -> Result<(), PlanError> {
        const NEVER: &str = "never produced";
        const TWICE: &str = "produced more than once";
        let mut ranges: Vec<(usize, usize)> = (0..self.rings_count())
            .flat_map(|crop| self.windows.iter().map(move |w| (crop, w)))
            .map(|(crop, w)| {
                let base = self.channel_base(crop, w);
                (base, base + w.rows)
            })
            .filter(|&(a, b)| a < b && a < self.out_channels)
            .map(|(a, b)| (a, b.min(self.out_channels)))
            .collect();
        ranges.sort_unstable();
        let mut next = 0;
        for (a, b) in ranges {
            if a != next {
                // A gap before `a`, or an overlap at `a`.
                return Err(if a > next {
                    PlanError::Channels {
                        channel: next,
                        state: NEVER,
                    }
                } else {
                    PlanError::Channels {
                        channel: a,
                        state: TWICE,
                    }
                });
            }
            next = b;
        }
        if next < self.out_channels {
            return Err(PlanError::Channels {
                channel: next,
                state: NEVER,
            });
        }
        Ok(())
    }

    /// Drops from each window the primaries whose every channel was cut (the widest crop,
    /// `i = 0`, emits the most rows).
    fn trim(&mut self) {
        for w in 0..self.windows.len() {
            let rows = self.emitted(0, &self.windows[w]);
            self.windows[w].rows = rows;
        }
    }

    /// The smallest window of kernel positions holding every position that some output
    /// reads inside the input, as `[first row, rows]` and `[first column, columns]`;
    /// `None` where no position reads the input (every output sees padding only).
    ///
    /// A position outside it multiplies padding zeros only: at a 1 x 1 map, a padded
    /// 3 x 3 kernel reads its centre alone.
    pub fn live_window(&self) -> Option<[[usize; 2]; 2]> {
        let axis = |i: usize| {
            let reads_input = |k: usize| {
                (0..self.output[i]).any(|o| {
                    let at = o * self.stride[i] + k * self.dilation[i];
                    at >= self.pad[i] && at - self.pad[i] < self.input[i]
                })
            };
            let first = (0..self.kernel[i]).find(|&k| reads_input(k))?;
            let last = (0..self.kernel[i]).rev().find(|&k| reads_input(k))?;
            Some([first, last + 1 - first])
        };
        Some([axis(0)?, axis(1)?])
    }

    /// This plan on the kernel positions of [`live_window`](Self::live_window) only, and
    /// that window: the same outputs from the weight narrowed to it (`[m, depth,
    /// rows, columns]` from `[first row, first column]`), with fewer multiply-adds, and
    /// zero gradients for the positions left out. `None` where the window is the whole
    /// kernel, or where the narrowed plan cannot express it (a ring of a versatile layer
    /// would be left empty, or the window starts inside the top or left padding's reach
    /// of a dilated kernel).
    pub fn on_live_window(&self) -> Option<(ConvPlan, [[usize; 2]; 2])> {
        self.live_crops()
            .filter(|live| live.merged_crops == 0)
            .map(|live| (live.plan, live.window))
    }

    /// As [`on_live_window`](Self::on_live_window), where the outer rings of a versatile
    /// layer may read padding only: those crops equal the first crop with a live ring, so
    /// the narrowed plan drops their rings and computes that crop once for all of them
    /// (see [`LiveCrops`]).
    pub(crate) fn live_crops(&self) -> Option<LiveCrops> {
        let window = self.live_window()?;
        if window[0][1] == self.kernel[0] && window[1][1] == self.kernel[1] {
            return None;
        }
        let [[y0, rows], [x0, cols]] = window;
        let inside = |&(ky, kx): &(usize, usize)| {
            (y0..y0 + rows).contains(&ky) && (x0..x0 + cols).contains(&kx)
        };
        let mut rings: Vec<Vec<(usize, usize)>> = self
            .rings
            .iter()
            .map(|ring| {
                ring.iter()
                    .filter(|p| inside(p))
                    .map(|&(ky, kx)| (ky - y0, kx - x0))
                    .collect()
            })
            .collect();
        // Crop i is the union of rings i..: with rings 0..merged empty, crops 0..=merged
        // are the same sums. An empty ring further in would make a crop a copy of the next
        // one's, which this channel mapping does not describe.
        let merged_crops = rings.iter().take_while(|ring| ring.is_empty()).count();
        rings.drain(..merged_crops);
        if rings.is_empty() || rings.iter().any(Vec::is_empty) {
            return None;
        }
        // The first crop emits the channels of the merged ones as well: at least a whole
        // block of channels where the plan has that many.
        let block = self.n_c * self.primaries;
        let out_channels = self
            .out_channels
            .saturating_sub(merged_crops * block)
            .max(self.out_channels.min(block));
        // Position k' of the window is position k' + first of the kernel: the same input
        // row with the leading padding less by `first` dilated steps; the trailing
        // padding is whatever keeps the output size.
        let mut padding = [(0, 0); 2];
        for (i, [first, len]) in window.into_iter().enumerate() {
            let begin = self.pad[i].checked_sub(first * self.dilation[i])?;
            padding[i] = self.padding_keeping_output(i, len, begin);
        }
        let plan = ConvPlan::new(PlanSpec {
            input: self.input_shape(),
            kernel: [rows, cols],
            stride: self.stride,
            dilation: self.dilation,
            padding,
            out_channels,
            primaries: self.primaries,
            n_c: self.n_c,
            window_depth: self.window_depth,
            weight_depth: self.weight_depth,
            rings,
            windows: self.windows.clone(),
        })
        .ok()?
        .with_tuning(self.tuning);
        (plan.output == self.output).then_some(LiveCrops {
            plan,
            window,
            merged_crops,
        })
    }

    /// This plan's channel windows as one window over every input channel: `n_c * m`
    /// primaries of the input's full depth, primary `j * m + p` being window `j`'s filter
    /// `p` placed at the window's input channels (zeros elsewhere, as in the dense form),
    /// with the same rings and output channels (`(crop * n_c + j) * m + p` is
    /// `crop * (n_c * m) + (j * m + p)`). Two windows that read overlapping inputs then
    /// share every pass over the input. `None` for a plan of one window, of groups, or of
    /// windows trimmed short.
    pub(crate) fn windows_unfolded(&self) -> Option<ConvPlan> {
        let m = self.primaries;
        let whole_windows = self.n_c > 1
            && self.windows.len() == self.n_c
            && self
                .windows
                .iter()
                .enumerate()
                .all(|(j, w)| w.j == j && w.first_primary == 0 && w.rows == m);
        if !whole_windows {
            return None;
        }
        let primaries = self.n_c.checked_mul(m)?;
        let padding = [0, 1].map(|i| self.padding_keeping_output(i, self.kernel[i], self.pad[i]));
        let plan = ConvPlan::new(PlanSpec {
            input: self.input_shape(),
            kernel: self.kernel,
            stride: self.stride,
            dilation: self.dilation,
            padding,
            out_channels: self.out_channels,
            primaries,
            n_c: 1,
            window_depth: self.in_channels,
            weight_depth: self.in_channels,
            rings: self.rings.clone(),
            windows: vec![Window::whole(primaries)],
        })
        .ok()?
        .with_tuning(self.tuning);
        (plan.output == self.output).then_some(plan)
    }

    /// The padding `(before, after)` along `axis` of a kernel `taps` long (this plan's
    /// stride and dilation) with `before` leading: the trailing padding is whatever keeps
    /// this plan's output size.
    fn padding_keeping_output(&self, axis: usize, taps: usize, before: usize) -> (usize, usize) {
        let reach =
            (self.output[axis] - 1) * self.stride[axis] + (taps - 1) * self.dilation[axis] + 1;
        (before, reach.saturating_sub(self.input[axis] + before))
    }

    /// Input shape `[batch, c, h, w]`.
    pub fn input_shape(&self) -> [usize; 4] {
        [self.batch, self.in_channels, self.input[0], self.input[1]]
    }

    /// Output shape `[batch, n, out_h, out_w]`.
    pub fn output_shape(&self) -> [usize; 4] {
        [
            self.batch,
            self.out_channels,
            self.output[0],
            self.output[1],
        ]
    }

    /// Weight shape `[m, depth, kh, kw]`.
    pub fn weight_shape(&self) -> [usize; 4] {
        [
            self.primaries,
            self.weight_depth,
            self.kernel[0],
            self.kernel[1],
        ]
    }

    /// Output channels `n` (the length of a bias).
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// The windows (trimmed to the primaries that reach an emitted channel).
    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// Number of rings `s`.
    pub fn rings_count(&self) -> usize {
        self.rings.len()
    }

    /// Kernel positions `(ky, kx)` of each ring, ring 0 the outermost (crop `i` is the
    /// union of rings `i..`).
    pub fn rings(&self) -> &[Vec<(usize, usize)>] {
        &self.rings
    }

    /// Kernel `[height, width]`.
    pub fn kernel(&self) -> [usize; 2] {
        self.kernel
    }

    /// Stride `[height, width]`.
    pub fn stride(&self) -> [usize; 2] {
        self.stride
    }

    /// Dilation `[height, width]`.
    pub fn dilation(&self) -> [usize; 2] {
        self.dilation
    }

    /// Padding before the first row and column `[top, left]`.
    pub fn padding_begin(&self) -> [usize; 2] {
        self.pad
    }

    /// Primary filters `m` (rows of the weight).
    pub fn primaries(&self) -> usize {
        self.primaries
    }

    /// Channel windows per primary `n_c`.
    pub fn n_c(&self) -> usize {
        self.n_c
    }

    /// Input channels one window reads.
    pub fn window_depth(&self) -> usize {
        self.window_depth
    }

    /// Output channel of crop `i`, window `w`, the window's first primary.
    pub(super) fn channel_base(&self, crop: usize, window: &Window) -> usize {
        (crop * self.n_c + window.j) * self.primaries + window.first_primary
    }

    /// How many of the window's primaries crop `i` emits (a prefix of them).
    pub(super) fn emitted(&self, crop: usize, window: &Window) -> usize {
        self.out_channels
            .saturating_sub(self.channel_base(crop, window))
            .min(window.rows)
    }

    /// Output pixels per image.
    pub(super) fn out_pixels(&self) -> usize {
        self.output[0] * self.output[1]
    }

    /// Output columns of the whole call: `batch * out_h * out_w`.
    pub(super) fn columns(&self) -> usize {
        self.batch * self.out_pixels()
    }

    /// Elements of the input `[batch, c, h, w]`.
    pub fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.input[0] * self.input[1]
    }

    /// Elements of the output `[batch, n, out_h, out_w]`.
    pub fn output_len(&self) -> usize {
        self.batch * self.out_channels * self.out_pixels()
    }

    /// Elements of the weight `[m, depth, kh, kw]`.
    pub fn weight_len(&self) -> usize {
        self.primaries * self.weight_depth * self.kernel[0] * self.kernel[1]
    }

    /// Rows of the im2col matrix: every input channel at every kernel position.
    pub(super) fn col_rows(&self) -> usize {
        self.in_channels * self.kernel[0] * self.kernel[1]
    }

    /// Multiply-adds of the nested evaluation (one pass: forward, or one gradient).
    pub fn macs(&self) -> u64 {
        let positions = (self.kernel[0] * self.kernel[1]) as u64;
        let rows: u64 = self.windows.iter().map(|w| w.rows as u64).sum();
        self.columns() as u64 * rows * self.window_depth as u64 * positions
    }
}

/// Checks that `rings` hold each position of a `kernel` exactly once.
fn check_rings(rings: &[Vec<(usize, usize)>], kernel: [usize; 2]) -> Result<(), PlanError> {
    let [kh, kw] = kernel;
    let fail = |problem: String| PlanError::Rings { kh, kw, problem };
    let held: usize = rings.iter().map(Vec::len).sum();
    if Some(held) != kh.checked_mul(kw) {
        return Err(fail(format!("they hold {held} positions")));
    }
    let mut seen = vec![false; kh * kw];
    for (r, ring) in rings.iter().enumerate() {
        if ring.is_empty() {
            return Err(fail(format!("ring {r} is empty")));
        }
        for &(ky, kx) in ring {
            if ky >= kh || kx >= kw {
                return Err(fail(format!(
                    "ring {r} holds ({ky}, {kx}), outside the kernel"
                )));
            }
            if std::mem::replace(&mut seen[ky * kw + kx], true) {
                return Err(fail(format!("({ky}, {kx}) appears twice")));
            }
        }
    }
    match seen.iter().position(|&s| !s) {
        Some(i) => Err(fail(format!("({}, {}) is missing", i / kw, i % kw))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(side: usize, kernel: usize, stride: usize, pad: usize) -> ConvPlan {
        ConvPlan::dense(
            [1, 2, side, side],
            3,
            [kernel; 2],
            [stride; 2],
            [1, 1],
            1,
            [(pad, pad); 2],
        )
        .unwrap()
    }

    #[test]
    fn live_window_of_small_maps() {
        // A 1 x 1 map reads the centre of a padded 3 x 3 kernel only.
        assert_eq!(dense(1, 3, 1, 1).live_window(), Some([[1, 1], [1, 1]]));
        // 2 x 2 -> 1 x 1 at stride 2: the output reads rows and columns 1 and 2.
        assert_eq!(dense(2, 3, 2, 1).live_window(), Some([[1, 2], [1, 2]]));
        // Every position reads the input somewhere.
        assert_eq!(dense(2, 3, 1, 1).live_window(), Some([[0, 3], [0, 3]]));
        assert_eq!(dense(7, 7, 2, 3).live_window(), Some([[0, 7], [0, 7]]));
    }

    #[test]
    fn on_live_window_keeps_the_output_and_drops_dead_positions() {
        let plan = dense(1, 3, 1, 1);
        let (narrow, window) = plan.on_live_window().unwrap();
        assert_eq!(window, [[1, 1], [1, 1]]);
        assert_eq!(narrow.kernel(), [1, 1]);
        assert_eq!(narrow.output_shape(), plan.output_shape());
        assert_eq!(narrow.padding_begin(), [0, 0]);
        assert_eq!(narrow.macs() * 9, plan.macs());

        let plan = dense(2, 3, 2, 1);
        let (narrow, window) = plan.on_live_window().unwrap();
        assert_eq!(window, [[1, 2], [1, 2]]);
        assert_eq!(narrow.kernel(), [2, 2]);
        assert_eq!(narrow.output_shape(), plan.output_shape());
        assert_eq!(narrow.padding_begin(), [0, 0]);

        // Nothing to drop.
        assert!(dense(5, 3, 1, 1).on_live_window().is_none());
    }

    #[test]
    fn empty_outer_rings_merge_their_crops() {
        // A versatile 3 x 3 layer (outer ring, centre) at a 1 x 1 map: the outer ring
        // reads padding only.
        let outer: Vec<(usize, usize)> = (0..3)
            .flat_map(|y| (0..3).map(move |x| (y, x)))
            .filter(|&p| p != (1, 1))
            .collect();
        let spec = |side: usize, stride: usize| PlanSpec {
            input: [1, 2, side, side],
            kernel: [3, 3],
            stride: [stride; 2],
            dilation: [1, 1],
            padding: [(1, 1); 2],
            out_channels: 4,
            primaries: 2,
            n_c: 1,
            window_depth: 2,
            weight_depth: 2,
            rings: vec![outer.clone(), vec![(1, 1)]],
            windows: vec![Window::whole(2)],
        };
        let plan = ConvPlan::new(spec(1, 1)).unwrap();
        assert_eq!(plan.live_window(), Some([[1, 1], [1, 1]]));
        assert!(plan.on_live_window().is_none());
        // ... but the outer crop is the inner one there: one crop computed for both.
        let live = plan.live_crops().unwrap();
        assert_eq!(live.merged_crops, 1);
        assert_eq!(live.plan.rings(), &[vec![(0, 0)]]);
        assert_eq!(live.plan.output_shape(), [1, 2, 1, 1]);
        assert_eq!(
            (0..4).map(|c| live.channel(c)).collect::<Vec<_>>(),
            [0, 1, 0, 1]
        );
        // At stride 2 from 2 x 2 both rings keep positions.
        let plan = ConvPlan::new(spec(2, 2)).unwrap();
        let (narrow, _) = plan.on_live_window().unwrap();
        assert_eq!(
            narrow.rings(),
            &[vec![(0, 1), (1, 0), (1, 1)], vec![(0, 0)]]
        );
    }
}
