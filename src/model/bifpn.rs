//! The BiFPN: P6/P7 made from P5, then `fpn_cell_repeats` cells, each node built generically from
//! the wiring table [`BIFPN_NODES`](crate::model::config::BIFPN_NODES).

use std::ops::Deref;

use crate::compute::{Activation, Backend};
use crate::error::{Error, Result};
use crate::model::config::{BIFPN_NODES, EfficientDetConfig};
use crate::model::layers::{Conv, ConvDef, Loader, SeparableConv};

/// A tensor that is either a feature map borrowed as-is or a freshly computed one.
enum MaybeOwned<'a, T> {
    Borrowed(&'a T),
    Owned(T),
}

impl<T> MaybeOwned<'_, T> {
    /// The computed tensor; an error if the resample turned out to be the identity (a map
    /// derived from another one, such as P6 from P5, must be new).
    fn into_owned(self, what: &str) -> Result<T> {
        match self {
            MaybeOwned::Owned(t) => Ok(t),
            MaybeOwned::Borrowed(_) => Err(Error::Shape {
                op: "bifpn",
                detail: format!("{what} resample produced no new tensor"),
            }),
        }
    }
}

impl<T> Deref for MaybeOwned<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            MaybeOwned::Borrowed(t) => t,
            MaybeOwned::Owned(t) => t,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spatial {
    Same,
    Down { kernel: usize, stride: usize },
    Up { height: usize, width: usize },
}

impl Spatial {
    /// effdet's rule: max-pool with stride `(in - 1) / out + 1` and kernel `stride + 1` when
    /// shrinking, nearest-neighbour to the target size when growing.
    fn between(from: (usize, usize), to: (usize, usize)) -> Result<Spatial> {
        if from == to {
            Ok(Spatial::Same)
        } else if from.0 > to.0 && from.1 > to.1 {
            let sh = (from.0 - 1) / to.0 + 1;
            let sw = (from.1 - 1) / to.1 + 1;
            if sh != sw {
                return Err(Error::InvalidArgument(format!(
                    "BiFPN downsampling {from:?} -> {to:?} needs unequal strides ({sh}, {sw})"
                )));
            }
            Ok(Spatial::Down {
                kernel: sh + 1,
                stride: sh,
            })
        } else {
            Ok(Spatial::Up {
                height: to.0,
                width: to.1,
            })
        }
    }
}

/// effdet's `ResampleFeatureMap`: an optional 1x1 conv + BN (when channels change), then
/// max-pool down or nearest up to the target resolution.
struct Resample<B: Backend> {
    conv: Option<Conv<B>>,
    spatial: Spatial,
}

impl<B: Backend> Resample<B> {
    /// Loads the resample at `prefix` (e.g. `fpn.cell.0.fnode.1.combine.resample.2`).
    fn load(
        ld: &Loader<'_, B>,
        prefix: &str,
        in_ch: usize,
        out_ch: usize,
        from: (usize, usize),
        to: (usize, usize),
    ) -> Result<Self> {
        let conv = if in_ch != out_ch {
            Some(ld.conv(ConvDef {
                conv: &format!("{prefix}.conv.conv"),
                in_ch,
                out_ch,
                kernel: 1,
                stride: 1,
                depthwise: false,
                bias: true,
                bn: Some(&format!("{prefix}.conv.bn")),
                act: Activation::None,
            })?)
        } else {
            None
        };
        Ok(Resample {
            conv,
            spatial: Spatial::between(from, to)?,
        })
    }

    fn forward<'t>(&self, be: &B, x: &'t B::Tensor) -> Result<MaybeOwned<'t, B::Tensor>> {
        let converted = match &self.conv {
            Some(c) => Some(c.forward(be, x, None)?),
            None => None,
        };
        let src = converted.as_ref().unwrap_or(x);
        Ok(match self.spatial {
            Spatial::Down { kernel, stride } => {
                MaybeOwned::Owned(be.max_pool_same(src, kernel, stride)?)
            }
            Spatial::Up { height, width } => {
                MaybeOwned::Owned(be.upsample_nearest(src, height, width)?)
            }
            Spatial::Same => match converted {
                Some(t) => MaybeOwned::Owned(t),
                None => MaybeOwned::Borrowed(x),
            },
        })
    }
}

/// One BiFPN node: resample each input, fast normalised fusion + swish, separable conv + BN.
struct Node<B: Backend> {
    inputs: Vec<(usize, Resample<B>)>,
    /// `relu(w_i) / (sum_j relu(w_j) + eps)`, computed once at load.
    weights: Vec<f32>,
    conv: SeparableConv<B>,
}

