//! Shared helpers of the integration tests: golden-case loading and tolerant comparison.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::nn::PaddingConfig2d;
use burn::tensor::{DType, Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use versatile::layer::{ChannelMode, ForwardPath, VConv2d, VConv2dConfig};

/// Configuration of one golden case (the `meta` header entry of its safetensors file).
#[derive(Debug, Clone, Deserialize)]
pub struct CaseMeta {
    pub name: String,
    #[serde(rename = "N")]
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    #[serde(rename = "H")]
    pub height: usize,
    #[serde(rename = "W")]
    pub width: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub groups: usize,
    pub delta: usize,
    pub g: usize,
    pub bias: bool,
    pub channel_mode: String,
    pub s: usize,
    pub n_c: usize,
    pub primary: usize,
    pub c_hat: usize,
    pub out_shape: Vec<usize>,
}

impl CaseMeta {
    pub fn config(&self) -> VConv2dConfig {
        let p = self.padding;
        VConv2dConfig::new(
            [self.in_channels, self.out_channels],
            [self.kernel, self.kernel],
        )
        .with_stride([self.stride; 2])
        .with_dilation([self.dilation; 2])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .with_groups(self.groups)
        .with_bias(self.bias)
        .with_delta(self.delta)
        .with_g(self.g)
        .with_channel_mode(self.channel_mode.parse::<ChannelMode>().unwrap())
    }
}

/// One golden case in one precision: its configuration and tensors as f64 host data.
pub struct GoldenCase {
    pub meta: CaseMeta,
    pub dtype: DType,
    pub path: PathBuf,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

impl GoldenCase {
    pub fn load(path: &Path) -> GoldenCase {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta_json = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("meta"))
            .unwrap_or_else(|| panic!("{}: no 'meta' header entry", path.display()));
        let meta: CaseMeta = serde_json::from_str(meta_json).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = HashMap::new();
        let mut dtype = DType::F32;
        for (name, view) in st.tensors() {
            let data = view.data();
            let values: Vec<f64> = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::F64 => {
                    dtype = DType::F64;
                    data.chunks_exact(8)
                        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                        .collect()
                }
                Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{}: unexpected dtype {other:?} for {name}", path.display()),
            };
            tensors.insert(name.to_string(), (view.shape().to_vec(), values));
        }
        GoldenCase {
            meta,
            dtype,
            path: path.to_path_buf(),
            tensors,
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn values(&self, name: &str) -> &[f64] {
        &self.get(name).1
    }

    pub fn get(&self, name: &str) -> &(Vec<usize>, Vec<f64>) {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{}: missing tensor '{name}'", self.path.display()))
    }

    /// A float tensor in the case's own precision.
    pub fn tensor<const D: usize>(&self, name: &str, device: &Device) -> Tensor<D> {
        let (shape, values) = self.get(name);
        let data = TensorData::new(values.clone(), shape.clone());
        Tensor::from_data(data, (device, self.dtype))
    }

    /// Relative tolerance for this precision (README of the golden cases).
    pub fn tolerance(&self) -> f64 {
        if self.dtype == DType::F64 {
            1e-9
        } else {
            1e-4
        }
    }
}

/// The golden directory: `VERSATILE_GOLDEN_DIR` or the copy in the repository.
pub fn golden_dir() -> PathBuf {
    std::env::var_os("VERSATILE_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden"))
}

/// Every `*.safetensors` case file of `dir`, sorted.
pub fn case_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read golden directory {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    files.sort();
    files
}

/// Host values of a tensor as f64.
pub fn host(tensor: Tensor<1>) -> Vec<f64> {
    tensor
        .into_data()
        .convert::<f64>()
        .try_to_vec::<f64>()
        .unwrap()
}

/// Host values of a tensor of any rank, flattened.
pub fn host_any<const D: usize>(tensor: Tensor<D>) -> Vec<f64> {
    let n = tensor.shape().num_elements();
    host(tensor.reshape([n]))
}

/// Largest absolute difference divided by the largest magnitude of `expected`
/// (absolute when `expected` is all zeros).
pub fn relative_error(got: &[f64], expected: &[f64]) -> f64 {
    assert_eq!(got.len(), expected.len(), "length mismatch");
    let scale = expected
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    let scale = if scale < 1e-30 { 1.0 } else { scale };
    got.iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Asserts `got` is within `tol` of `expected` relative to its magnitude.
pub fn assert_close(what: &str, got: &[f64], expected: &[f64], tol: f64) {
    let err = relative_error(got, expected);
    assert!(
        err <= tol,
        "{what}: relative error {err:.3e} exceeds {tol:.0e}"
    );
}

/// A small deterministic generator for test inputs and choices (xorshift64*); the
/// state must not be zero ([`Rng::new`] makes any seed valid).
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    /// One of `items`.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// `len` values uniform in `[-1, 1)`.
    pub fn values(&mut self, len: usize) -> Vec<f64> {
        (0..len).map(|_| self.uniform(-1.0, 1.0)).collect()
    }

    /// A tensor of `shape` with values uniform in `[-1, 1)`.
    pub fn tensor<const D: usize>(
        &mut self,
        shape: [usize; D],
        device: &Device,
        dtype: DType,
    ) -> Tensor<D> {
        let len = shape.iter().product();
        Tensor::from_data(TensorData::new(self.values(len), shape), (device, dtype))
    }
}

/// A random valid layer configuration and an input shape it accepts.
pub fn random_case(rng: &mut Rng) -> (VConv2dConfig, [usize; 4]) {
    loop {
        let d: usize = rng.pick(&[1, 2, 3, 3, 3, 4, 5, 5, 7]);
        let s = d.div_ceil(2);
        let (c, n, groups, delta, g, mode);
        if d > 1 && rng.chance(20) {
            // Grouped, spatial only: m divisible by groups and n = s * m.
            let gr = rng.range(2, 3);
            c = gr * rng.range(1, 3);
            let m = gr * rng.range(1, 3);
            n = s * m;
            groups = gr;
            delta = 0;
            g = 1;
            mode = ChannelMode::Shared;
        } else {
            c = rng.range(1, 10);
            groups = 1;
            if c > 1 && (d == 1 || rng.chance(45)) {
                let dl = rng.range(1, c - 1);
                let divisors: Vec<usize> = (1..=dl).filter(|v| dl.is_multiple_of(*v)).collect();
                delta = dl;
                g = rng.pick(&divisors);
            } else {
                delta = 0;
                g = 1;
            }
            mode = if rng.chance(50) {
                ChannelMode::Shared
            } else {
                ChannelMode::Sliding
            };
            n = rng.range(1, 20);
        }
        let stride = [rng.range(1, 3), rng.range(1, 3)];
        let dilation = if rng.chance(30) {
            [rng.range(1, 3), rng.range(1, 3)]
        } else {
            [1, 1]
        };
        let padding = match rng.range(0, 3) {
            0 => PaddingConfig2d::Valid,
            1 => PaddingConfig2d::Same,
            _ => PaddingConfig2d::Explicit(
                rng.range(0, d),
                rng.range(0, d),
                rng.range(0, d),
                rng.range(0, d),
            ),
        };
        let config = VConv2dConfig::new([c, n], [d, d])
            .with_stride(stride)
            .with_dilation(dilation)
            .with_padding(padding)
            .with_groups(groups)
            .with_delta(delta)
            .with_g(g)
            .with_channel_mode(mode)
            .with_bias(rng.chance(75));
        if config.validate().is_err() {
            continue;
        }
        let batch = rng.pick(&[1, 1, 2, 3, 4]);
        let h = rng.range(1, 16);
        let w = rng.range(1, 16);
        let layer = config.init(&Device::flex());
        if layer.output_shape([batch, c, h, w]).is_ok() {
            return (config, [batch, c, h, w]);
        }
    }
}

/// A layer's output and gradients (input, weight, bias) of `sum(out * r)`.
pub type Outputs = (Vec<f64>, Vec<f64>, Vec<f64>, Option<Vec<f64>>);

/// `layer` forward and backward on `path` (asserting that it runs there) for `x`, with
/// `r` weighing the output: its [`Outputs`] as host values.
pub fn run_on_path(layer: &VConv2d, path: ForwardPath, x: &Tensor<4>, r: &Tensor<4>) -> Outputs {
    let layer = layer.clone().with_path(path);
    let x = x.clone().require_grad();
    assert_eq!(
        layer.path_for(&x).unwrap(),
        path,
        "path on {:?}",
        x.device()
    );
    let out = layer.forward(x.clone());
    let grads = (out.clone() * r.clone()).sum().backward();
    (
        host_any(out),
        host_any(x.grad(&grads).unwrap()),
        host_any(layer.weight.grad(&grads).unwrap()),
        layer
            .bias
            .as_ref()
            .map(|b| host_any(b.grad(&grads).unwrap())),
    )
}
