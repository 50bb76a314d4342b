//! The `versatile` binary end to end: output formats and exit codes.

mod common;

use common::{json, versatile};

#[test]
fn layer_json_reports_geometry_and_costs() {
    // VGG-16's conv3_1 at 56x56: s = 2, m = 128, as SPEC section 2 counts it.
    let v = json(&[
        "layer",
        "--in",
        "128",
        "--out",
        "256",
        "--kernel",
        "3",
        "--padding",
        "1",
        "--input",
        "56x56",
        "--json",
    ]);
    let pixels = 56 * 56u64;
    assert_eq!(v["s"], 2);
    assert_eq!(v["n_c"], 1);
    assert_eq!(v["primary"], 128);
    assert_eq!(v["c_hat"], 128);
    assert_eq!(
        (v["out_h"].as_u64(), v["out_w"].as_u64()),
        (Some(56), Some(56))
    );
    assert_eq!(v["params"], 128 * 128 * 9 + 256);
    assert_eq!(v["dense_params"], 256 * 128 * 9 + 256);
    assert_eq!(v["macs_dense"], pixels * 256 * 128 * 9);
    assert_eq!(v["macs_paper"], pixels * 128 * 128 * (9 + 1));
    assert_eq!(v["macs_nested"], pixels * 128 * 128 * 9);
}

#[test]
fn layer_json_channel_versatile_non_square_stride() {
    // c = 16, delta = 2, g = 1: n_c = 3, c_hat = 14; n = 30 over s * n_c = 9 blocks: m = 4.
    let v = json(&[
        "layer",
        "--in",
        "16",
        "--out",
        "30",
        "--kernel",
        "5",
        "--padding",
        "same",
        "--stride",
        "2",
        "--input",
        "9x14",
        "--delta",
        "2",
        "--no-bias",
        "--json",
    ]);
    assert_eq!((v["s"].as_u64(), v["n_c"].as_u64()), (Some(3), Some(3)));
    assert_eq!(
        (v["primary"].as_u64(), v["c_hat"].as_u64()),
        (Some(4), Some(14))
    );
    assert_eq!(
        (v["out_h"].as_u64(), v["out_w"].as_u64()),
        (Some(5), Some(7))
    );
    assert_eq!(v["params"], 4 * 14 * 25);
    assert_eq!(v["dense_params"], 30 * 16 * 25);
    // 30 of 36 channels: crops 0 and 1 full (24), crop 2 (1x1) keeps 6.
    assert_eq!(v["macs_paper"], 35 * 14 * (12 * 25 + 12 * 9 + 6));
    assert_eq!(v["macs_nested"], 35 * 14 * 12 * 25);
}

#[test]
fn layer_table_is_readable() {
    let out = versatile(&[
        "layer", "--in", "8", "--out", "16", "--kernel", "3", "--input", "8",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("primary filters m"), "{text}");
    assert!(text.contains("FLOPs = 2 x MACs"), "{text}");
}

#[test]
fn bad_layer_arguments_exit_with_code_2() {
    for (args, message) in [
        (
            vec![
                "--in", "4", "--out", "8", "--kernel", "3", "--input", "8x8", "--delta", "4",
            ],
            "delta = 4",
        ),
        (
            vec![
                "--in", "4", "--out", "8", "--kernel", "3", "--input", "8x8", "--delta", "3",
                "--g", "2",
            ],
            "g = 2 must divide delta = 3",
        ),
        (
            vec!["--in", "4", "--out", "8", "--kernel", "7", "--input", "5x5"],
            "smaller than the kernel",
        ),
        (
            vec![
                "--in",
                "4",
                "--out",
                "8",
                "--kernel",
                "3",
                "--input",
                "8x8",
                "--padding",
                "1,2",
            ],
            "not a padding",
        ),
        (
            vec![
                "--in", "4", "--out", "8", "--kernel", "3", "--input", "eight",
            ],
            "not HxW",
        ),
        (
            vec![
                "--in", "4", "--out", "8", "--kernel", "3", "--input", "8", "--mode", "diagonal",
            ],
            "unknown channel mode",
        ),
        (vec!["--in", "4", "--out", "8", "--input", "8"], "--kernel"),
    ] {
        let mut full = vec!["layer"];
        full.extend(args.iter());
        let out = versatile(&full);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{full:?}: {stderr}");
        assert!(
            stderr.contains(message),
            "{full:?}: '{stderr}' lacks '{message}'"
        );
    }
}
