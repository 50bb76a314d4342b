//! The nested evaluation on burn's CubeCL backends (wgpu: Vulkan, Metal, DX12; cuda):
//! the forward pass and the three gradients of a versatile convolution as `#[cube]`
//! kernels ([`kernels`]), launched on the tensors of a `Cube` device. The backend
//! extension in [`super::fused`] calls [`forward`] and [`backward`] for `Cube` and
//! `Autodiff<Cube>` as it calls the CPU kernels for `Flex`.
//!
//! The kernels compute each output value by one thread in a fixed order (no atomics),
//! so results are reproducible bit for bit; they are direct convolutions, not tiled
//! matrix products (see BENCHMARKS.md for what that costs on a real GPU).

mod kernels;

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::{AddressType, CubeDim};

use crate::kernels::{ConvPlan, Needs};
use kernels::{NestedArgs, NestedArgsLaunch};

/// Threads the chunked weight and bias gradients aim for: enough to fill a GPU, few
/// enough that the partial sums stay small.
const REDUCTION_THREADS: usize = 1 << 16;

/// Iterations one thread's innermost loop may run: bounds the work of a thread, far below
/// the 65,535 iterations after which lavapipe (Mesa's software Vulkan) ends a loop.
const THREAD_BUDGET: usize = 4096;

/// The three gradients `(input, weight, bias)` as cube tensors, each when asked for.
pub(super) type CubeGradients = (Option<CubeTensor>, Option<CubeTensor>, Option<CubeTensor>);

/// The kernels' arguments for `plan`, or why its channel layout is not the linear one the
/// kernels derive from the block index (never for a plan a layer makes: windows at
/// `j * stride`, groups at `q * depth`, rings at their distance from the border).
pub(super) fn nested_args(plan: &ConvPlan) -> Result<NestedArgs, String> {
    let [batch, in_channels, in_h, in_w] = plan.input_shape();
    let [_, out_channels, out_h, out_w] = plan.output_shape();
    let [kernel_h, kernel_w] = plan.kernel();
    let [stride_h, stride_w] = plan.stride();
    let [dilation_h, dilation_w] = plan.dilation();
    let [pad_h, pad_w] = plan.padding_begin();
    let primaries = plan.primaries();
    let windows = plan.n_c();
    let depth = plan.window_depth();
    let list = plan.windows();
    let first = list.first().ok_or("a plan without windows")?;

    // Groups are windows with j = 0 spread over the primaries; channel windows share them.
    let groups: Vec<_> = list.iter().filter(|w| w.j == 0).collect();
    let (group_rows, group_in_stride) = match groups.as_slice() {
        [_, second, ..] => (
            second.first_primary.max(1),
            second.in_offset - groups[0].in_offset,
        ),
        _ => (primaries, 0),
    };
    let step = |pick: fn(&crate::kernels::Window) -> usize| {
        list.iter()
            .find(|w| w.j == 1)
            .map_or(0, |w| pick(w).saturating_sub(pick(first)))
    };
    let window_in_stride = step(|w| w.in_offset);
    let window_weight_stride = step(|w| w.weight_offset);
    for w in list {
        let group = w.first_primary / group_rows;
        let linear = w.first_primary == group * group_rows
            && w.in_offset == group * group_in_stride + w.j * window_in_stride
            && w.weight_offset == w.j * window_weight_stride;
        if !linear {
            return Err(format!("window {w:?} is not at a linear position"));
        }
    }
    for (ring, positions) in plan.rings().iter().enumerate() {
        let crops_by_distance = plan.rings_count() > 1;
        for &(ky, kx) in positions {
            let distance = ky.min(kx).min(kernel_h - 1 - ky).min(kernel_w - 1 - kx);
            if crops_by_distance && distance != ring {
                return Err(format!("kernel position ({ky}, {kx}) is in ring {ring}"));
            }
        }
    }
    Ok(NestedArgs {
        batch,
        in_channels,
        in_h,
        in_w,
        out_channels,
        out_h,
        out_w,
        kernel_h,
        kernel_w,
        stride_h,
        stride_w,
        dilation_h,
        dilation_w,
        pad_h,
        pad_w,
        crops: plan.rings_count(),
        primaries,
        windows,
        depth,
        group_rows,
        group_in_stride,
        window_in_stride,
        window_weight_stride,
        chunk: 1,
    })
}

