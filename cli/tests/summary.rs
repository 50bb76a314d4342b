//! `versatile summary` and `versatile models` as a user runs them.

mod common;

use common::{json, versatile};

#[test]
fn summary_json_has_layers_totals_and_ratios() {
    let report = json(&[
        "summary",
        "--model",
        "vgg16",
        "--variant",
        "spatial",
        "--json",
    ]);
    let layers = report["layers"].as_array().unwrap();
    let total = &report["total"];
    for key in ["params", "macs_dense", "macs_paper", "macs_nested"] {
        let sum: u64 = layers.iter().map(|l| l[key].as_u64().unwrap()).sum();
        assert_eq!(total[key].as_u64().unwrap(), sum, "{key}");
    }
    assert_eq!(total["params"].as_u64(), Some(53_931_976));
    assert_eq!(report["dense"]["params"].as_u64(), Some(138_357_544));
    assert_eq!(
        total["flops_paper"].as_u64().unwrap(),
        2 * total["macs_paper"].as_u64().unwrap()
    );
    let ratio = report["ratios"]["params"].as_f64().unwrap();
    assert!((ratio - 53_931_976.0 / 138_357_544.0).abs() < 1e-12);
    assert_eq!(report["output"], serde_json::json!([1000]));
    let fc6 = layers.iter().find(|l| l["name"] == "fc6").unwrap();
    assert_eq!(fc6["kind"], "VConv2d");
    assert_eq!(fc6["versatile"]["s"], 4);
}

#[test]
fn summary_table_labels_macs_flops_and_the_convention() {
    let out = versatile(&[
        "summary",
        "--model",
        "resnet50",
        "--variant",
        "spatial+channel",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for expected in [
        "MACs paper",
        "FLOPs (2 x MACs)",
        "Convention:",
        "Versatile-v2",
        "layer4.2.conv3",
    ] {
        assert!(text.contains(expected), "missing '{expected}'");
    }
}

#[test]
fn summary_takes_input_classes_and_channels() {
    let report = json(&[
        "summary",
        "--model",
        "vgg_small",
        "--variant",
        "spatial",
        "--input",
        "28x28",
        "--classes",
        "7",
        "--in-channels",
        "1",
        "--json",
    ]);
    assert_eq!(report["input"], serde_json::json!([1, 28, 28]));
    assert_eq!(report["output"], serde_json::json!([7]));
}

#[test]
fn bad_arguments_exit_with_code_2() {
    for args in [
        &["summary", "--model", "vgg17"][..],
        &["summary", "--model", "vgg16", "--variant", "sparse"],
        &["summary", "--model", "vgg16", "--input", "16x16"],
        &["summary", "--model", "vgg16", "--input", "big"],
        &["summary", "--model", "resnet18", "--classes", "0"],
    ] {
        let out = versatile(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}: says why");
    }
}

#[test]
fn models_lists_every_model_with_its_variants() {
    let list = json(&["models", "--json"]);
    let list = list.as_array().unwrap();
    let names: Vec<&str> = list.iter().map(|m| m["name"].as_str().unwrap()).collect();
    for name in [
        "vgg16",
        "vgg19_bn",
        "vgg16_small",
        "vgg_small",
        "resnet50",
        "alexnet",
        "lenet5",
    ] {
        assert!(names.contains(&name), "{name}");
    }
    for model in list {
        assert_eq!(model["variants"].as_array().unwrap().len(), 3);
    }
}
