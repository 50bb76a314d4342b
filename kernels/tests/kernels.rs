//! The kernels against a direct evaluation of the plan's definition (nested loops over
//! windows, crops, channels and kernel positions), forward and backward, in every layout
//! and at several thread counts; plans that would break the kernels' memory invariants
//! are refused; the backward pass is bit-identical for a given thread count.
//!
//! These tests need no burn, so they also run under the sanitizers (see
//! `docs/sanitizers.md`).

use versatile_kernels::pool::{max_pool2d, Pool2d};
use versatile_kernels::trace::{self, Layout};
use versatile_kernels::tuning::{self, Strategy, Tuning};
use versatile_kernels::{
    backward, forward, forward_packed, forward_with_moments, ConvPlan, Epilogue, Gradients, Needs,
    PackedWeight, PlanError, PlanSpec, Window,
};

/// xorshift64*: deterministic test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
    fn values(&mut self, len: usize) -> Vec<f64> {
        (0..len)
            .map(|_| (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
            .collect()
    }
}

/// Rings of a square `d x d` kernel: ring `r` at distance `r` from the border.
fn square_rings(d: usize) -> Vec<Vec<(usize, usize)>> {
    let mut rings = vec![Vec::new(); d.div_ceil(2)];
    for ky in 0..d {
        for kx in 0..d {
            rings[ky.min(kx).min(d - 1 - ky).min(d - 1 - kx)].push((ky, kx));
        }
    }
    rings
}

/// A random valid spec: a dense (possibly grouped, non-square) convolution, or a
/// versatile layer with shared or sliding channel windows and cut blocks.
fn random_spec(rng: &mut Rng) -> PlanSpec {
    let batch = rng.range(1, 4);
    let stride = [rng.range(1, 2), rng.range(1, 2)];
    let dilation = [rng.range(1, 2), rng.range(1, 2)];
    let padding = [
        (rng.range(0, 2), rng.range(0, 2)),
        (rng.range(0, 2), rng.range(0, 2)),
    ];
    let (kernel, rings, c, n, m, n_c, window_depth, weight_depth, windows);
    if rng.range(0, 3) == 0 {
        // Dense, grouped.
        let groups = rng.range(1, 3);
        kernel = [rng.range(1, 4), rng.range(1, 4)];
        rings = vec![(0..kernel[0])
            .flat_map(|ky| (0..kernel[1]).map(move |kx| (ky, kx)))
            .collect()];
        c = groups * rng.range(1, 4);
        n = groups * rng.range(1, 5);
        m = n;
        n_c = 1;
        window_depth = c / groups;
        weight_depth = window_depth;
        windows = (0..groups)
            .map(|q| Window {
                j: 0,
                in_offset: q * window_depth,
                weight_offset: 0,
                first_primary: q * (n / groups),
                rows: n / groups,
            })
            .collect();
    } else {
        let d = rng.range(1, 5);
        kernel = [d, d];
        rings = square_rings(d);
        c = rng.range(1, 9);
        let delta = rng.range(0, c - 1);
        let g = if delta > 0 { rng.range(1, delta) } else { 1 };
        n_c = delta / g + 1;
        let sliding = rng.range(0, 1) == 1;
        window_depth = c - delta;
        weight_depth = if sliding { c } else { window_depth };
        n = rng.range(1, 24);
        m = n.div_ceil(rings.len() * n_c);
        windows = (0..n_c)
            .map(|j| Window {
                j,
                in_offset: j * g,
                weight_offset: if sliding { j * g } else { 0 },
                first_primary: 0,
                rows: m,
            })
            .collect();
    }
    let extent = |i: usize| dilation[i] * (kernel[i] - 1) + 1;
    let h = rng
        .range(extent(0), 12)
        .saturating_sub(padding[0].0 + padding[0].1)
        .max(1);
    let w = rng
        .range(extent(1), 12)
        .saturating_sub(padding[1].0 + padding[1].1)
        .max(1);
    PlanSpec {
        input: [batch, c, h, w],
        kernel,
        stride,
        dilation,
        padding,
        out_channels: n,
        primaries: m,
        n_c,
        window_depth,
        weight_depth,
        rings,
        windows,
    }
}

/// Output size along one axis.
fn out_size(spec: &PlanSpec, i: usize) -> usize {
    let padded = spec.input[2 + i] + spec.padding[i].0 + spec.padding[i].1;
    (padded - spec.dilation[i] * (spec.kernel[i] - 1) - 1) / spec.stride[i] + 1
}

/// Calls `f(out index, x index, w index)` for every multiply-add of the definition.
fn for_each_mac(spec: &PlanSpec, mut f: impl FnMut(usize, usize, usize)) {
    let [batch, c, h, w] = spec.input;
    let [kh, kw] = spec.kernel;
    let (oh, ow) = (out_size(spec, 0), out_size(spec, 1));
    let m = spec.primaries;
    for (r_min, _) in spec.rings.iter().enumerate() {
        for win in &spec.windows {
            for p in 0..win.rows {
                let ch = (r_min * spec.n_c + win.j) * m + win.first_primary + p;
                if ch >= spec.out_channels {
                    continue;
                }
                for ring in &spec.rings[r_min..] {
                    for &(ky, kx) in ring {
                        for k in 0..spec.window_depth {
                            for b in 0..batch {
                                for oy in 0..oh {
                                    let iy = (oy * spec.stride[0] + ky * spec.dilation[0]) as isize
                                        - spec.padding[0].0 as isize;
                                    if iy < 0 || iy >= h as isize {
                                        continue;
                                    }
                                    for ox in 0..ow {
                                        let ix = (ox * spec.stride[1] + kx * spec.dilation[1])
                                            as isize
                                            - spec.padding[1].0 as isize;
                                        if ix < 0 || ix >= w as isize {
                                            continue;
                                        }
                                        let out =
                                            ((b * spec.out_channels + ch) * oh + oy) * ow + ox;
                                        let xi = ((b * c + win.in_offset + k) * h + iy as usize)
                                            * w
                                            + ix as usize;
                                        let wi = (((win.first_primary + p) * spec.weight_depth
                                            + win.weight_offset
                                            + k)
                                            * kh
                                            + ky)
                                            * kw
                                            + kx;
                                        f(out, xi, wi);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn max_error(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

/// Checks forward and backward of `spec` against the definition under `tuning`.
fn check_against_definition(spec: &PlanSpec, tuning: Tuning, rng: &mut Rng) -> Vec<Layout> {
    let plan = ConvPlan::new(spec.clone()).unwrap().with_tuning(tuning);
    let x = rng.values(plan.input_len());
    let w = rng.values(plan.weight_len());
    let bias = rng.values(spec.out_channels);
    let grad = rng.values(plan.output_len());
    let mut want = vec![0.0; plan.output_len()];
    let pixels = plan.output_len() / spec.input[0] / spec.out_channels;
    for (i, v) in want.iter_mut().enumerate() {
        *v = bias[i / pixels % spec.out_channels];
    }
    let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
    for_each_mac(spec, |o, xi, wi| {
        want[o] += w[wi] * x[xi];
        dx[xi] += w[wi] * grad[o];
        dw[wi] += x[xi] * grad[o];
    });
    let mut db = vec![0.0; spec.out_channels];
    for (i, g) in grad.iter().enumerate() {
        db[i / pixels % spec.out_channels] += g;
    }
    let ((out, grads), calls) = trace::record(|| {
        let out = forward(&plan, &x, &w, Some(&bias));
        let needs = Needs {
            x: true,
            weight: true,
            bias: true,
        };
        (out, backward(&plan, &x, &w, &grad, needs))
    });
    let Gradients {
        x: Some(gx),
        weight: Some(gw),
        bias: Some(gb),
    } = grads
    else {
        panic!("every gradient was asked for");
    };
    // The same pass with a packed weight and a full epilogue (scale, shift, residual,
    // ReLU), in the same layout.
    let scale = rng.values(spec.out_channels);
    let residual = rng.values(plan.output_len());
    let packed = PackedWeight::new(&plan, &w);
    let mut fused = vec![0.0; plan.output_len()];
    let epilogue = Epilogue {
        scale: Some(&scale),
        shift: Some(&bias),
        residual: Some(&residual),
        relu: true,
        pool: false,
    };
    forward_packed(&plan, &x, &packed, &epilogue, &mut fused);
    let want_fused: Vec<f64> = want
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = i / pixels % spec.out_channels;
            ((v - bias[c]) * scale[c] + bias[c] + residual[i]).max(0.0)
        })
        .collect();
    for (what, got, want) in [
        ("out", &out, &want),
        ("packed, epilogue", &fused, &want_fused),
        ("grad_x", &gx, &dx),
        ("grad_weight", &gw, &dw),
        ("grad_bias", &gb, &db),
    ] {
        let err = max_error(got, want);
        assert!(err < 1e-10, "{what}: {err:.2e} for {spec:?} ({tuning:?})");
    }
    calls.iter().map(|c| c.layout).collect()
}

#[test]
fn every_layout_matches_the_definition() {
    let mut rng = Rng(0x6b65_726e);
    let mut seen = std::collections::HashSet::new();
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for _ in 0..120 {
            let spec = random_spec(&mut rng);
            let strategy = [
                Strategy::Auto,
                Strategy::Im2col,
                Strategy::Shifted,
                Strategy::Stream,
            ][rng.range(0, 3)];
            let tuning = Tuning {
                strategy,
                tile_columns: [None, Some(5), Some(17)][rng.range(0, 2)],
                min_task_columns: 4,
                band_bytes: [0, tuning::BAND_BYTES][rng.range(0, 1)],
            };
            let layouts = pool.install(|| check_against_definition(&spec, tuning, &mut rng));
            seen.extend(layouts);
        }
    }
    // im2col, shifted, streaming and the whole map (random specs draw small maps).
    assert_eq!(seen.len(), 4, "layouts exercised: {seen:?}");
}

#[test]
fn expanding_layers_over_many_columns_match_the_definition() {
    // Few input channels, many output rows and more columns than one tile of their
    // accumulator holds at the default tuning (and than the weight's size): the forward
    // cuts its tiles for the accumulator's sake (1 x 1 in place, 3 x 3 shifted and
    // im2col).
    let mut rng = Rng(0x6578_7061);
    for (d, strategy) in [
        (1, Strategy::Auto),
        (3, Strategy::Shifted),
        (3, Strategy::Im2col),
    ] {
        let side = 56;
        let spec = PlanSpec {
            padding: [(d / 2, d / 2), (d / 2, d / 2)],
            ..dense_spec([1, 4, side, side], 300, d)
        };
        let tuning = Tuning {
            strategy,
            ..Tuning::DEFAULT
        };
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| check_against_definition(&spec, tuning, &mut rng));
        }
    }
}

#[test]
fn the_backward_pass_is_bit_identical_for_a_given_thread_count() {
    let specs = layout_specs();
    let mut rng = Rng(99);
    for (spec, strategy) in specs {
        for threads in thread_counts() {
            let (pool, plan) = small_tiles(&spec, strategy, threads);
            let x: Vec<f32> = rng
                .values(plan.input_len())
                .into_iter()
                .map(|v| v as f32)
                .collect();
            let w: Vec<f32> = rng
                .values(plan.weight_len())
                .into_iter()
                .map(|v| v as f32)
                .collect();
            let g: Vec<f32> = rng
                .values(plan.output_len())
                .into_iter()
                .map(|v| v as f32)
                .collect();
            let needs = Needs {
                x: true,
                weight: true,
                bias: true,
            };
            let run = || pool.install(|| trace::record(|| backward(&plan, &x, &w, &g, needs)));
            let (first, calls) = run();
            if threads > 1 {
                assert!(calls[0].tasks > 1, "{strategy:?} at {threads}: {calls:?}");
            }
            for _ in 0..4 {
                assert!(
                    run().0 == first,
                    "{strategy:?} at {threads} threads: bits differ"
                );
            }
        }
    }
}

/// `spec`'s plan with `strategy`, tiles of 11 columns (cutting planes and rows anywhere)
/// and tasks from 4 columns on, and a pool of `threads` threads to run it in.
fn small_tiles(
    spec: &PlanSpec,
    strategy: Strategy,
    threads: usize,
) -> (rayon::ThreadPool, ConvPlan) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let tuning = Tuning {
        strategy,
        tile_columns: Some(11),
        min_task_columns: 4,
        band_bytes: 0,
    };
    (
        pool,
        ConvPlan::new(spec.clone()).unwrap().with_tuning(tuning),
    )
}

/// One plan per layout, with their strategies: im2col with several windows (partial sums
/// start from zero), shifted views, and weight streaming with up to 16 chunk groups.
fn layout_specs() -> [(PlanSpec, Strategy); 3] {
    [
        (
            PlanSpec {
                input: [16, 6, 7, 6],
                kernel: [3, 3],
                stride: [1, 1],
                dilation: [1, 1],
                padding: [(1, 1), (1, 1)],
                out_channels: 20,
                primaries: 5,
                n_c: 2,
                window_depth: 4,
                weight_depth: 6,
                rings: square_rings(3),
                windows: (0..2)
                    .map(|j| Window {
                        j,
                        in_offset: 2 * j,
                        weight_offset: 2 * j,
                        first_primary: 0,
                        rows: 5,
                    })
                    .collect(),
            },
            Strategy::Im2col,
        ),
        (dense_spec([16, 16, 9, 8], 12, 3), Strategy::Shifted),
        (dense_spec([2, 8, 3, 3], 1024, 3), Strategy::Stream),
    ]
}

#[test]
fn a_forward_with_moments_gives_the_forward_and_its_batch_statistics() {
    // The moments are taken tile by tile (im2col, shifted) or from the finished output
    // (streaming).
    let mut rng = Rng(0x6d6f_6d73);
    for (spec, strategy) in layout_specs() {
        for threads in thread_counts() {
            let (pool, plan) = small_tiles(&spec, strategy, threads);
            let mut values = |len: usize| -> Vec<f32> {
                // An offset against the spread, as a layer's output before its batch norm.
                rng.values(len)
                    .into_iter()
                    .map(|v| v as f32 + 0.75)
                    .collect()
            };
            let (x, w, b) = (
                values(plan.input_len()),
                values(plan.weight_len()),
                values(plan.out_channels()),
            );
            let run =
                || pool.install(|| trace::record(|| forward_with_moments(&plan, &x, &w, Some(&b))));
            let ((out, moments), calls) = run();
            let layout = match strategy {
                Strategy::Im2col => Layout::Im2col,
                Strategy::Shifted => Layout::Shifted,
                _ => Layout::Streaming,
            };
            assert_eq!(calls[0].layout, layout, "{strategy:?}");
            let plain = pool.install(|| forward(&plan, &x, &w, Some(&b)));
            assert!(
                out == plain,
                "{strategy:?} at {threads}: the output differs"
            );
            let [batch, channels, h, w] = plan.output_shape();
            assert_eq!(moments.len(), channels);
            for (ch, got) in moments.iter().enumerate() {
                let values: Vec<f64> = (0..batch)
                    .flat_map(|b| &out[(b * channels + ch) * h * w..][..h * w])
                    .map(|&v| f64::from(v))
                    .collect();
                let n = values.len() as f64;
                let mean = values.iter().sum::<f64>() / n;
                let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
                let context = format!("{strategy:?} at {threads}, channel {ch}");
                assert_eq!(got.count, n, "{context}");
                assert!(
                    (got.mean - mean).abs() <= 1e-6 * (1.0 + mean.abs()),
                    "{context}"
                );
                assert!(
                    (got.variance() - variance).abs() <= 1e-5 * variance,
                    "{context}: variance {} against {variance}",
                    got.variance()
                );
            }
            for _ in 0..3 {
                assert!(
                    run().0 .1 == moments,
                    "{strategy:?} at {threads} threads: moments differ"
                );
            }
        }
    }
}

/// The thread counts of the determinism test: 1, 2, 3, 8 and 16, or the list in
/// `KERNEL_TEST_THREADS` (`kernels/scripts/sanitizers.sh` stops at 3 under
/// ThreadSanitizer, whose slowdown makes 16 threads on 2 cores take too long).
fn thread_counts() -> Vec<usize> {
    match std::env::var("KERNEL_TEST_THREADS") {
        Ok(list) => list
            .split(',')
            .map(|t| {
                t.trim()
                    .parse()
                    .expect("KERNEL_TEST_THREADS: comma-separated counts")
            })
            .collect(),
        Err(_) => vec![1, 2, 3, 8, 16],
    }
}

/// The spec of a dense `d x d` convolution without padding.
fn dense_spec(input: [usize; 4], n: usize, d: usize) -> PlanSpec {
    PlanSpec {
        input,
        kernel: [d, d],
        stride: [1, 1],
        dilation: [1, 1],
        padding: [(0, 0), (0, 0)],
        out_channels: n,
        primaries: n,
        n_c: 1,
        window_depth: input[1],
        weight_depth: input[1],
        rings: vec![(0..d)
            .flat_map(|ky| (0..d).map(move |kx| (ky, kx)))
            .collect()],
        windows: vec![Window::whole(n)],
    }
}

#[test]
fn plans_that_would_break_memory_invariants_are_refused() {
    let valid = dense_spec([1, 4, 5, 5], 6, 3);
    assert!(ConvPlan::new(valid.clone()).is_ok());
    let refused = |change: &dyn Fn(&mut PlanSpec)| {
        let mut spec = valid.clone();
        change(&mut spec);
        ConvPlan::new(spec).unwrap_err()
    };
    // A window deeper than the input, or past the weight's channels or primaries.
    assert!(matches!(
        refused(&|s| s.windows[0].in_offset = 1),
        PlanError::Window { .. }
    ));
    assert!(matches!(
        refused(&|s| s.window_depth = 5),
        PlanError::Window { .. }
    ));
    assert!(matches!(
        refused(&|s| s.windows[0].rows = 7),
        PlanError::Window { .. }
    ));
    assert!(matches!(
        refused(&|s| s.windows[0].j = 1),
        PlanError::Window { .. }
    ));
    // Windows that leave output channels unwritten, or write one twice.
    assert!(matches!(
        refused(&|s| s.windows[0].rows = 5),
        PlanError::Channels { channel: 5, .. }
    ));
    assert!(matches!(
        refused(&|s| s.windows.push(s.windows[0])),
        PlanError::Channels { channel: 0, .. }
    ));
    assert!(matches!(
        refused(&|s| s.windows.clear()),
        PlanError::Channels { channel: 0, .. }
    ));
    // Rings that miss a position, repeat one, or leave the kernel.
    assert!(matches!(
        refused(&|s| {
            s.rings[0].pop();
        }),
        PlanError::Rings { .. }
    ));
    assert!(matches!(
        refused(&|s| s.rings[0][1] = (0, 0)),
        PlanError::Rings { .. }
    ));
    assert!(matches!(
        refused(&|s| s.rings[0][1] = (0, 3)),
        PlanError::Rings { .. }
    ));
    assert!(matches!(
        refused(&|s| s.rings.push(Vec::new())),
        PlanError::Rings { .. }
    ));
    // Zero sizes, inputs smaller than the kernel, sizes past the address space.
    assert!(matches!(
        refused(&|s| s.stride = [0, 1]),
        PlanError::Zero { .. }
    ));
    assert!(matches!(
        refused(&|s| s.input[2] = 2),
        PlanError::InputTooSmall { .. }
    ));
    assert!(matches!(
        refused(&|s| s.input = [1 << 40, 4, 1 << 20, 5]),
        PlanError::TooLarge { .. }
    ));
    assert!(matches!(
        refused(&|s| s.kernel = [1 << 33, 1 << 33]),
        PlanError::TooLarge { .. } | PlanError::InputTooSmall { .. }
    ));
    // Channels far beyond what the windows can produce: refused without allocating.
    assert!(matches!(
        refused(&|s| s.out_channels = usize::MAX / 2),
        PlanError::TooLarge { .. } | PlanError::Channels { .. }
    ));
}

#[test]
#[should_panic(expected = "input length")]
fn a_slice_that_does_not_fit_the_plan_panics_before_any_access() {
    let plan = ConvPlan::new(dense_spec([1, 4, 5, 5], 6, 3)).unwrap();
    forward::<f32>(&plan, &[0.0; 10], &[0.0; 6 * 4 * 9], None);
}

#[test]
fn a_tuning_scope_is_per_thread_and_taken_by_the_plan() {
    let forced = Tuning {
        strategy: Strategy::Im2col,
        tile_columns: Some(3),
        min_task_columns: 1,
        band_bytes: tuning::BAND_BYTES,
    };
    let spec = dense_spec([1, 16, 9, 9], 4, 3);
    let plan = {
        let _scope = tuning::scoped(forced);
        // Another thread does not see this thread's scope.
        let other = std::thread::spawn(tuning::current).join().unwrap();
        assert_eq!(other, Tuning::default());
        ConvPlan::new(spec.clone()).unwrap()
    };
    assert_eq!(plan.tuning(), forced);
    assert_eq!(tuning::current(), Tuning::default());
    assert_eq!(ConvPlan::new(spec).unwrap().tuning(), Tuning::default());
}

/// An `f32` packed weight gives the forward pass of the plain one (within `f32`
/// rounding: a narrow tile may run on another product kernel), and where sgemm runs every
/// product it is kept as sgemm's panels only, not also in ring layout.
#[test]
fn a_packed_f32_weight_is_kept_once_and_gives_the_plain_forward() {
    let mut rng = Rng(0x7061_636b);
    for _ in 0..60 {
        let spec = random_spec(&mut rng);
        let tuning = Tuning {
            strategy: [Strategy::Auto, Strategy::Im2col, Strategy::Shifted][rng.range(0, 2)],
            tile_columns: [None, Some(5), Some(17)][rng.range(0, 2)],
            min_task_columns: 4,
            band_bytes: [0, tuning::BAND_BYTES][rng.range(0, 1)],
        };
        let plan = ConvPlan::new(spec.clone()).unwrap().with_tuning(tuning);
        let x: Vec<f32> = rng
            .values(plan.input_len())
            .iter()
            .map(|&v| v as f32)
            .collect();
        let w: Vec<f32> = rng
            .values(plan.weight_len())
            .iter()
            .map(|&v| v as f32)
            .collect();
        let want = forward(&plan, &x, &w, None);
        let packed = PackedWeight::new(&plan, &w);
        let mut got = vec![0.0f32; plan.output_len()];
        let ((), calls) = trace::record(|| {
            forward_packed(&plan, &x, &packed, &Epilogue::default(), &mut got);
        });
        let streamed = calls.iter().any(|c| c.layout == Layout::Streaming);
        for (i, (g, v)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - v).abs() <= 1e-4 * (1.0 + v.abs()),
                "{spec:?} ({tuning:?}) at {i}: {g} against {v}"
            );
        }
        if versatile_kernels::sgemm::micro_kernel().is_some() && !streamed {
            // The panels: each window's rows padded to whole micro-kernel tiles (at most
            // 12 rows), by its depth over all kernel positions, each block on whole
            // cache lines. The ring layout beside them would add 4 bytes per weight.
            let depth = plan.window_depth() * plan.kernel()[0] * plan.kernel()[1];
            let panels: usize = plan
                .windows()
                .iter()
                .filter(|w| w.rows > 0)
                .map(|w| 4 * (w.rows + 12) * depth + 64 * plan.rings_count())
                .sum();
            assert!(
                packed.bytes() <= panels,
                "{spec:?}: {} bytes for {} weights (panels at most {panels})",
                packed.bytes(),
                plan.weight_len()
            );
        }
    }
}

/// A pooling epilogue writes what the same pass followed by `max_pool2d` (2 x 2, stride
/// 2) writes, to the bit: on the shifted path, whose tiles then hold whole pairs of output
/// rows (small and odd tiles, images padded whole or in bands, tasks split over threads),
/// and on the other paths, which pool a full output.
#[test]
fn a_pooling_epilogue_equals_the_pass_then_max_pooling() {
    let mut rng = Rng(0x706f_6f6c);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let mut pooled_in_write = 0;
    for case in 0..80 {
        let mut spec = random_spec(&mut rng);
        let mut strategy = [Strategy::Auto, Strategy::Im2col, Strategy::Shifted][rng.range(0, 2)];
        if case % 2 == 0 {
            // The shifted path's cases.
            spec.stride = [1, 1];
            strategy = Strategy::Shifted;
        }
        let tuning = Tuning {
            strategy,
            tile_columns: [None, Some(5), Some(40)][rng.range(0, 2)],
            min_task_columns: 4,
            band_bytes: [0, tuning::BAND_BYTES][rng.range(0, 1)],
        };
        let plan = ConvPlan::new(spec.clone()).unwrap().with_tuning(tuning);
        let f32s = |v: Vec<f64>| -> Vec<f32> { v.iter().map(|&v| v as f32).collect() };
        let x = f32s(rng.values(plan.input_len()));
        let w = f32s(rng.values(plan.weight_len()));
        let scale = f32s(rng.values(spec.out_channels));
        let shift = f32s(rng.values(spec.out_channels));
        let packed = PackedWeight::new(&plan, &w);
        let full_epilogue = Epilogue {
            scale: Some(&scale),
            shift: Some(&shift),
            residual: None,
            relu: rng.range(0, 1) == 1,
            pool: false,
        };
        let pooled_epilogue = Epilogue {
            pool: true,
            ..full_epilogue
        };
        let [batch, n, h, width] = plan.output_shape();
        let (want, got) = pool.install(|| {
            let mut full = vec![0.0f32; plan.output_len()];
            forward_packed(&plan, &x, &packed, &full_epilogue, &mut full);
            let pooling = Pool2d {
                input: [batch, n, h, width],
                output: [h / 2, width / 2],
                kernel: [2, 2],
                stride: [2, 2],
                padding: [0, 0],
            };
            let mut want = vec![0.0f32; pooling.output_len()];
            max_pool2d(&pooling, &full, &mut want);
            let mut got = vec![f32::NAN; pooled_epilogue.output_len(&plan)];
            forward_packed(&plan, &x, &packed, &pooled_epilogue, &mut got);
            (want, got)
        });
        assert_eq!(got.len(), want.len());
        for (i, (g, v)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                v.to_bits(),
                "{spec:?} ({tuning:?}) at {i}: {g} against {v}"
            );
        }
        if plan.pools_in_write() && !want.is_empty() {
            pooled_in_write += 1;
        }
    }
    assert!(
        pooled_in_write >= 10,
        "only {pooled_in_write} cases pooled in the write"
    );
}
