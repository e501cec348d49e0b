//! EfficientNet backbone (timm `tf_efficientnet_b0` layout): stem, seven stages of MBConv blocks
//! with squeeze-excitation; returns the P3, P4 and P5 feature maps.

use crate::compute::{Activation, Backend};
use crate::error::Result;
use crate::model::config::BackboneConfig;
use crate::model::layers::{Conv, ConvDef, Loader};

/// Squeeze-excitation: global mean -> 1x1 reduce + swish -> 1x1 expand + sigmoid -> scale.
struct SqueezeExcite<B: Backend> {
    reduce: Conv<B>,
    expand: Conv<B>,
}

impl<B: Backend> SqueezeExcite<B> {
    fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let s = be.global_avg_pool(x)?;
        let s = self.reduce.forward(be, &s, None)?;
        let s = self.expand.forward(be, &s, None)?;
        be.scale_channels(x, &s)
    }
}

/// An inverted-residual block (or, with no expansion, a depthwise-separable block).
struct MbConv<B: Backend> {
    expand: Option<Conv<B>>,
    depthwise: Conv<B>,
    se: SqueezeExcite<B>,
    project: Conv<B>,
    residual: bool,
}

impl<B: Backend> MbConv<B> {
    fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let h = match &self.expand {
            Some(e) => e.forward(be, x, None)?,
            None => self.depthwise.forward(be, x, None)?,
        };
        let h = if self.expand.is_some() {
            self.depthwise.forward(be, &h, None)?
        } else {
            h
        };
        let h = self.se.forward(be, &h)?;
        self.project
            .forward(be, &h, if self.residual { Some(x) } else { None })
    }
}

/// Section names of the stages, for [`Backend::section`].
const STAGES: [&str; 7] = [
    "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7",
];

pub(crate) struct Backbone<B: Backend> {
    stem: Conv<B>,
    stages: Vec<Vec<MbConv<B>>>,
    feature_stages: [usize; 3],
}

impl<B: Backend> Backbone<B> {
    pub(crate) fn load(ld: &Loader<'_, B>, cfg: &BackboneConfig) -> Result<Self> {
        let swish = Activation::Swish;
        let stem = ld.conv(ConvDef {
            conv: "backbone.conv_stem",
            in_ch: 3,
            out_ch: cfg.stem_channels,
            kernel: 3,
            stride: 2,
            depthwise: false,
            bias: false,
            bn: Some("backbone.bn1"),
            act: swish,
        })?;
        let mut in_ch = cfg.stem_channels;
        let mut stages = Vec::with_capacity(cfg.stages.len());
        for (si, st) in cfg.stages.iter().enumerate() {
            let mut blocks = Vec::with_capacity(st.repeats);
            for bi in 0..st.repeats {
                let p = format!("backbone.blocks.{si}.{bi}");
                let stride = if bi == 0 { st.stride } else { 1 };
                let mid = in_ch * st.expand_ratio;
                let se_ch = ((in_ch as f64 * st.se_ratio) as usize).max(1);
                // Key names differ between the expanded block (conv_pw, bn1, conv_dw, bn2,
                // conv_pwl, bn3) and timm's DepthwiseSeparableConv (conv_dw, bn1, conv_pw, bn2).
                let (expand, dw_bn, proj_conv, proj_bn) = if st.expand_ratio != 1 {
                    let e = ld.conv(ConvDef {
                        conv: &format!("{p}.conv_pw"),
                        in_ch,
                        out_ch: mid,
                        kernel: 1,
                        stride: 1,
                        depthwise: false,
                        bias: false,
                        bn: Some(&format!("{p}.bn1")),
                        act: swish,
                    })?;
                    (Some(e), "bn2", "conv_pwl", "bn3")
                } else {
                    (None, "bn1", "conv_pw", "bn2")
                };
                let depthwise = ld.conv(ConvDef {
                    conv: &format!("{p}.conv_dw"),
                    in_ch: mid,
                    out_ch: mid,
                    kernel: st.kernel,
                    stride,
                    depthwise: true,
                    bias: false,
                    bn: Some(&format!("{p}.{dw_bn}")),
                    act: swish,
                })?;
                let se = SqueezeExcite {
                    reduce: ld.conv(ConvDef {
                        conv: &format!("{p}.se.conv_reduce"),
                        in_ch: mid,
                        out_ch: se_ch,
                        kernel: 1,
                        stride: 1,
                        depthwise: false,
                        bias: true,
                        bn: None,
                        act: swish,
                    })?,
                    expand: ld.conv(ConvDef {
                        conv: &format!("{p}.se.conv_expand"),
                        in_ch: se_ch,
                        out_ch: mid,
                        kernel: 1,
                        stride: 1,
                        depthwise: false,
                        bias: true,
                        bn: None,
                        act: Activation::Sigmoid,
                    })?,
                };
                let project = ld.conv(ConvDef {
                    conv: &format!("{p}.{proj_conv}"),
                    in_ch: mid,
                    out_ch: st.out_channels,
                    kernel: 1,
                    stride: 1,
                    depthwise: false,
                    bias: false,
                    bn: Some(&format!("{p}.{proj_bn}")),
                    act: Activation::None,
                })?;
                blocks.push(MbConv {
                    expand,
                    depthwise,
                    se,
                    project,
                    residual: stride == 1 && in_ch == st.out_channels,
                });
                in_ch = st.out_channels;
            }
            stages.push(blocks);
        }
        Ok(Backbone {
            stem,
            stages,
            feature_stages: cfg.feature_stages,
        })
    }

    /// `[N, 3, H, W]` -> `[P3, P4, P5]`.
    pub(crate) fn forward(&self, be: &B, x: &B::Tensor) -> Result<Vec<B::Tensor>> {
        let mut feats: Vec<B::Tensor> = Vec::with_capacity(3);
        // `cur` is None right after a feature map was moved into `feats`: the next block then
        // reads it from there, so no tensor is ever copied.
        be.section("stem");
        let mut cur = Some(self.stem.forward(be, x, None)?);
        for (si, blocks) in self.stages.iter().enumerate() {
            be.section(STAGES.get(si).copied().unwrap_or("stage"));
            for b in blocks {
                let input = cur.as_ref().or(feats.last()).ok_or(crate::Error::Shape {
                    op: "backbone",
                    detail: "no input tensor".into(),
                })?;
                cur = Some(b.forward(be, input)?);
            }
            if self.feature_stages.contains(&si) {
                feats.extend(cur.take());
            }
        }
        Ok(feats)
    }
}