fn launch_args(a: &NestedArgs) -> NestedArgsLaunch {
    NestedArgsLaunch::new(
        a.batch,
        a.in_channels,
        a.in_h,
        a.in_w,
        a.out_channels,
        a.out_h,
        a.out_w,
        a.kernel_h,
        a.kernel_w,
        a.stride_h,
        a.stride_w,
        a.dilation_h,
        a.dilation_w,
        a.pad_h,
        a.pad_w,
        a.crops,
        a.primaries,
        a.windows,
        a.depth,
        a.group_rows,
        a.group_in_stride,
        a.window_in_stride,
        a.window_weight_stride,
        a.chunk,
    )
}

/// The arguments of `plan`; a plan the kernels cannot take is a bug in its caller.
fn checked_args(plan: &ConvPlan) -> NestedArgs {
    nested_args(plan).unwrap_or_else(|why| panic!("nested_conv2d on the GPU: {why}"))
}

/// The widest addressing any of `tensors` needs.
fn address_type(tensors: &[&CubeTensor]) -> AddressType {
    tensors
        .iter()
        .map(|t| t.required_address_type())
        .max()
        .unwrap_or_default()
}

/// A new contiguous f32 tensor on `like`'s device.
fn empty(like: &CubeTensor, shape: Vec<usize>) -> CubeTensor {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        shape.into(),
        DType::F32,
    )
}

/// Threads per cube and cubes for `units` threads.
fn grid(like: &CubeTensor, units: usize) -> (CubeDim, cubecl::prelude::CubeCount) {
    let dim = CubeDim::new(&like.client, units);
    (dim, calculate_cube_count_elemwise(&like.client, units, dim))
}

fn check_f32(tensors: &[&CubeTensor]) {
    for t in tensors {
        assert_eq!(
            t.dtype,
            DType::F32,
            "nested_conv2d on the GPU takes f32 tensors"
        );
    }
}

/// The nested convolution of `plan`: input `[batch, c, h, w]`, weight `[m, depth, kh, kw]`,
/// bias `[n]`; output `[batch, n, out_h, out_w]` (contiguous).
pub(super) fn forward(
    x: &CubeTensor,
    weight: &CubeTensor,
    bias: Option<&CubeTensor>,
    plan: &ConvPlan,
) -> CubeTensor {
    let args = checked_args(plan);
    let x = into_contiguous(x.clone());
    let weight = into_contiguous(weight.clone());
    let bias = bias.map(|b| into_contiguous(b.clone()));
    check_f32(&[&x, &weight]);
    let positions = args.kernel_h * args.kernel_w;
    let (chunk, chunks) = per_chunk(args.depth, THREAD_BUDGET / positions);
    let has_bias = bias.is_some();
    // Without a bias the kernel never reads its bias argument; the weight stands in.
    let bias = bias.unwrap_or_else(|| weight.clone());
    in_chunks(&x, chunks, plan.output_shape().to_vec(), |partial| {
        let (dim, count) = grid(&x, partial.meta.num_elements());
        kernels::nested_forward::launch::<f32>(
            &x.client,
            count,
            dim,
            address_type(&[&x, &weight, partial]),
            x.clone().into_tensor_arg(),
            weight.clone().into_tensor_arg(),
            bias.clone().into_tensor_arg(),
            partial.clone().into_tensor_arg(),
            launch_args(&NestedArgs { chunk, ..args }),
            has_bias,
        );
    })
}

/// Splits `items` into chunks of at most `budget` (at least 1): `(chunk, chunks)`.
fn per_chunk(items: usize, budget: usize) -> (usize, usize) {
    let chunk = budget.clamp(1, items.max(1));
    (chunk, items.max(1).div_ceil(chunk))
}

/// Runs a chunked reduction: `launch` fills a contiguous `[chunks, shape...]` tensor of
/// partial results (`shape` itself when there is one chunk), whose chunks are then added
/// in order.
fn in_chunks(
    like: &CubeTensor,
    chunks: usize,
    shape: Vec<usize>,
    launch: impl FnOnce(&CubeTensor),
) -> CubeTensor {
    if chunks == 1 {
        let out = empty(like, shape);
        launch(&out);
        return out;
    }
    let len: usize = shape.iter().product();
    let partial = empty(like, vec![chunks, len]);
    launch(&partial);
    sum_chunks(partial, chunks, shape)
}