pub(crate) struct BiFpn<B: Backend> {
    p6: Resample<B>,
    p7: Resample<B>,
    cells: Vec<Vec<Node<B>>>,
    num_levels: usize,
}

impl<B: Backend> BiFpn<B> {
    pub(crate) fn load(ld: &Loader<'_, B>, cfg: &EfficientDetConfig) -> Result<Self> {
        let fc = cfg.fpn_channels;
        let sizes = cfg.feature_sizes();
        let size_of = |level: usize| sizes[level - cfg.min_level];
        let [c3, c4, c5] = cfg.backbone.feature_channels();
        let p6 = Resample::load(ld, "fpn.resample.3", c5, fc, size_of(5), size_of(6))?;
        let p7 = Resample::load(ld, "fpn.resample.4", fc, fc, size_of(6), size_of(7))?;

        let mut cells = Vec::with_capacity(cfg.fpn_cell_repeats);
        for ci in 0..cfg.fpn_cell_repeats {
            // (channels, level) of every feature a node can refer to, growing as nodes are added.
            let mut feats: Vec<(usize, usize)> = if ci == 0 {
                vec![(c3, 3), (c4, 4), (c5, 5), (fc, 6), (fc, 7)]
            } else {
                (3..=7).map(|l| (fc, l)).collect()
            };
            let mut nodes = Vec::with_capacity(BIFPN_NODES.len());
            for (ni, node) in BIFPN_NODES.iter().enumerate() {
                let p = format!("fpn.cell.{ci}.fnode.{ni}");
                let mut inputs = Vec::with_capacity(node.inputs.len());
                for &off in node.inputs {
                    let (ch, level) = *feats.get(off).ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "BiFPN node {ni} refers to missing input {off}"
                        ))
                    })?;
                    let r = Resample::load(
                        ld,
                        &format!("{p}.combine.resample.{off}"),
                        ch,
                        fc,
                        size_of(level),
                        size_of(node.level),
                    )?;
                    inputs.push((off, r));
                }
                let raw = ld.host(&format!("{p}.combine.edge_weights"), &[node.inputs.len()])?;
                let relu: Vec<f32> = raw.data().iter().map(|w| w.max(0.0)).collect();
                let denom = relu.iter().sum::<f32>() + cfg.fusion_eps;
                let weights = relu.iter().map(|w| w / denom).collect();
                let conv = ld.separable(
                    &format!("{p}.after_combine.conv"),
                    fc,
                    fc,
                    Some(&format!("{p}.after_combine.conv.bn")),
                    Activation::None,
                )?;
                nodes.push(Node {
                    inputs,
                    weights,
                    conv,
                });
                feats.push((fc, node.level));
            }
            cells.push(nodes);
        }
        Ok(BiFpn {
            p6,
            p7,
            cells,
            num_levels: cfg.num_levels(),
        })
    }

    /// `[P3, P4, P5]` from the backbone -> the last cell's `[P3, .., P7]`.
    pub(crate) fn forward(&self, be: &B, backbone: Vec<B::Tensor>) -> Result<Vec<B::Tensor>> {
        let mut feats = backbone;
        let p5 = feats.last().ok_or(Error::Shape {
            op: "bifpn",
            detail: "no backbone features".into(),
        })?;
        be.section("bifpn.p6p7");
        let p6 = self.p6.forward(be, p5)?.into_owned("P6")?;
        let p7 = self.p7.forward(be, &p6)?.into_owned("P7")?;
        feats.push(p6);
        feats.push(p7);
        for (ci, nodes) in self.cells.iter().enumerate() {
            for (ni, node) in nodes.iter().enumerate() {
                // A short string per node (24 a pass): nothing beside its convolutions.
                be.section(&format!("bifpn.cell{}.node{}", ci + 1, ni + 1));
                let resampled = node
                    .inputs
                    .iter()
                    .map(|(off, r)| r.forward(be, &feats[*off]))
                    .collect::<Result<Vec<_>>>()?;
                let refs: Vec<&B::Tensor> = resampled.iter().map(|t| &**t).collect();
                let fused = be.weighted_sum(&refs, &node.weights, Activation::Swish)?;
                drop(resampled);
                let out = node.conv.forward(be, &fused)?;
                feats.push(out);
            }
            // The cell's outputs are its last `num_levels` nodes; earlier maps are dropped here.
            let keep_from = feats.len() - self.num_levels;
            feats.drain(..keep_from);
        }
        Ok(feats)
    }
}
