//! Building blocks shared by the backbone, BiFPN and heads: a convolution with its batch norm
//! folded in at load time, and the loader that reads and folds weights by effdet key names.

use crate::compute::{Activation, Backend, ConvSpec, Padding, Tensor};
use crate::error::Result;
use crate::model::weights::WeightStore;

/// A convolution whose bias already includes any following batch norm:
/// `act(conv(x) * s + (b - mean) * s + beta)` with `s = gamma / sqrt(var + eps)`.
pub(crate) struct Conv<B: Backend> {
    weight: B::Tensor,
    bias: Option<B::Tensor>,
    spec: ConvSpec,
}

impl<B: Backend> Conv<B> {
    pub(crate) fn forward(
        &self,
        be: &B,
        x: &B::Tensor,
        residual: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        be.conv2d(x, &self.weight, self.bias.as_ref(), self.spec, residual)
    }
}

/// A depthwise convolution followed by a pointwise one (batch norm folded into the pointwise).
pub(crate) struct SeparableConv<B: Backend> {
    pub(crate) dw: Conv<B>,
    pub(crate) pw: Conv<B>,
}

impl<B: Backend> SeparableConv<B> {
    pub(crate) fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let y = self.dw.forward(be, x, None)?;
        self.pw.forward(be, &y, None)
    }
}

/// What a convolution to load looks like.
pub(crate) struct ConvDef<'a> {
    /// Key prefix of the convolution, e.g. `backbone.conv_stem` (`.weight`, `.bias` appended).
    pub conv: &'a str,
    pub in_ch: usize,
    pub out_ch: usize,
    pub kernel: usize,
    pub stride: usize,
    pub depthwise: bool,
    /// Whether the convolution has its own bias tensor.
    pub bias: bool,
    /// Key prefix of a following batch norm to fold, e.g. `backbone.bn1`.
    pub bn: Option<&'a str>,
    pub act: Activation,
}

/// Reads tensors by effdet key names, folds batch norms, uploads to the backend.
pub(crate) struct Loader<'a, B: Backend> {
    pub backend: &'a B,
    pub store: &'a WeightStore,
    pub bn_eps: f64,
}

impl<B: Backend> Loader<'_, B> {
    pub(crate) fn host(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        self.store.take(key, shape)
    }

    pub(crate) fn conv(&self, d: ConvDef<'_>) -> Result<Conv<B>> {
        let in_per_group = if d.depthwise { 1 } else { d.in_ch };
        let mut weight = self.host(
            &format!("{}.weight", d.conv),
            &[d.out_ch, in_per_group, d.kernel, d.kernel],
        )?;
        let mut bias = if d.bias {
            Some(self.host(&format!("{}.bias", d.conv), &[d.out_ch])?)
        } else {
            None
        };
        if let Some(bn) = d.bn {
            let c = [d.out_ch];
            let gamma = self.host(&format!("{bn}.weight"), &c)?;
            let beta = self.host(&format!("{bn}.bias"), &c)?;
            let mean = self.host(&format!("{bn}.running_mean"), &c)?;
            let var = self.host(&format!("{bn}.running_var"), &c)?;
            let per_out = weight.len() / d.out_ch;
            let mut folded_bias = vec![0f32; d.out_ch];
            for (o, fb) in folded_bias.iter_mut().enumerate() {
                let s = gamma.data()[o] as f64 / (var.data()[o] as f64 + self.bn_eps).sqrt();
                for w in &mut weight.data_mut()[o * per_out..(o + 1) * per_out] {
                    *w = (*w as f64 * s) as f32;
                }
                let b = bias.as_ref().map_or(0.0, |b| b.data()[o] as f64);
                *fb = ((b - mean.data()[o] as f64) * s + beta.data()[o] as f64) as f32;
            }
            bias = Some(Tensor::new(vec![d.out_ch], folded_bias)?);
        }
        Ok(Conv {
            weight: self.backend.upload(&weight)?,
            bias: bias.map(|b| self.backend.upload(&b)).transpose()?,
            spec: ConvSpec {
                stride: d.stride,
                groups: if d.depthwise { d.in_ch } else { 1 },
                padding: Padding::Same,
                act: d.act,
            },
        })
    }

    /// effdet's `SeparableConv2d`: `{prefix}.conv_dw` (no bias) then `{prefix}.conv_pw` (bias),
    /// with the batch norm at `bn` folded into the pointwise convolution.
    pub(crate) fn separable(
        &self,
        prefix: &str,
        in_ch: usize,
        out_ch: usize,
        bn: Option<&str>,
        act: Activation,
    ) -> Result<SeparableConv<B>> {
        Ok(SeparableConv {
            dw: self.conv(ConvDef {
                conv: &format!("{prefix}.conv_dw"),
                in_ch,
                out_ch: in_ch,
                kernel: 3,
                stride: 1,
                depthwise: true,
                bias: false,
                bn: None,
                act: Activation::None,
            })?,
            pw: self.conv(ConvDef {
                conv: &format!("{prefix}.conv_pw"),
                in_ch,
                out_ch,
                kernel: 1,
                stride: 1,
                depthwise: false,
                bias: true,
                bn,
                act,
            })?,
        })
    }
}