/// Adds the `chunks` rows of `partial` (`[chunks, len]`) in order into a `shape` tensor.
fn sum_chunks(partial: CubeTensor, chunks: usize, shape: Vec<usize>) -> CubeTensor {
    let len: usize = shape.iter().product();
    let out = empty(&partial, shape);
    let (dim, count) = grid(&partial, len);
    let address = address_type(&[&partial, &out]);
    kernels::sum_chunks::launch::<f32>(
        &partial.client,
        count,
        dim,
        address,
        partial.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        chunks,
    );
    out
}

/// The gradients of [`forward`] with respect to the input, the weight and the bias (each
/// when `needs` asks), given the output gradient `grad` `[batch, n, out_h, out_w]`.
pub(super) fn backward(
    x: &CubeTensor,
    weight: &CubeTensor,
    grad: &CubeTensor,
    plan: &ConvPlan,
    needs: Needs,
) -> CubeGradients {
    let args = checked_args(plan);
    let x = into_contiguous(x.clone());
    let weight = into_contiguous(weight.clone());
    let grad = into_contiguous(grad.clone());
    check_f32(&[&x, &weight, &grad]);
    let positions = args.kernel_h * args.kernel_w;
    let rows = args.batch * args.out_h;
    // Output rows per chunk of the weight and bias gradients: few enough for the budget,
    // enough chunks to spread over the GPU.
    let rows_per_chunk = |len: usize, per_row: usize| {
        let spread = rows.div_ceil(REDUCTION_THREADS.div_ceil(len.max(1)).max(1));
        (THREAD_BUDGET / per_row.max(1)).min(spread)
    };

    let dx = needs.x.then(|| {
        let (chunk, chunks) = per_chunk(args.out_channels, THREAD_BUDGET / positions);
        in_chunks(&x, chunks, plan.input_shape().to_vec(), |partial| {
            let (dim, count) = grid(&x, partial.meta.num_elements());
            kernels::nested_input_grad::launch::<f32>(
                &x.client,
                count,
                dim,
                address_type(&[&grad, &weight, partial]),
                grad.clone().into_tensor_arg(),
                weight.clone().into_tensor_arg(),
                partial.clone().into_tensor_arg(),
                launch_args(&NestedArgs { chunk, ..args }),
            );
        })
    });

    let dw = needs.weight.then(|| {
        let len = plan.weight_len();
        let blocks = args.crops * args.windows;
        let (chunk, chunks) = per_chunk(rows, rows_per_chunk(len, blocks * args.out_w));
        in_chunks(&x, chunks, plan.weight_shape().to_vec(), |partial| {
            let (dim, count) = grid(&x, partial.meta.num_elements());
            kernels::nested_weight_grad_partial::launch::<f32>(
                &x.client,
                count,
                dim,
                address_type(&[&x, &grad, partial]),
                x.clone().into_tensor_arg(),
                grad.clone().into_tensor_arg(),
                partial.clone().into_tensor_arg(),
                plan.weight_shape()[1],
                launch_args(&NestedArgs { chunk, ..args }),
            );
        })
    });

    let db = needs.bias.then(|| {
        let len = plan.out_channels();
        let (chunk, chunks) = per_chunk(rows, rows_per_chunk(len, args.out_w));
        in_chunks(&grad, chunks, vec![len], |partial| {
            let (dim, count) = grid(&grad, partial.meta.num_elements());
            kernels::nested_bias_grad_partial::launch::<f32>(
                &grad.client,
                count,
                dim,
                address_type(&[&grad, partial]),
                grad.clone().into_tensor_arg(),
                partial.clone().into_tensor_arg(),
                launch_args(&NestedArgs { chunk, ..args }),
            );
        })
    });

    (dx, dw, db)
}

/// Whether `device` runs on burn's CubeCL backend (wgpu or cuda).
pub(super) fn is_cube(device: &burn::tensor::Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        burn::backend::DispatchDevice::Cube(_)
    )
}
