use super::*;

/// Deterministic pseudo-random values in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Whether two value lists hold the same bits.
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// A matrix stored row-major (`rs = cols`) or column-major (`cs = rows`).
struct Matrix {
    values: Vec<f32>,
    rs: usize,
    cs: usize,
}

impl Matrix {
    fn new(rows: usize, cols: usize, column_major: bool, seed: u64) -> Self {
        let (rs, cs) = if column_major { (1, rows) } else { (cols, 1) };
        Self {
            values: values(rows * cols, seed),
            rs,
            cs,
        }
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.values[i * self.rs + j * self.cs]
    }

    fn strided(&self) -> Strided<*const f32> {
        Strided {
            ptr: self.values.as_ptr(),
            rs: self.rs,
            cs: self.cs,
        }
    }

    fn operand(&self) -> Operand<'_> {
        Operand::strided(self.strided())
    }

    /// The matrix transposed, as a strided view of the same values.
    fn transposed(&self) -> Strided<*const f32> {
        Strided {
            ptr: self.values.as_ptr(),
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// The module's definition, one value at a time: the products summed in increasing `k`
/// by fused multiply-adds, per block of `KC`, each block's sum added to `dst` in order.
fn reference(
    lhs: &Matrix,
    rhs: &Matrix,
    dst: &mut Matrix,
    [m, n, k]: [usize; 3],
    accumulate: bool,
) {
    for i in 0..m {
        for j in 0..n {
            let mut value = dst.at(i, j);
            for block in (0..k).step_by(KC) {
                let mut sum = 0.0f32;
                for p in block..(block + KC).min(k) {
                    sum = lhs.at(i, p).mul_add(rhs.at(p, j), sum);
                }
                value = if block == 0 && !accumulate {
                    sum
                } else {
                    value + sum
                };
            }
            if k == 0 && !accumulate {
                value = 0.0;
            }
            dst.values[i * dst.rs + j * dst.cs] = value;
        }
    }
}

fn product(
    micro: Option<Micro>,
    lhs: &Matrix,
    rhs: &Matrix,
    dst: &mut Matrix,
    dims: [usize; 3],
    accumulate: bool,
    threads: usize,
) -> bool {
    let out = Strided {
        ptr: dst.values.as_mut_ptr(),
        rs: dst.rs,
        cs: dst.cs,
    };
    // SAFETY: the matrices were made with these dimensions and strides, and dst is
    // its own allocation.
    unsafe {
        match micro {
            None => sgemm(
                dims,
                out,
                accumulate,
                lhs.operand(),
                rhs.operand(),
                threads,
                None,
            ),
            Some(micro) if out.cs == 1 => {
                let lhs = Side::new(lhs.operand(), micro.mr);
                let rhs = Side::new(rhs.operand().transposed(), micro.nr);
                serial(micro, dims, out, accumulate, lhs, rhs, None);
                true
            }
            Some(_) => unreachable!("direct micro-kernel runs use a row-major dst"),
        }
    }
}

const SHAPES: [[usize; 3]; 10] = [
    [1, 1, 1],
    [8, 32, 16],
    [7, 33, 5],
    [13, 50, 300],
    [64, 49, 576],
    [200, 17, 64],
    [3, 500, 40],
    [33, 97, 513],
    [48, 48, 0],
    [96, 112, 40],
];

#[test]
fn products_match_the_definition_bit_for_bit_in_every_layout() {
    if micro().is_none() {
        return; // no micro-kernel on this CPU: the caller uses the gemm crate
    }
    let mut ran = 0;
    for (s, &[m, n, k]) in SHAPES.iter().enumerate() {
        for layout in 0..8 {
            for accumulate in [false, true] {
                let seed = (s * 16 + layout) as u64;
                let lhs = Matrix::new(m, k, layout & 1 != 0, seed);
                let rhs = Matrix::new(k, n, layout & 2 != 0, seed + 100);
                let mut expected = Matrix::new(m, n, layout & 4 != 0, seed + 200);
                let mut got = Matrix::new(m, n, layout & 4 != 0, seed + 200);
                reference(&lhs, &rhs, &mut expected, [m, n, k], accumulate);
                // A skinny product is declined (the caller uses the gemm crate).
                if !product(None, &lhs, &rhs, &mut got, [m, n, k], accumulate, 1) {
                    continue;
                }
                ran += 1;
                assert!(
                    same_bits(&got.values, &expected.values),
                    "{m}x{n}x{k}, layout {layout}, accumulate {accumulate}"
                );
            }
        }
    }
    assert!(ran >= SHAPES.len() * 8, "most products ran ({ran})");
}

#[test]
fn skinny_products_are_declined() {
    let Some(micro) = micro() else {
        return;
    };
    assert!(!fills_tiles(micro, 4096, 1), "a matrix-vector product");
    assert!(
        fills_tiles(micro, 8 * micro.mr, 8 * micro.nr),
        "whole tiles"
    );
    let lhs = Matrix::new(300, 40, false, 1);
    let rhs = Matrix::new(40, 1, false, 2);
    let mut dst = Matrix::new(300, 1, false, 3);
    let before = dst.values.clone();
    assert!(!product(None, &lhs, &rhs, &mut dst, [300, 1, 40], false, 1));
    assert_eq!(dst.values, before, "nothing written");
}

#[test]
fn the_bits_do_not_depend_on_threads_or_micro_kernel() {
    if micro().is_none() {
        return;
    }
    // (49 columns: the AVX2 kernel's last tile is one column, on its one-vector path.)
    for &[m, n, k] in &[
        [96, 700, 300],
        [300, 40, 270],
        [64, 1100, 64],
        [40, 49, 100],
    ] {
        let lhs = Matrix::new(m, k, false, 1);
        let rhs = Matrix::new(k, n, false, 2);
        let mut one = Matrix::new(m, n, false, 3);
        assert!(product(None, &lhs, &rhs, &mut one, [m, n, k], false, 1));
        for threads in [2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a thread pool");
            let mut many = Matrix::new(m, n, false, 3);
            pool.install(|| {
                assert!(product(
                    None,
                    &lhs,
                    &rhs,
                    &mut many,
                    [m, n, k],
                    false,
                    threads
                ))
            });
            assert!(
                same_bits(&one.values, &many.values),
                "{m}x{n}x{k} on {threads} threads"
            );
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let mut narrow = Matrix::new(m, n, false, 3);
            product(
                Some(avx2::MICRO),
                &lhs,
                &rhs,
                &mut narrow,
                [m, n, k],
                false,
                1,
            );
            assert!(
                same_bits(&one.values, &narrow.values),
                "{m}x{n}x{k}: the AVX2 kernel"
            );
        }
    }
}

#[test]
fn a_dst_without_unit_stride_is_declined() {
    let lhs = Matrix::new(2, 2, false, 1);
    let rhs = Matrix::new(2, 2, false, 2);
    let mut dst = vec![7.0f32; 9];
    let out = Strided {
        ptr: dst.as_mut_ptr(),
        rs: 3,
        cs: 2,
    };
    // SAFETY: (i, j) of a 2 x 2 dst at 3i + 2j < 9.
    let done = unsafe { sgemm([2, 2, 2], out, false, lhs.operand(), rhs.operand(), 1, None) };
    assert!(!done);
    assert!(dst.iter().all(|&v| v == 7.0), "nothing written");
}

#[test]
fn operands_laid_out_ahead_give_the_same_bits() {
    if micro().is_none() {
        return;
    }
    for &[m, n, k] in &[[40, 70, 300], [40, 60, 20], [96, 33, 64]] {
        for layout in 0..8 {
            let lhs = Matrix::new(m, k, layout & 1 != 0, 5);
            let rhs = Matrix::new(k, n, layout & 2 != 0, 6);
            let mut expected = Matrix::new(m, n, layout & 4 != 0, 7);
            reference(&lhs, &rhs, &mut expected, [m, n, k], true);
            // Both operands in panels for either side they may land on (a column-major
            // dst swaps them); sgemm uses the ones whose width fits.
            for as_rhs in [false, true] {
                // SAFETY: the views address the matrices they were made from.
                let (lhs_panels, rhs_panels) = unsafe {
                    (
                        Panels::for_side(lhs.strided(), [m, k], as_rhs).expect("a micro-kernel"),
                        Panels::for_side(rhs.transposed(), [n, k], !as_rhs)
                            .expect("a micro-kernel"),
                    )
                };
                let mut got = Matrix::new(m, n, layout & 4 != 0, 7);
                let out = Strided {
                    ptr: got.values.as_mut_ptr(),
                    rs: got.rs,
                    cs: got.cs,
                };
                let lhs_operand = Operand {
                    panels: Some((&lhs_panels, 0)),
                    ..lhs.operand()
                };
                let rhs_operand = Operand {
                    panels: Some((&rhs_panels, 0)),
                    ..rhs.operand()
                };
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(2)
                    .build()
                    .expect("a thread pool");
                // SAFETY: as in `product`; the panels hold these operands.
                let done = pool.install(|| unsafe {
                    sgemm([m, n, k], out, true, lhs_operand, rhs_operand, 2, None)
                });
                assert!(done);
                assert!(
                    same_bits(&got.values, &expected.values),
                    "{m}x{n}x{k}, layout {layout}, panels for the {} side",
                    if as_rhs { "rhs" } else { "lhs" }
                );
            }
        }
    }
}

#[test]
fn an_operand_gathered_through_k_offsets_gives_the_same_bits() {
    if micro().is_none() {
        return;
    }
    // rhs row p of a product is row order[p] of a row-major source (an im2col done while
    // packing), for a skinny product too (gathered operands are never declined).
    for &[m, n, k] in &[[40, 70, 300], [16, 8, 27], [96, 33, 64]] {
        let source = Matrix::new(k + 5, n, false, 11);
        let order: Vec<usize> = (0..k).map(|p| (p * 7 + 3) % (k + 5)).collect();
        let offsets: Vec<usize> = order.iter().map(|&row| row * n).collect();
        let mut rhs = Matrix::new(k, n, false, 0);
        for (p, &row) in order.iter().enumerate() {
            for j in 0..n {
                rhs.values[p * n + j] = source.at(row, j);
            }
        }
        let lhs = Matrix::new(m, k, false, 12);
        let mut expected = Matrix::new(m, n, false, 13);
        reference(&lhs, &rhs, &mut expected, [m, n, k], true);
        let mut got = Matrix::new(m, n, false, 13);
        let out = Strided {
            ptr: got.values.as_mut_ptr(),
            rs: n,
            cs: 1,
        };
        let gathered = Operand {
            strided: Strided {
                ptr: source.values.as_ptr(),
                rs: 0,
                cs: 1,
            },
            panels: None,
            k_offsets: Some(&offsets),
        };
        // SAFETY: lhs and dst are their matrices; rhs row p is source row order[p], inside
        // the source.
        let done = unsafe { sgemm([m, n, k], out, true, lhs.operand(), gathered, 1, None) };
        assert!(done);
        assert!(
            same_bits(&got.values, &expected.values),
            "{m}x{n}x{k} gathered"
        );
    }
}

/// `finish` gets blocks that cover `dst` exactly once, each holding its final values
/// when called, on one and two threads, with row- and column-major `dst`.
#[test]
fn finish_sees_each_final_block_once() {
    if micro().is_none() {
        return;
    }
    for &[m, n, k] in &[[200, 40, 300], [40, 100, 70], [64, 49, 576], [32, 40, 0]] {
        for column_major in [false, true] {
            for threads in [1, 2] {
                let lhs = Matrix::new(m, k, false, 1);
                let rhs = Matrix::new(k, n, false, 2);
                let mut want = Matrix::new(m, n, column_major, 3);
                reference(&lhs, &rhs, &mut want, [m, n, k], false);
                let mut dst = Matrix::new(m, n, column_major, 3);
                let (rs, cs) = (dst.rs, dst.cs);
                let out = Strided {
                    ptr: dst.values.as_mut_ptr(),
                    rs,
                    cs,
                };
                // What each position held when its block was finished, and how often.
                let seen = std::sync::Mutex::new(vec![(f32::NAN, 0u32); m * n]);
                let at = out.ptr as usize;
                let finish = |[i0, rows]: [usize; 2], [j0, cols]: [usize; 2]| {
                    let mut seen = seen.lock().unwrap();
                    for i in i0..i0 + rows {
                        for j in j0..j0 + cols {
                            // SAFETY: the block is final and inside dst (sgemm's promise).
                            let v = unsafe { *(at as *const f32).add(i * rs + j * cs) };
                            let slot = &mut seen[i * n + j];
                            *slot = (v, slot.1 + 1);
                        }
                    }
                };
                // SAFETY: the matrices were made with these dimensions and strides.
                let done = unsafe {
                    sgemm(
                        [m, n, k],
                        out,
                        false,
                        lhs.operand(),
                        rhs.operand(),
                        threads,
                        Some(&finish),
                    )
                };
                assert!(done, "{m}x{n}x{k} ran on sgemm");
                let seen = seen.into_inner().unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let (v, count) = seen[i * n + j];
                        assert_eq!(count, 1, "({i}, {j}) of {m}x{n}x{k} finished once");
                        assert_eq!(v.to_bits(), want.at(i, j).to_bits(), "({i}, {j}) final");
                    }
                }
            }
        }
    }
}

