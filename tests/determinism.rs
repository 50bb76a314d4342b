//! Bit-for-bit reproducibility of the kernels at 1, 2, 3, 8 and 16 threads: every
//! parallel reduction (per-task weight-gradient partials, the streaming path's
//! input-gradient partials) adds in a fixed order, so repeating a call in a pool of the
//! same size gives the same bits, however the tasks were scheduled. Each thread count
//! runs in a pool of its own (not the process-wide one), so the tests are independent.

use crate::common;

use burn::module::Param;
use burn::nn::PaddingConfig2d;
use burn::tensor::{DType, Device};
use common::{host_any, relative_error, Rng};
use versatile::kernels::trace::{self, Layout};
use versatile::kernels::tuning::{self, Strategy, Tuning};
use versatile::layer::{ChannelMode, ForwardPath, VConv2dConfig};

const THREADS: [usize; 5] = [1, 2, 3, 8, 16];

/// One layer, input and layout to check.
struct Case {
    name: &'static str,
    config: VConv2dConfig,
    input: [usize; 4],
    strategy: Strategy,
    layout: Layout,
}

fn cases() -> Vec<Case> {
    let same = PaddingConfig2d::Same;
    vec![
        // im2col, one covering window: partials overwritten on first write.
        Case {
            name: "im2col",
            config: VConv2dConfig::new([16, 40], [3, 3]).with_padding(same.clone()),
            input: [16, 16, 10, 9],
            strategy: Strategy::Im2col,
            layout: Layout::Im2col,
        },
        // im2col with channel windows (sliding): zeroed partials, several windows.
        Case {
            name: "im2col-windows",
            config: VConv2dConfig::new([12, 30], [5, 5])
                .with_padding(same.clone())
                .with_delta(4)
                .with_g(2)
                .with_channel_mode(ChannelMode::Sliding),
            input: [16, 12, 9, 8],
            strategy: Strategy::Im2col,
            layout: Layout::Im2col,
        },
        // Shifted views (stride 1, windows of 16 channels).
        Case {
            name: "shifted",
            config: VConv2dConfig::new([16, 24], [3, 3]).with_padding(same),
            input: [16, 16, 12, 11],
            strategy: Strategy::Shifted,
            layout: Layout::Shifted,
        },
        // Weight streaming, fc6-like (the kernel covers the input): 1024 primaries in 32
        // chunks, so up to 16 groups whose input-gradient partials are reduced.
        Case {
            name: "streaming",
            config: VConv2dConfig::new([16, 2048], [3, 3]),
            input: [3, 16, 3, 3],
            strategy: Strategy::Stream,
            layout: Layout::Streaming,
        },
    ]
}

/// Output, input, weight and bias gradients of `sum(out * r)`, as raw bits.
fn run_bits(case: &Case, seed: u64) -> (Vec<Vec<u64>>, usize) {
    let device = Device::flex().autodiff();
    let mut rng = Rng(seed);
    let mut layer = case
        .config
        .clone()
        .init(&device)
        .with_path(ForwardPath::Fused);
    let shape = layer.weight.dims();
    layer.weight = Param::from_tensor(rng.tensor(shape, &device, DType::F32));
    let n = case.config.channels[1];
    layer.bias = Some(Param::from_tensor(rng.tensor([n], &device, DType::F32)));
    let x = rng.tensor(case.input, &device, DType::F32).require_grad();
    let r = rng.tensor(layer.output_shape(case.input).unwrap(), &device, DType::F32);
    let _tuning = tuning::scoped(Tuning {
        strategy: case.strategy,
        tile_columns: Some(37),
        min_task_columns: 8,
        // Bands of rows on the shifted path, for these small images too.
        band_bytes: 0,
    });
    let ((out, grads), calls) = trace::record(|| {
        let out = layer.forward(x.clone());
        let grads = (out.clone() * r.clone()).sum().backward();
        (out, grads)
    });
    assert!(
        calls.iter().all(|c| c.layout == case.layout),
        "{}: {calls:?}",
        case.name
    );
    let tasks = calls.last().expect("a backward call").tasks;
    let bits = |v: Vec<f64>| v.into_iter().map(f64::to_bits).collect();
    let values = vec![
        bits(host_any(out)),
        bits(host_any(x.grad(&grads).unwrap())),
        bits(host_any(layer.weight.grad(&grads).unwrap())),
        bits(host_any(layer.bias.as_ref().unwrap().grad(&grads).unwrap())),
    ];
    (values, tasks)
}

#[test]
fn gradients_are_bit_identical_for_a_given_thread_count() {
    for case in cases() {
        let mut per_threads = Vec::new();
        for threads in THREADS {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (first, tasks) = pool.install(|| run_bits(&case, 0xd15c));
            if threads > 1 {
                // The reduction under test runs: several tasks' partials are summed.
                assert!(
                    tasks > 1,
                    "{} at {threads} threads: {tasks} task",
                    case.name
                );
            }
            for repeat in 1..4 {
                let (again, _) = pool.install(|| run_bits(&case, 0xd15c));
                for (what, (a, b)) in ["out", "grad_x", "grad_weight", "grad_bias"]
                    .iter()
                    .zip(first.iter().zip(&again))
                {
                    let differing = a.iter().zip(b).filter(|(x, y)| x != y).count();
                    assert_eq!(
                        differing, 0,
                        "{} at {threads} threads, repeat {repeat}: {what} differs in {differing} values",
                        case.name
                    );
                }
            }
            per_threads.push(first);
        }
        // Across thread counts only the summation order changes: equal to rounding.
        let floats =
            |bits: &Vec<u64>| -> Vec<f64> { bits.iter().map(|&b| f64::from_bits(b)).collect() };
        for (threads, values) in THREADS.iter().zip(&per_threads).skip(1) {
            for (a, b) in per_threads[0].iter().zip(values) {
                let err = relative_error(&floats(b), &floats(a));
                assert!(err < 1e-5, "{} at {threads} threads: {err:.2e}", case.name);
            }
        }
    }
}
