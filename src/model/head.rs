//! Class and box heads: weights shared across pyramid levels, batch norm per level (folded into
//! a per-level copy of each pointwise convolution at load).

use crate::compute::{Activation, Backend};
use crate::error::Result;
use crate::model::config::EfficientDetConfig;
use crate::model::layers::{Loader, SeparableConv};

pub(crate) struct Head<B: Backend> {
    /// `levels[level][repeat]`: the shared separable conv with that level's BN folded in.
    levels: Vec<Vec<SeparableConv<B>>>,
    predict: SeparableConv<B>,
}

impl<B: Backend> Head<B> {
    /// Loads `class_net` or `box_net` (`prefix`) predicting `outputs_per_anchor` values per anchor.
    pub(crate) fn load(
        ld: &Loader<'_, B>,
        cfg: &EfficientDetConfig,
        prefix: &str,
        outputs_per_anchor: usize,
    ) -> Result<Self> {
        let fc = cfg.fpn_channels;
        let mut levels = Vec::with_capacity(cfg.num_levels());
        for level in 0..cfg.num_levels() {
            let mut reps = Vec::with_capacity(cfg.box_class_repeats);
            for i in 0..cfg.box_class_repeats {
                reps.push(ld.separable(
                    &format!("{prefix}.conv_rep.{i}"),
                    fc,
                    fc,
                    Some(&format!("{prefix}.bn_rep.{i}.{level}.bn")),
                    Activation::Swish,
                )?);
            }
            levels.push(reps);
        }
        let predict = ld.separable(
            &format!("{prefix}.predict"),
            fc,
            cfg.anchors_per_location() * outputs_per_anchor,
            None,
            Activation::None,
        )?;
        Ok(Head { levels, predict })
    }

    /// Per-level features -> per-level raw outputs `[N, A * outputs_per_anchor, H, W]`.
    pub(crate) fn forward(&self, be: &B, feats: &[B::Tensor]) -> Result<Vec<B::Tensor>> {
        feats
            .iter()
            .zip(&self.levels)
            .map(|(x, reps)| {
                let mut h: Option<B::Tensor> = None;
                for conv in reps {
                    h = Some(conv.forward(be, h.as_ref().unwrap_or(x))?);
                }
                self.predict.forward(be, h.as_ref().unwrap_or(x))
            })
            .collect()
    }
}
