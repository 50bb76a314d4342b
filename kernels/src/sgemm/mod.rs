//! Single-precision matrix products for the convolution kernels:
//! `dst[m x n] (+)= lhs[m x k] * rhs[k x n]`, every operand strided.
//!
//! The layout follows the classic packed design (BLIS, MLAS): both operands are copied
//! into panels the micro-kernel reads in order (`lhs` as `MR` rows interleaved per `k`,
//! `rhs` as `NR` columns per `k`, zero-padded at the edges); `k` is cut in blocks of
//! `KC` so that one `rhs` panel stays in L1 while the `lhs` panels of a block of
//! `MC` rows stream from L2; the micro-kernel keeps an `MR x NR` tile of `dst` in
//! registers (`avx512`: 8 x 48, `avx2`: 6 x 16, chosen at run time).
//!
//! Every value of `dst` is its `k` products summed in increasing `k`, one fused
//! multiply-add at a time, block by block, each block's sum added to `dst` in order. So
//! the bits do not depend on the split over threads, on the tile a value falls in, or on
//! which micro-kernel ran: a run is reproducible on any machine with FMA.
//!
//! `sgemm` declines (returns `false`) where the CPU has neither AVX-512 nor AVX2 + FMA,
//! where `dst` has no unit stride, or where the product is too skinny to fill half of
//! the micro-kernel's tiles (unless an operand is gathered through `k` offsets, which
//! only sgemm reads); the caller then uses the `gemm` crate.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

use std::cell::Cell;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::alloc::Line;
use crate::workspace::grow;

/// Depth of one block of `k`: an AVX-512 `rhs` panel (`KC x 48` values) is 30 KiB, so
/// that it stays in a 48 KiB L1 beside the `lhs` panels streaming through (at 256, 48
/// KiB, the 8 x 48 kernel alone ran 7 % slower; 128 and 192 were level with 160 in the
/// convolutions).
pub(crate) const KC: usize = 160;
/// Rows of `lhs` packed at a time (a multiple of both micro-kernels' `MR`): 192 KiB.
pub(crate) const MC: usize = 192;
/// Columns of `rhs` packed at a time (a multiple of both micro-kernels' `NR`): 480 KiB.
pub(crate) const NC: usize = 480;

/// Products below this many multiply-adds run on one thread even when more are offered.
const PARALLEL_MACS: usize = 1 << 18;

/// The part of `dst` a micro-kernel call writes: `rows <= MR` rows `rs` apart of
/// `cols <= NR` unit-stride columns from `ptr`.
#[derive(Clone, Copy)]
pub(crate) struct Tile {
    pub ptr: *mut f32,
    pub rs: usize,
    pub rows: usize,
    pub cols: usize,
}

/// A micro-kernel: `t = sum_{p < kc} a[p * MR + i] * b[p * NR + j]` (fused multiply-adds
/// in increasing `p`), then `dst[i, j] = t` or, with `add`, `dst[i, j] += t`, for the
/// tile's `rows x cols` values (the rest of the `MR x NR` sums are dropped).
///
/// Safety contract: `a` holds `kc * MR` values, `b` holds `kc * NR` values, and
/// `dst.ptr + i * dst.rs + j` is valid for reads and writes for every `i < dst.rows <= MR`,
/// `j < dst.cols <= NR`.
type Kernel = unsafe fn(kc: usize, a: *const f32, b: *const f32, dst: Tile, add: bool);

/// Where the rows of an `rhs` read in place start, from the tile's first column.
#[derive(Clone, Copy)]
enum RhsRows {
    /// Row `p` at `ptr + offsets[p]` (a gathered operand's `k` offsets).
    Offsets(*const f32, *const usize),
    /// Row `p` at `ptr + p * stride`.
    Strided(*const f32, usize),
}

/// A micro-kernel that reads `rhs` in place: as [`Kernel`], with row `p` of `rhs` the
/// `dst.cols` values from where [`RhsRows`] puts it (no packed panel: a product of few
/// rows, such as a versatile layer's 32 primaries, would spend as long packing its `rhs`
/// as multiplying it).
///
/// Safety contract: as [`Kernel`], with `offsets` (where given) holding `kc` values and
/// the `dst.cols` values of row `p` valid for every `p < kc`.
type DirectKernel = unsafe fn(kc: usize, a: *const f32, b: RhsRows, dst: Tile, add: bool);