#[test]
fn every_tile_width_gives_the_definition_bits() {
    if micro().is_none() {
        return;
    }
    // Every width of a last tile (whole vectors, ragged extra columns, both), on the
    // kernel reading rhs in place (few rows) and on the packed one, on both CPU kernels.
    let mut kernels = vec![micro()];
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        kernels.push(Some(avx2::MICRO));
    }
    for n in 1..=72 {
        for m in [13, DIRECT_ROWS + 5] {
            let k = 37;
            let lhs = Matrix::new(m, k, false, n as u64);
            let rhs = Matrix::new(k, n, false, n as u64 + 1);
            for accumulate in [false, true] {
                let mut expected = Matrix::new(m, n, false, 7);
                reference(&lhs, &rhs, &mut expected, [m, n, k], accumulate);
                for &micro in &kernels {
                    let mut got = Matrix::new(m, n, false, 7);
                    product(micro, &lhs, &rhs, &mut got, [m, n, k], accumulate, 1);
                    assert!(
                        same_bits(&got.values, &expected.values),
                        "{m}x{n}x{k}, accumulate {accumulate}, nr {:?}",
                        micro.map(|micro| micro.nr)
                    );
                }
            }
        }
    }
}

/// Every indirect kernel of this CPU (the AVX-512 ones and, where the CPU has it, the
/// AVX2 one), on every tile shape up to its own, with and without accumulating into the
/// tile and a full epilogue: the definition's bits (fused multiply-adds tap by tap, step
/// by step, then the epilogue's operations in `Epilogue::apply`'s order).
#[test]
fn every_indirect_kernel_gives_the_definition_bits() {
    let mut kernels: Vec<Indirect> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            kernels.extend(avx512::MICRO.indirect);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            kernels.extend(avx2::MICRO.indirect);
        }
    }
    for Indirect { kernel, mr, nr } in kernels {
        for (taps, kc, offset) in [(1, 5, 0), (3, 16, 2), (2, 37, 1)] {
            // Each tap's rows are rows of `pixels`, not in order, some shared.
            let pixels = values(11 * (offset + kc), taps as u64);
            let rows: Vec<*const f32> = (0..taps * mr)
                .map(|r| pixels[(r * 7 % 11) * (offset + kc)..].as_ptr())
                .collect();
            let row_value = |tap: usize, i: usize, p: usize| {
                pixels[((tap * mr + i) * 7 % 11) * (offset + kc) + offset + p]
            };
            let b = values(taps * kc * nr, kc as u64);
            let rs = nr + 3;
            for rows_used in [1, mr - 1, mr] {
                for cols in [1, 7, 8, 9, 16, nr / 2 + 1, nr] {
                    let (scale, shift) = (values(cols, 5), values(cols, 6));
                    let residual = values(rows_used * rs, 7);
                    for (add, full) in [(false, false), (true, false), (false, true), (true, true)]
                    {
                        let start = values(rows_used * rs, 8);
                        let mut got = start.clone();
                        let finish = full.then_some(TileFinish {
                            scale: scale.as_ptr(),
                            shift: shift.as_ptr(),
                            residual: residual.as_ptr(),
                            relu: true,
                        });
                        let dst = Tile {
                            ptr: got.as_mut_ptr(),
                            rs,
                            rows: rows_used,
                            cols,
                        };
                        // SAFETY: taps * mr row pointers, each valid for offset + kc
                        // values of `pixels`; b holds taps * kc * nr values; the tile's
                        // rows_used x cols values lie in `got`, rows rs apart, and
                        // finish's columns and residual rows in theirs.
                        unsafe {
                            kernel(
                                kc,
                                taps,
                                (rows.as_ptr(), offset),
                                (b.as_ptr(), b.as_ptr()),
                                dst,
                                add,
                                finish,
                            )
                        };
                        let mut want = start.clone();
                        for i in 0..rows_used {
                            for j in 0..cols {
                                let mut sum = 0.0f32;
                                for tap in 0..taps {
                                    for p in 0..kc {
                                        sum = row_value(tap, i, p)
                                            .mul_add(b[(tap * kc + p) * nr + j], sum);
                                    }
                                }
                                let mut value = if add { want[i * rs + j] + sum } else { sum };
                                if full {
                                    value = value * scale[j] + shift[j] + residual[i * rs + j];
                                    if value <= 0.0 {
                                        value = 0.0;
                                    }
                                }
                                want[i * rs + j] = value;
                            }
                        }
                        assert!(
                            same_bits(&got, &want),
                            "{mr} x {nr} kernel: {taps} taps of {kc}, {rows_used} x {cols}, add {add}, epilogue {full}"
                        );
                    }
                }
            }
        }
    }
}
