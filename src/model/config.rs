//! Typed model configuration: EfficientDet's compound-scaled variants (D0 is the one implemented)
//! with the fields effdet's `tf_efficientdet_d*` configs carry.

use crate::error::{Error, Result};

/// One stage of the EfficientNet backbone (timm `tf_efficientnet` layout).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageConfig {
    /// Channel expansion of the inverted bottleneck (1 = depthwise-separable block, no expansion).
    pub expand_ratio: usize,
    /// Depthwise kernel size.
    pub kernel: usize,
    /// Stride of the stage's first block.
    pub stride: usize,
    pub out_channels: usize,
    pub repeats: usize,
    /// Squeeze-excitation channels = max(1, int(block_in_channels * se_ratio)).
    pub se_ratio: f64,
}

/// EfficientNet backbone: stem, then stages; the detector takes three stage outputs as P3..P5.
#[derive(Clone, Debug, PartialEq)]
pub struct BackboneConfig {
    pub name: &'static str,
    pub stem_channels: usize,
    pub stages: Vec<StageConfig>,
    /// Indices into `stages` whose outputs feed the BiFPN as P3, P4, P5.
    pub feature_stages: [usize; 3],
}

impl BackboneConfig {
    /// `tf_efficientnet_b0`.
    pub fn b0() -> Self {
        let s = |expand_ratio, kernel, stride, out_channels, repeats| StageConfig {
            expand_ratio,
            kernel,
            stride,
            out_channels,
            repeats,
            se_ratio: 0.25,
        };
        BackboneConfig {
            name: "tf_efficientnet_b0",
            stem_channels: 32,
            stages: vec![
                s(1, 3, 1, 16, 1),
                s(6, 3, 2, 24, 2),
                s(6, 5, 2, 40, 2),
                s(6, 3, 2, 80, 3),
                s(6, 5, 1, 112, 3),
                s(6, 5, 2, 192, 4),
                s(6, 3, 1, 320, 1),
            ],
            feature_stages: [2, 4, 6],
        }
    }

    /// Output channels of P3, P4, P5.
    pub fn feature_channels(&self) -> [usize; 3] {
        self.feature_stages.map(|i| self.stages[i].out_channels)
    }
}

/// One BiFPN node: fuses the features at `inputs` (offsets into the running list
/// `[P3, P4, P5, P6, P7, node0, node1, ...]`) at pyramid `level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FpnNode {
    pub level: usize,
    pub inputs: &'static [usize],
}

/// The BiFPN wiring for levels 3..7 (effdet's `bifpn_config`, fast attention): four top-down
/// nodes, then four bottom-up output nodes. A cell's outputs are its last five nodes (P3..P7).
pub const BIFPN_NODES: [FpnNode; 8] = [
    FpnNode {
        level: 6,
        inputs: &[3, 4],
    }, // P6td  = f(P6, up P7)
    FpnNode {
        level: 5,
        inputs: &[2, 5],
    }, // P5td  = f(P5, up P6td)
    FpnNode {
        level: 4,
        inputs: &[1, 6],
    }, // P4td  = f(P4, up P5td)
    FpnNode {
        level: 3,
        inputs: &[0, 7],
    }, // P3out = f(P3, up P4td)
    FpnNode {
        level: 4,
        inputs: &[1, 7, 8],
    }, // P4out = f(P4, P4td, down P3out)
    FpnNode {
        level: 5,
        inputs: &[2, 6, 9],
    }, // P5out = f(P5, P5td, down P4out)
    FpnNode {
        level: 6,
        inputs: &[3, 5, 10],
    }, // P6out = f(P6, P6td, down P5out)
    FpnNode {
        level: 7,
        inputs: &[4, 11],
    }, // P7out = f(P7, down P6out)
];

/// An EfficientDet variant. Field names and values follow effdet's model configs.
#[derive(Clone, Debug, PartialEq)]
pub struct EfficientDetConfig {
    pub name: &'static str,
    pub backbone: BackboneConfig,
    /// Network input (height, width).
    pub image_size: (usize, usize),
    pub num_classes: usize,
    pub min_level: usize,
    pub max_level: usize,
    pub num_scales: usize,
    pub aspect_ratios: Vec<(f64, f64)>,
    pub anchor_scale: f64,
    pub fpn_channels: usize,
    pub fpn_cell_repeats: usize,
    pub box_class_repeats: usize,
    /// Batch-norm epsilon everywhere (1e-3 in the TF-ported weights).
    pub bn_eps: f64,
    /// Fast-normalised-fusion epsilon.
    pub fusion_eps: f32,
}

impl EfficientDetConfig {
    /// `tf_efficientdet_d0`: 512x512, 64-channel BiFPN x3, 3 head repeats, 90 COCO classes.
    pub fn d0() -> Self {
        EfficientDetConfig {
            name: "tf_efficientdet_d0",
            backbone: BackboneConfig::b0(),
            image_size: (512, 512),
            num_classes: 90,
            min_level: 3,
            max_level: 7,
            num_scales: 3,
            aspect_ratios: vec![(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)],
            anchor_scale: 4.0,
            fpn_channels: 64,
            fpn_cell_repeats: 3,
            box_class_repeats: 3,
            bn_eps: 1e-3,
            fusion_eps: 1e-4,
        }
    }

    /// Compound-scaling parameters of D0..D7 as (image size, BiFPN width, BiFPN cells,
    /// head repeats, backbone). Only D0 can be built today; the rest document the family.
    pub const COMPOUND_SCALING: [(usize, usize, usize, usize, &'static str); 8] = [
        (512, 64, 3, 3, "tf_efficientnet_b0"),
        (640, 88, 4, 3, "tf_efficientnet_b1"),
        (768, 112, 5, 3, "tf_efficientnet_b2"),
        (896, 160, 6, 4, "tf_efficientnet_b3"),
        (1024, 224, 7, 4, "tf_efficientnet_b4"),
        (1280, 288, 7, 4, "tf_efficientnet_b5"),
        (1280, 384, 8, 5, "tf_efficientnet_b6"),
        (1536, 384, 8, 5, "tf_efficientnet_b6"),
    ];

    /// The config for `tf_efficientdet_d{variant}`. Errors for variants whose backbone is not
    /// implemented yet (everything but D0).
    pub fn variant(variant: usize) -> Result<Self> {
        match variant {
            0 => Ok(Self::d0()),
            1..=7 => Err(Error::InvalidArgument(format!(
                "tf_efficientdet_d{variant} is not implemented yet (its backbone {} is config-only); use D0",
                Self::COMPOUND_SCALING[variant].4
            ))),
            _ => Err(Error::InvalidArgument(format!(
                "no EfficientDet variant d{variant}"
            ))),
        }
    }

    /// Anchors per feature-map position (scales x aspect ratios).
    pub fn anchors_per_location(&self) -> usize {
        self.num_scales * self.aspect_ratios.len()
    }

    pub fn num_levels(&self) -> usize {
        self.max_level - self.min_level + 1
    }

    /// Feature-map (height, width) per pyramid level min_level..=max_level for the input size:
    /// each level is `(prev - 1) / 2 + 1`, as effdet computes it.
    pub fn feature_sizes(&self) -> Vec<(usize, usize)> {
        let mut sizes = vec![self.image_size];
        for _ in 1..=self.max_level {
            let (h, w) = *sizes.last().unwrap_or(&self.image_size);
            sizes.push(((h - 1) / 2 + 1, (w - 1) / 2 + 1));
        }
        sizes[self.min_level..=self.max_level].to_vec()
    }
}