/// A micro-kernel that reads `lhs` in place, row by row, in `taps` runs of `kc` steps: as
/// [`Kernel`] over `k = taps * kc`, with value `(i, t * kc + p)` of `lhs` at
/// `rows[t * MR + i] + offset + p` (`rows` given as `(rows, offset)`) (a convolution on channels-last activations: each output
/// position's input pixels, tap by tap, are rows of the image itself, no packing).
///
/// `b` is the panel and where to prefetch from: one line of 16 values per step, to L2
/// (the weight of a layer on a small map streams from memory, and the next block's
/// lines arrive while this one's tiles run from L2; a prefetch never faults).
///
/// With `finish`, the tile's final values go through it as they are stored.
///
/// Safety contract: as [`Kernel`] (`b` holding `taps * kc * NR` values), with `rows`
/// holding `taps * MR` pointers, each valid for `offset + kc` reads (rows past `dst.rows` too:
/// point them at any valid row), and `finish`'s
/// pointers, where not null, valid for the tile's `cols` values (its `residual` for the
/// tile's rows, `dst.rs` apart).
pub(crate) type IndirectKernel = unsafe fn(
    kc: usize,
    taps: usize,
    rows: (*const *const f32, usize),
    b: (*const f32, *const f32),
    dst: Tile,
    add: bool,
    finish: Option<TileFinish>,
);

/// The output write of a tile: `y = value * scale[j] + shift[j] + residual[i, j]`, then
/// `max(y, 0)` where `relu` (NaN stays), a null pointer leaving its term out (the same
/// operations, in the same order, as [`crate::Epilogue`]).
#[derive(Clone, Copy)]
pub(crate) struct TileFinish {
    /// Per column of the tile.
    pub scale: *const f32,
    /// Per column of the tile.
    pub shift: *const f32,
    /// The tile's own, rows `dst.rs` apart.
    pub residual: *const f32,
    pub relu: bool,
}

/// Products of at most this many rows read a unit-stride `rhs` in place where the CPU
/// has a [`DirectKernel`].
const DIRECT_ROWS: usize = 64;

/// The micro-kernel this CPU runs, with its tile.
#[derive(Clone, Copy)]
struct Micro {
    /// What [`micro_kernel`] calls it.
    name: &'static str,
    kernel: Kernel,
    /// The kernel reading `rhs` in place, where there is one.
    direct: Option<DirectKernel>,
    /// The kernels reading `lhs` rows in place, with their tiles.
    indirect: &'static [Indirect],
    mr: usize,
    nr: usize,
}

/// The best micro-kernel of this CPU, if any.
fn micro() -> Option<Micro> {
    static MICRO: OnceLock<Option<Micro>> = OnceLock::new();
    *MICRO.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Option<Micro> {
    if std::env::var_os("VERSATILE_SGEMM").is_some_and(|v| v == "gemm") {
        return None;
    }
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    if is_x86_feature_detected!("avx512f")
        && std::env::var_os("VERSATILE_SGEMM").is_none_or(|v| v != "avx2")
    {
        Some(avx512::MICRO)
    } else if avx2 {
        Some(avx2::MICRO)
    } else {
        None
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Option<Micro> {
    None
}

/// Which micro-kernel `sgemm` runs on this CPU: `"avx512"`, `"avx2"` or `None` (the
/// `gemm` crate). `VERSATILE_SGEMM=avx2` or `=gemm` in the environment picks a lesser one
/// (for benchmarks and tests).
pub fn micro_kernel() -> Option<&'static str> {
    micro().map(|m| m.name)
}

/// An [`IndirectKernel`] with its tile: `mr` rows (positions) by `nr` columns.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Indirect {
    pub kernel: IndirectKernel,
    pub mr: usize,
    pub nr: usize,
}

/// This CPU's [`IndirectKernel`]s (none where it has none).
pub(crate) fn indirect() -> &'static [Indirect] {
    micro().map_or(&[], |m| m.indirect)
}

/// The AVX2 [`IndirectKernel`]s, for tests on a CPU that picks the AVX-512 ones.
///
/// Callers must check that the CPU has AVX2 and FMA before calling them.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) fn avx2_indirect() -> &'static [Indirect] {
    avx2::MICRO.indirect
}

/// A strided matrix: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<P> {
    pub ptr: P,
    pub rs: usize,
    pub cs: usize,
}

// SAFETY: a Strided is a raw address and strides; the callers of `sgemm` promise that the
// addressed values are valid and that `dst` is written by one task per element (the
// parallel split hands disjoint tiles to the tasks).
unsafe impl<P> Send for Strided<P> {}
// SAFETY: as above.
unsafe impl<P> Sync for Strided<P> {}

