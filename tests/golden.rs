//! Every reference case of the golden directory, in f32 and f64: the output, the
//! gradients of `sum(out * r)` with respect to the input, weight and bias, the dense
//! weight with its channel order, the plain `Conv2d` export, and the import of the
//! authors' weight layout.
//!
//! Each case runs through both forward paths: the dense form and the fused nested
//! kernel (forward and its own backward).
//!
//! `VERSATILE_GOLDEN_DIR` points the test at another directory of the same format.

use crate::common;

use burn::module::Param;
use burn::tensor::Device;
use common::{case_files, golden_dir, host_any, relative_error, GoldenCase};
use versatile::layer::ForwardPath;

/// Runs one case; returns the list of checks that failed.
fn check_case(case: &GoldenCase, device: &Device, path: ForwardPath) -> Vec<String> {
    let mut failures = Vec::new();
    let mut check = |what: &str, got: Vec<f64>, expected: &[f64]| {
        let err = relative_error(&got, expected);
        if err > case.tolerance() {
            failures.push(format!(
                "{what}: relative error {err:.3e} exceeds {:.0e}",
                case.tolerance()
            ));
        }
    };
    let meta = &case.meta;
    let mut layer = meta.config().init(device).with_path(path);

    // Geometry agrees with the case's derived sizes.
    let g = *layer.geometry();
    assert_eq!(
        (g.s, g.n_c, g.primary, g.c_hat),
        (meta.s, meta.n_c, meta.primary, meta.c_hat),
        "{}: derived geometry",
        meta.name
    );

    layer.weight = Param::from_tensor(case.tensor::<4>("weight", device));
    if meta.bias {
        layer.bias = Some(Param::from_tensor(case.tensor::<1>("bias", device)));
    }
    let x = case.tensor::<4>("x", device).require_grad();
    let out = layer.forward(x.clone());
    assert_eq!(
        out.dims().to_vec(),
        meta.out_shape,
        "{}: output shape",
        meta.name
    );
    assert_eq!(out.dtype(), case.dtype, "{}: output precision", meta.name);

    let loss = (out.clone() * case.tensor::<4>("r", device)).sum();
    let grads = loss.backward();
    check("out", host_any(out.clone()), case.values("out"));
    check(
        "grad_x",
        host_any(x.grad(&grads).unwrap()),
        case.values("grad_x"),
    );
    check(
        "grad_weight",
        host_any(layer.weight.grad(&grads).unwrap()),
        case.values("grad_weight"),
    );
    if meta.bias {
        let grad_bias = layer.bias.as_ref().unwrap().grad(&grads).unwrap();
        check("grad_bias", host_any(grad_bias), case.values("grad_bias"));
    }

    // Dense form: the unfolded weight, its order, and a plain Conv2d giving the output.
    check(
        "dense_weight",
        host_any(layer.dense_weight()),
        case.values("dense_weight"),
    );
    let order: Vec<usize> = case
        .values("dense_order")
        .iter()
        .map(|&v| v as usize)
        .collect();
    assert_eq!(layer.dense_order(), order, "{}: dense_order", meta.name);
    let (conv, conv_order) = layer.to_conv2d();
    let dense_out = conv.forward(case.tensor::<4>("x", device));
    let expected_out = case.values("out");
    let [batch, channels, h, w] = dense_out.dims();
    let plane = h * w;
    let dense_values = host_any(dense_out);
    let mut permuted = vec![0.0; dense_values.len()];
    for b in 0..batch {
        for (k, &block) in conv_order.iter().enumerate() {
            let src = (b * channels + k) * plane;
            let dst = (b * channels + block) * plane;
            permuted[dst..dst + plane].copy_from_slice(&dense_values[src..src + plane]);
        }
    }
    check("to_conv2d output", permuted, expected_out);

    // The authors' layout: the first c_hat channels are the weight, the rest is junk.
    if case.has("weight_authors_layout") {
        let imported = layer
            .clone()
            .load_authors_weight(case.tensor::<4>("weight_authors_layout", device))
            .unwrap();
        check(
            "authors-layout import",
            host_any(imported.weight.val()),
            case.values("weight"),
        );
    }
    failures
}

/// Checks every golden case (f32 and f64) through `path`.
fn check_all(path: ForwardPath) {
    let dir = golden_dir();
    let files = case_files(&dir);
    assert!(
        !files.is_empty(),
        "no golden case (*.safetensors) in {}",
        dir.display()
    );
    let device = Device::flex().autodiff();
    let mut report = Vec::new();
    for file in &files {
        let case = GoldenCase::load(file);
        for failure in check_case(&case, &device, path) {
            report.push(format!("{}: {failure}", file.display()));
        }
    }
    assert!(report.is_empty(), "golden failures:\n{}", report.join("\n"));
    eprintln!(
        "{} golden files checked in {} ({path})",
        files.len(),
        dir.display()
    );
}

#[test]
fn golden_cases_dense_form() {
    check_all(ForwardPath::DenseForm);
}

#[test]
fn golden_cases_fused() {
    check_all(ForwardPath::Fused);
}
