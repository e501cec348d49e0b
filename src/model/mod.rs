//! The EfficientDet network, written once against [`Backend`]: backbone -> BiFPN -> class and box
//! heads. It returns raw per-level outputs only; anchors, decoding and NMS live in
//! [`crate::postprocess`] (effdet's split between the model and its "bench" wrapper).

mod backbone;
mod bifpn;
pub mod config;
mod head;
mod layers;
pub mod weights;

pub use config::{BIFPN_NODES, BackboneConfig, EfficientDetConfig, FpnNode, StageConfig};
pub use weights::WeightStore;

use crate::compute::Backend;
use crate::error::{Error, Result};
use backbone::Backbone;
use bifpn::BiFpn;
use head::Head;
use layers::Loader;

/// Raw head outputs for one pyramid level: class logits `[N, A * classes, H, W]` and box codes
/// `[N, A * 4, H, W]` (channel = anchor * K + k, codes ordered ty, tx, th, tw).
pub struct LevelOutputs<T> {
    pub class: T,
    pub boxes: T,
}

/// An EfficientDet model with inference weights (batch norms folded) on backend `B`.
pub struct EfficientDet<B: Backend> {
    config: EfficientDetConfig,
    backbone: Backbone<B>,
    fpn: BiFpn<B>,
    class_head: Head<B>,
    box_head: Head<B>,
}

impl<B: Backend> EfficientDet<B> {
    /// Builds the network from effdet-named weights. Every tensor the model needs must be present
    /// with the right shape, and every tensor in the file must be used.
    pub fn load(backend: &B, store: &WeightStore, config: EfficientDetConfig) -> Result<Self> {
        let _span = tracing::info_span!("load_model", model = config.name).entered();
        let ld = Loader {
            backend,
            store,
            bn_eps: config.bn_eps,
        };
        let backbone = Backbone::load(&ld, &config.backbone)?;
        let fpn = BiFpn::load(&ld, &config)?;
        let class_head = Head::load(&ld, &config, "class_net", config.num_classes)?;
        let box_head = Head::load(&ld, &config, "box_net", 4)?;
        store.check_all_used()?;
        Ok(EfficientDet {
            config,
            backbone,
            fpn,
            class_head,
            box_head,
        })
    }

    pub fn config(&self) -> &EfficientDetConfig {
        &self.config
    }

    /// Normalised input `[N, 3, H, W]` (H, W = the config's image size) -> raw outputs per level.
    pub fn forward(&self, backend: &B, input: &B::Tensor) -> Result<Vec<LevelOutputs<B::Tensor>>> {
        let shape = backend.shape(input);
        let (h, w) = self.config.image_size;
        if shape.len() != 4 || shape[1] != 3 || shape[2] != h || shape[3] != w {
            return Err(Error::Shape {
                op: "EfficientDet::forward",
                detail: format!("input shape {shape:?}, expected [N, 3, {h}, {w}]"),
            });
        }
        let feats = {
            let _s = tracing::debug_span!("backbone").entered();
            self.backbone.forward(backend, input)?
        };
        let feats = {
            let _s = tracing::debug_span!("bifpn").entered();
            self.fpn.forward(backend, feats)?
        };
        let _s = tracing::debug_span!("heads").entered();
        backend.section("class_head");
        let class = self.class_head.forward(backend, &feats)?;
        backend.section("box_head");
        let boxes = self.box_head.forward(backend, &feats)?;
        Ok(class
            .into_iter()
            .zip(boxes)
            .map(|(class, boxes)| LevelOutputs { class, boxes })
            .collect())
    }
}