/// An operand of [`sgemm`]: a strided matrix, possibly also laid out ahead in
/// [`Panels`] (used where their width fits the side the operand lands on, else the
/// strided form is packed on the fly).
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub strided: Strided<*const f32>,
    /// The operand's panels (of the operand as given for `lhs`, of its transpose for
    /// `rhs`) and the panel row of its first row. With a null `strided.ptr`, the panels
    /// are the only form: they must then be of the width of the side the operand lands
    /// on.
    pub panels: Option<(&'a Panels, usize)>,
    /// Where each index `p` of the shared dimension `k` lies, in values from `ptr`, in
    /// place of `p` times its stride (an im2col done while packing: the rows of a
    /// convolution's column matrix are shifted views of one image). Such an operand is
    /// never declined for filling few tiles: the caller has no other way to multiply it.
    pub k_offsets: Option<&'a [usize]>,
}

impl<'a> Operand<'a> {
    /// The transposed operand: the same panels (they describe the matrix as `rows x k`,
    /// whichever side it lands on).
    fn transposed(self) -> Self {
        Self {
            strided: Strided {
                ptr: self.strided.ptr,
                rs: self.strided.cs,
                cs: self.strided.rs,
            },
            ..self
        }
    }

    /// An operand read through its strides only.
    pub(crate) fn strided(strided: Strided<*const f32>) -> Self {
        Self {
            strided,
            panels: None,
            k_offsets: None,
        }
    }

    /// The panels, if they have `width` rows each.
    fn panels_of(self, width: usize) -> Option<(&'a Panels, usize)> {
        self.panels.filter(|(panels, _)| panels.width == width)
    }
}

/// What to do with a block of `dst` once its values are final: called with the block's
/// `[first row, rows]` and `[first column, columns]`, on the thread that computed it,
/// while the block is still in its caches (a convolution's epilogue reads its
/// accumulators there instead of in a pass of its own).
pub(crate) type Finish<'a> = &'a (dyn Fn([usize; 2], [usize; 2]) + Sync);

/// `dst[m x n] (+)= lhs[m x k] * rhs[k x n]` (`accumulate` keeps `dst`), on up to
/// `threads` rayon tasks; `false` (and nothing written) where this CPU or `dst`'s layout
/// has no micro-kernel here, or the product would not fill half of its tiles.
///
/// `finish`, where given, is called once for each block of `dst` as soon as it is final
/// (the blocks cover `dst` exactly once; none is called where sgemm declines).
///
/// # Safety
/// Every matrix with its strides must address valid values (`m x n`, `m x k`, `k x n`),
/// `dst` must not overlap `lhs` or `rhs`, distinct `(i, j)` of `dst` must be distinct
/// addresses, and an operand's panels must hold the same matrix (`lhs`'s rows, `rhs`'s
/// columns, from the given panel row on); `finish` may read the block it is given (and
/// nothing else of `dst`).
pub(crate) unsafe fn sgemm(
    [m, n, k]: [usize; 3],
    dst: Strided<*mut f32>,
    accumulate: bool,
    lhs: Operand<'_>,
    rhs: Operand<'_>,
    threads: usize,
    finish: Option<Finish<'_>>,
) -> bool {
    let Some(micro) = micro() else {
        return false;
    };
    // The micro-kernels store along unit-stride rows; a column-major `dst` is the
    // transposed product `dst^T = rhs^T * lhs^T`.
    let (m, n, dst, lhs, rhs, transposed) = if dst.cs == 1 {
        (m, n, dst, lhs, rhs, false)
    } else if dst.rs == 1 {
        let dst = Strided {
            ptr: dst.ptr,
            rs: dst.cs,
            cs: 1,
        };
        (n, m, dst, rhs.transposed(), lhs.transposed(), true)
    } else {
        return false;
    };
    // The blocks in the caller's coordinates.
    let finish = finish.map(|finish| Done { finish, transposed });
    if m == 0 || n == 0 {
        return true;
    }
    // A gathered operand, or one given as panels only (null strided form), has no other
    // way to be multiplied: such a product is never declined for filling few tiles.
    let required = lhs.k_offsets.is_some()
        || rhs.k_offsets.is_some()
        || lhs.strided.ptr.is_null()
        || rhs.strided.ptr.is_null();
    if !required && !fills_tiles(micro, m, n) {
        return false;
    }
    let threads = if m.saturating_mul(n).saturating_mul(k) < PARALLEL_MACS {
        1
    } else {
        threads.max(1)
    };
    let lhs = Side::new(lhs, micro.mr);
    let rhs = Side::new(rhs.transposed(), micro.nr);
    // Split the longer side in whole tiles; each task owns its rows or columns of dst.
    let (n_tiles, m_tiles) = (n.div_ceil(micro.nr), m.div_ceil(micro.mr));
    if threads > 1 && (n_tiles >= threads || m_tiles >= threads) {
        let by_columns = n_tiles >= m_tiles;
        let (tiles, tile) = if by_columns {
            (n_tiles, micro.nr)
        } else {
            (m_tiles, micro.mr)
        };
        let parts = threads.min(tiles);
        (0..parts).into_par_iter().for_each(|part| {
            let begin = tiles * part / parts * tile;
            let end = (tiles * (part + 1) / parts * tile).min(if by_columns { n } else { m });
            // SAFETY: the task's block lies inside the caller's matrices (begin < end <=
            // n or m, a whole number of tiles from the start), and the tasks' blocks of
            // dst are disjoint.
            unsafe {
                if by_columns {
                    serial(
                        micro,
                        [m, end - begin, k],
                        offset(dst, 0, begin),
                        accumulate,
                        lhs,
                        rhs.rows_from(begin),
                        finish.map(|done| (done, [0, begin])),
                    );
                } else {
                    serial(
                        micro,
                        [end - begin, n, k],
                        offset(dst, begin, 0),
                        accumulate,
                        lhs.rows_from(begin),
                        rhs,
                        finish.map(|done| (done, [begin, 0])),
                    );
                }
            }
        });
    } else {
        serial(
            micro,
            [m, n, k],
            dst,
            accumulate,
            lhs,
            rhs,
            finish.map(|done| (done, [0, 0])),
        );
    }
    true
}

