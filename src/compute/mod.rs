//! The compute layer: the operations EfficientDet needs, behind one [`Backend`] trait.
//!
//! The network in [`crate::model`] is written once against `Backend`; each engine implements it:
//! [`cpu::CpuBackend`] (f32, the reference and CPU engine) today, a CUDA backend (FP16 storage,
//! cuDNN convolutions, NVRTC elementwise kernels, CUDA graphs) later. The op set is deliberately
//! coarse where fusion pays on every engine: a convolution carries its bias, activation and
//! residual add; fast-normalised fusion carries its activation. Every op is a pure function of its
//! inputs (no hidden state), so a training module can wrap a backend in a tape that records each
//! call and its backward, without touching the model code.

pub mod cpu;
pub mod cuda;
pub mod profile;
mod tensor;

pub use tensor::Tensor;

use crate::error::Result;

/// Elementwise activation, applied after an op's main computation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    None,
    /// x * sigmoid(x) (SiLU).
    Swish,
    /// 1 / (1 + exp(-x)).
    Sigmoid,
    /// max(x, 0).
    Relu,
}

impl Activation {
    /// Applies the activation to one value (the CPU reference for every backend; `exp` is
    /// [`cpu::simd::exp`], within a few ulp of libm's).
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        cpu::simd::activate(self, x)
    }
}

/// Spatial padding of a convolution or pooling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// TensorFlow "SAME": output = ceil(input / stride); when the total pad is odd the extra
    /// pixel goes to the bottom/right. Computed from the actual input size at run time.
    Same,
    /// Fixed padding (top, bottom, left, right).
    Explicit {
        top: usize,
        bottom: usize,
        left: usize,
        right: usize,
    },
}

impl Padding {
    /// (output size, pad before, pad after) for one spatial dimension.
    pub fn resolve(
        self,
        input: usize,
        kernel: usize,
        stride: usize,
        dim_is_height: bool,
    ) -> (usize, usize, usize) {
        match self {
            Padding::Same => {
                let out = input.div_ceil(stride);
                let needed = ((out.saturating_sub(1)) * stride + kernel).saturating_sub(input);
                (out, needed / 2, needed - needed / 2)
            }
            Padding::Explicit {
                top,
                bottom,
                left,
                right,
            } => {
                let (a, b) = if dim_is_height {
                    (top, bottom)
                } else {
                    (left, right)
                };
                let padded = input + a + b;
                let out = if padded >= kernel {
                    (padded - kernel) / stride + 1
                } else {
                    0
                };
                (out, a, b)
            }
        }
    }
}

/// How a convolution is applied. The kernel size comes from the weight's shape
/// `[out_channels, in_channels / groups, kh, kw]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    pub stride: usize,
    /// 1 for a regular convolution, `in_channels` (= `out_channels`) for a depthwise one.
    pub groups: usize,
    pub padding: Padding,
    /// Applied after the bias, before the residual add.
    pub act: Activation,
}

impl ConvSpec {
    /// Stride-1, TF-SAME, regular convolution with the given activation.
    pub fn same(act: Activation) -> Self {
        ConvSpec {
            stride: 1,
            groups: 1,
            padding: Padding::Same,
            act,
        }
    }
    pub fn with_stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }
    pub fn with_groups(mut self, groups: usize) -> Self {
        self.groups = groups;
        self
    }
}

/// The operations the EfficientDet forward pass is made of. Activations are 4-D NCHW.
///
/// Implementations must produce the same numbers as the CPU reference up to their storage
/// precision (f32 for the CPU, FP16 storage with FP32 accumulation for CUDA).
pub trait Backend: Send + Sync {
    /// The engine's tensor handle (host memory, device memory, ...).
    type Tensor: Send + Sync;

    /// A short name: `cpu`, `cuda`, ...
    fn name(&self) -> &'static str;

    /// The model code announces which part of the network the next ops belong to (`stem`,
    /// `stage3`, `bifpn.cell2.node5`, `class_head`, ...). Engines ignore it; the profiler
    /// ([`profile::Profiler`]) files its timings under it.
    fn section(&self, _name: &str) {}

    /// Copies a host tensor (weights or an input batch) to the engine.
    fn upload(&self, t: &Tensor) -> Result<Self::Tensor>;

    /// Copies an engine tensor back to the host.
    fn download(&self, t: &Self::Tensor) -> Result<Tensor>;

    /// The tensor's shape.
    fn shape(&self, t: &Self::Tensor) -> Vec<usize>;

    /// `act(conv(x, weight) + bias) + residual`.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        spec: ConvSpec,
        residual: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;

    /// `act(x * scale[c] + shift[c])`: batch norm in inference form (un-folded BN).
    fn channel_affine(
        &self,
        x: &Self::Tensor,
        scale: &Self::Tensor,
        shift: &Self::Tensor,
        act: Activation,
    ) -> Result<Self::Tensor>;

    /// `act(x)`.
    fn activation(&self, x: &Self::Tensor, act: Activation) -> Result<Self::Tensor>;

    /// Mean over H and W: `[N, C, H, W] -> [N, C, 1, 1]`.
    fn global_avg_pool(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// `x * s` with `s` of shape `[N, C, 1, 1]` broadcast over H and W (squeeze-excitation).
    fn scale_channels(&self, x: &Self::Tensor, s: &Self::Tensor) -> Result<Self::Tensor>;

    /// Elementwise `a + b` (same shapes).
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// Max pooling with a `kernel` x `kernel` window, TF-SAME padding with -inf.
    fn max_pool_same(&self, x: &Self::Tensor, kernel: usize, stride: usize)
    -> Result<Self::Tensor>;

    /// Nearest-neighbour resize to `height` x `width` (PyTorch `nearest`: src = floor(dst * in / out)).
    fn upsample_nearest(
        &self,
        x: &Self::Tensor,
        height: usize,
        width: usize,
    ) -> Result<Self::Tensor>;

    /// `act(sum_i weights[i] * xs[i])`: the BiFPN's fast normalised fusion, with the weights
    /// already normalised (`relu(w_i) / (sum relu(w) + 1e-4)`) by the caller.
    fn weighted_sum(
        &self,
        xs: &[&Self::Tensor],
        weights: &[f32],
        act: Activation,
    ) -> Result<Self::Tensor>;
}