/// A [`Finish`] as the driver calls it: in the coordinates of the (possibly transposed)
/// product it runs.
#[derive(Clone, Copy)]
struct Done<'a> {
    finish: Finish<'a>,
    transposed: bool,
}

impl Done<'_> {
    /// Rows `[i, i + rows)` and columns `[j, j + cols)` of the product as run are final.
    fn call(self, [i, rows]: [usize; 2], [j, cols]: [usize; 2]) {
        if self.transposed {
            (self.finish)([j, cols], [i, rows]);
        } else {
            (self.finish)([i, rows], [j, cols]);
        }
    }
}

/// Whether a row-major `m x n` product keeps at least half of each micro-kernel tile's
/// values: a skinny one (a matrix-vector product, few rows or columns) would compute
/// mostly padding, and the `gemm` crate's dedicated paths do it better.
fn fills_tiles(micro: Micro, m: usize, n: usize) -> bool {
    let padded = m.div_ceil(micro.mr) * micro.mr * n.div_ceil(micro.nr) * micro.nr;
    2 * m * n >= padded
}

/// Whether an `m x n` product of `T` values runs on a micro-kernel here (`T` is `f32`,
/// the CPU has one, and the product fills half of its tiles): where it does not, panels
/// laid out ahead for it would never be read.
pub(crate) fn fills<T: 'static>(m: usize, n: usize) -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && micro().is_some_and(|micro| fills_tiles(micro, m, n))
}

/// One side of a product as the driver reads it: a matrix `rows x k` (`lhs`, or `rhs`
/// transposed) to cut in panels of `width` rows, strided or already in panels.
#[derive(Clone, Copy)]
struct Side<'a> {
    strided: Strided<*const f32>,
    panels: Option<(&'a Panels, usize)>,
    k_offsets: Option<&'a [usize]>,
}

impl<'a> Side<'a> {
    fn new(operand: Operand<'a>, width: usize) -> Self {
        Self {
            strided: operand.strided,
            panels: operand.panels_of(width),
            k_offsets: operand.k_offsets,
        }
    }

    /// The rows from `first` on (a multiple of the panel width).
    ///
    /// # Safety
    /// `first` must be a row of the matrix.
    unsafe fn rows_from(self, first: usize) -> Self {
        Self {
            // SAFETY: forwarded to the caller.
            strided: unsafe { offset(self.strided, first, 0) },
            panels: self.panels.map(|(panels, row)| (panels, row + first)),
            k_offsets: self.k_offsets,
        }
    }

    /// The panels of rows `[row, row + rows)` and depth `[pc, pc + kc)`: the prepared
    /// ones, or `buffer` packed now.
    ///
    /// # Safety
    /// The block must be inside the matrix, `buffer` must hold
    /// `ceil(rows / width) * width * kc` values, and `row` must be a multiple of `width`.
    unsafe fn block(
        self,
        [row, rows]: [usize; 2],
        [pc, kc]: [usize; 2],
        width: usize,
        buffer: *mut f32,
    ) -> *const f32 {
        match self.panels {
            // SAFETY: the panels hold the matrix from panel row `first` on (sgemm's
            // contract), so the block is inside them.
            Some((panels, first)) => unsafe { panels.block(pc, first + row, kc) },
            None => {
                assert!(
                    !self.strided.ptr.is_null(),
                    "an operand given as panels only lands on a side of their width"
                );
                // SAFETY: forwarded to the caller (with k offsets, the block's rows start
                // at `row` and its k indices are the offsets from pc on).
                unsafe {
                    match self.k_offsets {
                        Some(offsets) => pack(
                            offset(self.strided, row, 0),
                            [rows, kc],
                            Some(&offsets[pc..pc + kc]),
                            width,
                            buffer,
                        ),
                        None => pack(
                            offset(self.strided, row, pc),
                            [rows, kc],
                            None,
                            width,
                            buffer,
                        ),
                    }
                };
                buffer
            }
        }
    }
}

/// A matrix `rows x k` laid out ahead in the panels [`sgemm`] reads: per block of [`KC`]
/// of `k`, panels of `width` rows (zero-padded), each `kc x width` values `k`-major.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Panels {
    values: Vec<Line>,
    rows: usize,
    k: usize,
    /// Rows rounded up to whole panels.
    padded: usize,
    width: usize,
}

impl Panels {
    /// `x` (`rows x k`) in panels of `width` rows, in `values`' allocation (an earlier
    /// panels' buffer, or none): every value is written, so stale contents do not matter.
    ///
    /// # Safety
    /// `x` must address `rows x k` valid values.
    unsafe fn new_into(
        mut values: Vec<Line>,
        x: Strided<*const f32>,
        [rows, k]: [usize; 2],
        width: usize,
    ) -> Self {
        let padded = rows.div_ceil(width) * width;
        values.resize((padded * k).div_ceil(16), Line::default());
        let base: *mut f32 = values.as_mut_ptr().cast();
        for pc in (0..k).step_by(KC) {
            let kc = (k - pc).min(KC);
            // SAFETY: block pc of x is inside it; its panels start at pc * padded and
            // take padded * kc <= padded * k - pc * padded values.
            unsafe {
                pack(
                    offset(x, 0, pc),
                    [rows, kc],
                    None,
                    width,
                    base.add(pc * padded),
                )
            };
        }
        Self {
            values,
            rows,
            k,
            padded,
            width,
        }
    }

    /// `x` (`rows x k`) in the panels `sgemm` reads as its `lhs` (`as_rhs` false) or, as
    /// `x = rhs^T`, as its `rhs`, on this CPU (`None` where it has no micro-kernel).
    ///
    /// # Safety
    /// As [`Panels::new_into`].
    pub(crate) unsafe fn for_side(
        x: Strided<*const f32>,
        dims: [usize; 2],
        as_rhs: bool,
    ) -> Option<Self> {
        // SAFETY: forwarded to the caller.
        unsafe { Self::for_side_into(None, x, dims, as_rhs) }
    }

    /// As [`Panels::for_side`], in the allocation of `reuse` where given.
    ///
    /// # Safety
    /// As [`Panels::new_into`].
    pub(crate) unsafe fn for_side_into(
        reuse: Option<Self>,
        x: Strided<*const f32>,
        dims: [usize; 2],
        as_rhs: bool,
    ) -> Option<Self> {
        let micro = micro()?;
        let width = if as_rhs { micro.nr } else { micro.mr };
        let values = reuse.map_or_else(Vec::new, |old| old.values);
        // SAFETY: forwarded to the caller.
        Some(unsafe { Self::new_into(values, x, dims, width) })
    }

    /// The panels of block `pc` (a multiple of KC, of depth `kc`) from row `row` (a
    /// multiple of the width).
    ///
    /// # Safety
    /// The block must be inside the packed matrix.
    unsafe fn block(&self, pc: usize, row: usize, kc: usize) -> *const f32 {
        // SAFETY: forwarded to the caller.
        unsafe {
            self.values
                .as_ptr()
                .cast::<f32>()
                .add(pc * self.padded + row * kc)
        }
    }

    /// Bytes of the values.
    pub(crate) fn bytes(&self) -> usize {
        std::mem::size_of_val(self.values.as_slice())
    }

    /// Whether these panels serve as the `lhs` of an `m x k` product on this CPU.
    pub(crate) fn fits_lhs(&self, [m, k]: [usize; 2]) -> bool {
        micro().is_some_and(|micro| micro.mr == self.width) && m <= self.rows && k == self.k
    }
}

/// The block of `s` from row `i`, column `j`.
///
/// # Safety
/// `(i, j)` must be inside the matrix `s` addresses.
unsafe fn offset<P: Copy + PtrAdd>(s: Strided<P>, i: usize, j: usize) -> Strided<P> {
    Strided {
        ptr: s.ptr.add_values(i * s.rs + j * s.cs),
        rs: s.rs,
        cs: s.cs,
    }
}

/// Pointer arithmetic for both pointer kinds of [`Strided`].
trait PtrAdd {
    /// # Safety
    /// As `pointer::add`.
    unsafe fn add_values(self, count: usize) -> Self;
}

impl PtrAdd for *const f32 {
    unsafe fn add_values(self, count: usize) -> Self {
        // SAFETY: forwarded to the caller.
        unsafe { self.add(count) }
    }
}

impl PtrAdd for *mut f32 {
    unsafe fn add_values(self, count: usize) -> Self {
        // SAFETY: forwarded to the caller.
        unsafe { self.add(count) }
    }
}

/// One thread's packing buffers.
#[derive(Default)]
struct Buffers {
    lhs: Vec<Line>,
    rhs: Vec<Line>,
}

thread_local! {
    static BUFFERS: Cell<Option<Box<Buffers>>> = const { Cell::new(None) };
}

/// The first `len` values of `buf`, grown as needed, as a pointer to 64-byte aligned
/// storage.
fn lines(buf: &mut Vec<Line>, len: usize) -> *mut f32 {
    grow(buf, len.div_ceil(16)).as_mut_ptr().cast()
}

/// The product on the calling thread; `finish` (with the origin of this `dst` in the
/// whole product's) gets each block of `MC` rows by `NC` columns once it is final.
///
/// # Safety
/// As [`sgemm`], with `dst.cs == 1`, `lhs` of `m` rows and `rhs` (transposed) of `n`.
#[allow(clippy::too_many_arguments)]
unsafe fn serial(
    micro: Micro,
    [m, n, k]: [usize; 3],
    dst: Strided<*mut f32>,
    accumulate: bool,
    lhs: Side<'_>,
    rhs: Side<'_>,
    finish: Option<(Done<'_>, [usize; 2])>,
) {
    let Micro {
        kernel,
        direct,
        mr,
        nr,
        ..
    } = micro;
    // An rhs of unit column stride, on a product of few rows: read in place.
    let direct = direct.filter(|_| {
        m <= DIRECT_ROWS
            && rhs.panels.is_none()
            && rhs.strided.rs == 1
            && !rhs.strided.ptr.is_null()
    });
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row i < m of dst, n unit-stride values.
                unsafe { std::ptr::write_bytes(dst.ptr.add(i * dst.rs), 0, n) };
            }
        }
        if let Some((done, [i0, j0])) = finish {
            done.call([i0, m], [j0, n]);
        }
        return;
    }
    // Taken out of the thread's slot for this call: a nested call on this thread (none
    // today; rayon could steal work into one) would find it empty and allocate.
    let mut buffers = BUFFERS.with(Cell::take).unwrap_or_default();
    let kc_max = k.min(KC);
    let lhs_buffer = lines(&mut buffers.lhs, MC.min(m.div_ceil(mr) * mr) * kc_max);
    let rhs_buffer = lines(&mut buffers.rhs, NC.min(n.div_ceil(nr) * nr) * kc_max);
    for jc in (0..n).step_by(NC) {
        let nc = (n - jc).min(NC);
        for pc in (0..k).step_by(KC) {
            let kc = (k - pc).min(KC);
            let add = accumulate || pc > 0;
            // The strips of the last block of k are final once computed.
            let strips = finish.filter(|_| pc + kc == k);
            // SAFETY: columns [jc, jc + nc) and depth [pc, pc + kc) are inside rhs; the
            // buffer holds ceil(nc / nr) * nr * kc values; jc is a multiple of NC, so of nr.
            let packed_rhs = if direct.is_some() {
                std::ptr::null()
            } else {
                unsafe { rhs.block([jc, nc], [pc, kc], nr, rhs_buffer) }
            };
            for ic in (0..m).step_by(MC) {
                let mc = (m - ic).min(MC);
                // SAFETY: as for rhs, with rows [ic, ic + mc) and mr.
                let packed_lhs = unsafe { lhs.block([ic, mc], [pc, kc], mr, lhs_buffer) };
                for jr in (0..nc).step_by(nr) {
                    let cols = (nc - jr).min(nr);
                    for ir in (0..mc).step_by(mr) {
                        let rows = (mc - ir).min(mr);
                        // SAFETY: panel ir / mr of the lhs block: kc * mr values; the tile
                        // (ic + ir, jc + jr) of dst has `rows x cols` values inside it.
                        // In place, rhs row pc + p of columns jc + jr + [0, cols) (unit
                        // column stride) starts at ptr + jc + jr + offsets[pc + p], or
                        // + (pc + p) * cs, inside rhs (sgemm's contract); packed, panel
                        // jr / nr of the block holds kc * nr values.
                        unsafe {
                            let tile = Tile {
                                ptr: dst.ptr.add((ic + ir) * dst.rs + jc + jr),
                                rs: dst.rs,
                                rows,
                                cols,
                            };
                            let a = packed_lhs.add(ir * kc);
                            match direct {
                                Some(direct) => {
                                    let b = rhs.strided.ptr.add(jc + jr);
                                    let rows = match rhs.k_offsets {
                                        Some(offsets) => {
                                            RhsRows::Offsets(b, offsets[pc..pc + kc].as_ptr())
                                        }
                                        None => RhsRows::Strided(
                                            b.add(pc * rhs.strided.cs),
                                            rhs.strided.cs,
                                        ),
                                    };
                                    direct(kc, a, rows, tile, add)
                                }
                                None => kernel(kc, a, packed_rhs.add(jr * kc), tile, add),
                            }
                        }
                    }
                }
                if let Some((done, [i0, j0])) = strips {
                    done.call([i0 + ic, mc], [j0 + jc, nc]);
                }
            }
        }
    }
    BUFFERS.with(|slot| slot.set(Some(buffers)));
}

/// Copies `x[rows x kc]` into panels of `width` rows: `out[(panel * kc + p) * width + i]
/// = x[panel * width + i, p]`, rows past the end zero. (For `lhs`, `x` is `lhs`; for
/// `rhs`, its transpose: the same layout then puts `width` columns of a row side by side.)
/// Element `(i, p)` is at `i * rs + p * cs`, or `i * rs + k_offsets[p]` where given.
///
/// # Safety
/// `x` must address `rows x kc` valid values (through `k_offsets` where given); `out`
/// must hold `ceil(rows / width) * width * kc` values.
unsafe fn pack(
    x: Strided<*const f32>,
    [rows, kc]: [usize; 2],
    k_offsets: Option<&[usize]>,
    width: usize,
    out: *mut f32,
) {
    // Index p of k: at k_offsets[p], else p columns along.
    let at = |p: usize| k_offsets.map_or(p * x.cs, |offsets| offsets[p]);
    for panel in 0..rows.div_ceil(width) {
        let first = panel * width;
        let valid = (rows - first).min(width);
        // SAFETY: panel < ceil(rows / width), so its kc * width values are in `out`.
        let base = unsafe { out.add(panel * kc * width) };
        if x.rs == 1 {
            // The panel's rows are side by side in memory: one run per p.
            for p in 0..kc {
                // SAFETY: (first + i, p) for i < valid is inside x; the run p * width..
                // of the panel holds width >= valid values.
                unsafe { copy_run(x.ptr.add(first + at(p)), base.add(p * width), valid, width) };
            }
        } else {
            // Rows with unit-stride `k` (a transposed product's operand): 8 x 8 blocks
            // through AVX transposes, the ragged rest one value at a time.
            #[cfg(target_arch = "x86_64")]
            let done = if x.cs == 1
                && k_offsets.is_none()
                && valid == width
                && width.is_multiple_of(8)
                && micro().is_some()
            {
                // SAFETY: every micro-kernel CPU has AVX (micro() found one); the panel
                // is whole (valid == width), so rows first..first + width and
                // p < kc are inside x, and the panel holds kc * width values.
                unsafe { avx2::transpose_rows(x.ptr.add(first * x.rs), x.rs, [width, kc], base) }
            } else {
                0
            };
            #[cfg(not(target_arch = "x86_64"))]
            let done = 0;
            for i in 0..width {
                let row = first + i;
                for p in done..kc {
                    // SAFETY: p * width + i < kc * width inside the panel; (row, p) is
                    // inside x when i < valid.
                    unsafe {
                        *base.add(p * width + i) = if i < valid {
                            *x.ptr.add(row * x.rs + at(p))
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// `dst[..valid] = src[..valid]`, `dst[valid..width] = 0`, in 16-value moves where it can
/// (a `memcpy` call per short run cost more than the copy).
///
/// # Safety
/// `src` must be valid for `valid` reads, `dst` for `width >= valid` writes.
#[inline(always)]
unsafe fn copy_run(src: *const f32, dst: *mut f32, valid: usize, width: usize) {
    let mut j = 0;
    while j + 16 <= valid {
        // SAFETY: j + 16 <= valid <= width: in bounds of both.
        unsafe {
            dst.add(j)
                .cast::<[f32; 16]>()
                .write_unaligned(src.add(j).cast::<[f32; 16]>().read_unaligned());
        }
        j += 16;
    }
    while j < valid {
        // SAFETY: j < valid.
        unsafe { *dst.add(j) = *src.add(j) };
        j += 1;
    }
    while j < width {
        // SAFETY: j < width.
        unsafe { *dst.add(j) = 0.0 };
        j += 1;
    }
}

/// GFLOP/s (2 per multiply-add) of this CPU's micro-kernel alone, on one thread: a whole
/// tile over `KC` steps on panels that stay in L1, `reps` calls, no packing and no
/// memory traffic (`None` where sgemm has no micro-kernel here); `reps` at least 1. The
/// ceiling of every product on sgemm, against the FMA peak.
pub fn micro_kernel_gflops(reps: usize) -> Option<f64> {
    let micro = micro()?;
    let reps = reps.max(1);
    let lhs = vec![0.5f32; KC * micro.mr];
    let rhs = vec![0.25f32; KC * micro.nr];
    let mut dst = vec![0.0f32; micro.mr * micro.nr];
    let start = std::time::Instant::now();
    for _ in 0..reps {
        let tile = Tile {
            ptr: dst.as_mut_ptr(),
            rs: micro.nr,
            rows: micro.mr,
            cols: micro.nr,
        };
        // SAFETY: the panels hold KC * MR and KC * NR values, and the tile is dst's MR x NR
        // values, rows NR apart (the Kernel contract).
        unsafe { (micro.kernel)(KC, lhs.as_ptr(), rhs.as_ptr(), tile, true) };
    }
    let seconds = start.elapsed().as_secs_f64();
    std::hint::black_box(&dst);
    Some(2.0 * (KC * micro.mr * micro.nr * reps) as f64 / seconds / 1e9)
}

#[cfg(test)]
mod tests;

/// `dst = lhs * rhs` for row-major `lhs[m x k]`, `rhs[k x n]` and `dst[m x n]`, on the
/// rayon pool's threads (the `gemm` crate where this CPU has no micro-kernel here).
///
/// # Panics
/// If a slice's length is not its matrix's.
pub fn matmul([m, n, k]: [usize; 3], lhs: &[f32], rhs: &[f32], dst: &mut [f32]) {
    assert_eq!(lhs.len(), m * k, "lhs length");
    assert_eq!(rhs.len(), k * n, "rhs length");
    assert_eq!(dst.len(), m * n, "dst length");
    // SAFETY: the three slices hold their row-major matrices (asserted above) and dst,
    // borrowed mutably, overlaps neither.
    unsafe {
        crate::nested::gemm_panels(
            [m, n, k],
            dst.as_mut_ptr(),
            [1, n],
            false,
            (lhs.as_ptr(), [1, k], None),
            (rhs.as_ptr(), [1, n], None),
            gemm::Parallelism::Rayon(crate::threads()),
            None,
        );
    }
}

/// GFLOP/s of each of this CPU's indirect micro-kernels alone, on one thread: whole tiles
/// over `taps` runs of `kc` steps, rows and panel in L1 (the panel in L2 past 48 KiB),
/// `reps` calls (at least 1). Each result is `(mr, nr, GFLOP/s)`; none where the CPU has
/// no indirect kernel. The ceiling of a channels-last convolution, against the FMA peak.
pub fn indirect_kernel_gflops(taps: usize, kc: usize, reps: usize) -> Vec<(usize, usize, f64)> {
    let (taps, kc, reps) = (taps.max(1), kc.max(1), reps.max(1));
    indirect()
        .iter()
        .map(|k| {
            let x = vec![0.5f32; 16 * kc];
            let b = vec![0.25f32; taps * kc * k.nr];
            let mut dst = vec![0.0f32; k.mr * k.nr];
            let rows: Vec<*const f32> = (0..taps * k.mr)
                .map(|i| x[(i % 16) * kc..].as_ptr())
                .collect();
            let start = std::time::Instant::now();
            for _ in 0..reps {
                let tile = Tile {
                    ptr: dst.as_mut_ptr(),
                    rs: k.nr,
                    rows: k.mr,
                    cols: k.nr,
                };
                let (rows, b) = ((rows.as_ptr(), 0), (b.as_ptr(), b.as_ptr()));
                // SAFETY: taps * mr rows of kc values each, a panel of taps * kc * nr
                // values, and dst's mr x nr tile, rows nr apart (the IndirectKernel
                // contract).
                unsafe { (k.kernel)(kc, taps, rows, b, tile, true, None) };
            }
            let seconds = start.elapsed().as_secs_f64();
            std::hint::black_box(&dst);
            let flops = 2.0 * (taps * kc * k.mr * k.nr * reps) as f64;
            (k.mr, k.nr, flops / seconds / 1e9)
        })
        .collect()
}
