//! Multi-level anchor boxes, bit-for-bit as effdet's `Anchors` (`effdet/anchors.py`).
//!
//! effdet computes the anchors in float64 with numpy and casts them to float32 once; this module
//! does the same arithmetic in the same order (including numpy's `arange` fill rule) and casts at
//! the end, so the anchors are identical to `Anchors(...).boxes` for any image size, not only for
//! sizes divisible by the largest stride.

use crate::error::{Error, Result};

/// Upper bound on the number of anchors [`Anchors::new`] accepts (2^28, about 4 GiB of boxes).
pub const MAX_ANCHORS: usize = 1 << 28;

/// Anchor generation parameters (the effdet config fields `min_level`, `max_level`,
/// `num_scales`, `aspect_ratios`, `anchor_scale`, `image_size`).
#[derive(Clone, Debug, PartialEq)]
pub struct AnchorConfig {
    /// First pyramid level (stride `2^min_level`), 3 for EfficientDet.
    pub min_level: usize,
    /// Last pyramid level (inclusive), 7 for EfficientDet.
    pub max_level: usize,
    /// Octave scales per level: sizes `2^(i / num_scales)` for `i in 0..num_scales`.
    pub num_scales: usize,
    /// `(x, y)` aspect multipliers applied to the base anchor size, in anchor order.
    pub aspect_ratios: Vec<(f64, f64)>,
    /// Base anchor size as a multiple of the level's stride.
    pub anchor_scale: f64,
    /// Network input size `(height, width)` in pixels.
    pub image_size: (usize, usize),
}

impl AnchorConfig {
    /// The `tf_efficientdet_d0` anchors: levels 3..=7, 3 scales, aspect ratios
    /// `(1, 1), (1.4, 0.7), (0.7, 1.4)`, anchor scale 4, 512x512 input (49,104 anchors).
    pub fn d0() -> Self {
        AnchorConfig {
            min_level: 3,
            max_level: 7,
            num_scales: 3,
            aspect_ratios: vec![(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)],
            anchor_scale: 4.0,
            image_size: (512, 512),
        }
    }

    /// The same anchors for another `(height, width)` input size.
    pub fn with_image_size(mut self, height: usize, width: usize) -> Self {
        self.image_size = (height, width);
        self
    }

    /// Number of pyramid levels, `max_level - min_level + 1` (0 if the range is empty).
    pub fn num_levels(&self) -> usize {
        (self.max_level + 1).saturating_sub(self.min_level)
    }

    /// Anchors per feature-map position: `num_scales * aspect_ratios.len()` (9 for D0).
    pub fn anchors_per_location(&self) -> usize {
        self.num_scales * self.aspect_ratios.len()
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument(format!("anchor config: {msg}")));
        if self.min_level > self.max_level {
            return bad(format!(
                "min_level {} is greater than max_level {}",
                self.min_level, self.max_level
            ));
        }
        if self.max_level > 30 {
            return bad(format!("max_level {} is larger than 30", self.max_level));
        }
        if self.num_scales == 0 {
            return bad("num_scales must be at least 1".into());
        }
        if self.aspect_ratios.is_empty() {
            return bad("aspect_ratios is empty".into());
        }
        if let Some(&(x, y)) = self
            .aspect_ratios
            .iter()
            .find(|(x, y)| !(x.is_finite() && y.is_finite() && *x > 0.0 && *y > 0.0))
        {
            return bad(format!(
                "aspect ratio ({x}, {y}) must be finite and positive"
            ));
        }
        if !(self.anchor_scale.is_finite() && self.anchor_scale > 0.0) {
            return bad(format!(
                "anchor_scale {} must be finite and positive",
                self.anchor_scale
            ));
        }
        let (h, w) = self.image_size;
        if h == 0 || w == 0 || h > (1 << 24) || w > (1 << 24) {
            return bad(format!(
                "image_size ({h}, {w}) must be between 1 and 2^24 on each side"
            ));
        }
        Ok(())
    }
}

impl Default for AnchorConfig {
    fn default() -> Self {
        Self::d0()
    }
}

/// Feature-map sizes `(height, width)` of levels `0..=max_level` for an input of `image_size`
/// `(height, width)`: level 0 is the image, each next level is `(prev - 1) / 2 + 1`
/// (effdet's `get_feat_sizes`, i.e. TensorFlow SAME-padded stride-2 reductions).
pub fn feat_sizes(image_size: (usize, usize), max_level: usize) -> Vec<(usize, usize)> {
    let mut sizes = Vec::with_capacity(max_level + 1);
    let mut size = image_size;
    sizes.push(size);
    for _ in 0..max_level {
        size = (
            size.0.saturating_sub(1) / 2 + 1,
            size.1.saturating_sub(1) / 2 + 1,
        );
        sizes.push(size);
    }
    sizes
}

/// numpy's `np.arange(start, stop, step)` for float64: length `ceil((stop - start) / step)`,
/// element 0 is `start`, element 1 is `start + step`, element `i >= 2` is `start + i * delta`
/// with `delta = (start + step) - start` (numpy's `DOUBLE_fill`).
fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if !(len.is_finite() && len > 0.0) {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// The anchor boxes of all levels, in effdet order: level, then feature-map row, then column,
/// then anchor (`octave * aspect_ratios.len() + aspect`). Boxes are `[ymin, xmin, ymax, xmax]`
/// in network-input pixels, computed in f64 and rounded to f32 like effdet's
/// `torch.from_numpy(anchor_boxes).float()`.
#[derive(Clone, Debug, PartialEq)]
pub struct Anchors {
    boxes: Vec<[f32; 4]>,
    feat_sizes: Vec<(usize, usize)>,
    level_offsets: Vec<usize>,
    anchors_per_location: usize,
    min_level: usize,
    image_size: (usize, usize),
}

impl Anchors {
    /// Generates the anchors for `cfg`. Fails with [`Error::InvalidArgument`] for an empty level
    /// range, zero scales, no aspect ratios, non-positive sizes or an image larger than 2^24.
    pub fn new(cfg: &AnchorConfig) -> Result<Anchors> {
        cfg.validate()?;
        let all_sizes = feat_sizes(cfg.image_size, cfg.max_level);
        let (img_h, img_w) = cfg.image_size;
        let per_loc = cfg.anchors_per_location();
        let total = all_sizes[cfg.min_level..]
            .iter()
            .try_fold(0usize, |t, &(h, w)| {
                t.checked_add(h.checked_mul(w)?.checked_mul(per_loc)?)
            })
            .filter(|&t| t <= MAX_ANCHORS)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "anchor config: more than {MAX_ANCHORS} anchors for image size {:?}",
                    cfg.image_size
                ))
            })?;
        let mut boxes = Vec::with_capacity(total);
        let mut level_sizes = Vec::with_capacity(cfg.num_levels());
        let mut level_offsets = Vec::with_capacity(cfg.num_levels());
        for (level, &(fh, fw)) in all_sizes.iter().enumerate().skip(cfg.min_level) {
            // effdet: stride = (feat_sizes[0][0] / float(feat_sizes[level][0]), ...)
            let stride_y = img_h as f64 / fh as f64;
            let stride_x = img_w as f64 / fw as f64;
            let xs = np_arange(stride_x / 2.0, img_w as f64, stride_x);
            let ys = np_arange(stride_y / 2.0, img_h as f64, stride_y);
            if xs.len() != fw || ys.len() != fh {
                return Err(Error::Shape {
                    op: "Anchors::new",
                    detail: format!(
                        "level {level}: anchor grid {}x{} does not match feature size {fh}x{fw}",
                        ys.len(),
                        xs.len()
                    ),
                });
            }
            // Half sizes per anchor, in effdet's config order (octave outer, aspect inner).
            let mut halves = Vec::with_capacity(per_loc);
            for octave in 0..cfg.num_scales {
                let octave_scale = octave as f64 / cfg.num_scales as f64;
                let mult = 2f64.powf(octave_scale);
                let base_x = cfg.anchor_scale * stride_x * mult;
                let base_y = cfg.anchor_scale * stride_y * mult;
                for &(aspect_x, aspect_y) in &cfg.aspect_ratios {
                    halves.push((base_y * aspect_y / 2.0, base_x * aspect_x / 2.0));
                }
            }
            level_offsets.push(boxes.len());
            level_sizes.push((fh, fw));
            for &y in &ys {
                for &x in &xs {
                    for &(hy, hx) in &halves {
                        boxes.push([
                            (y - hy) as f32,
                            (x - hx) as f32,
                            (y + hy) as f32,
                            (x + hx) as f32,
                        ]);
                    }
                }
            }
        }
        Ok(Anchors {
            boxes,
            feat_sizes: level_sizes,
            level_offsets,
            anchors_per_location: per_loc,
            min_level: cfg.min_level,
            image_size: cfg.image_size,
        })
    }

    /// All anchors, `[ymin, xmin, ymax, xmax]`, in effdet order (see [`Anchors`]).
    pub fn boxes(&self) -> &[[f32; 4]] {
        &self.boxes
    }

    /// Total number of anchors (49,104 for D0).
    pub fn len(&self) -> usize {
        self.boxes.len()
    }

    /// True when there are no anchors (never the case for a valid config).
    pub fn is_empty(&self) -> bool {
        self.boxes.is_empty()
    }

    /// Feature-map size `(height, width)` of each level, `min_level` first
    /// (64, 32, 16, 8, 4 for a 512x512 input).
    pub fn feat_sizes(&self) -> &[(usize, usize)] {
        &self.feat_sizes
    }

    /// Number of levels.
    pub fn num_levels(&self) -> usize {
        self.feat_sizes.len()
    }

    /// Index of the first anchor of level `level_index` (0 = `min_level`) in [`Anchors::boxes`].
    pub fn level_offset(&self, level_index: usize) -> Option<usize> {
        self.level_offsets.get(level_index).copied()
    }

    /// Anchors per feature-map position (9 for D0).
    pub fn anchors_per_location(&self) -> usize {
        self.anchors_per_location
    }

    /// The pyramid level of the first feature map (3 for D0).
    pub fn min_level(&self) -> usize {
        self.min_level
    }

    /// The network input size `(height, width)` the anchors were made for.
    pub fn image_size(&self) -> (usize, usize) {
        self.image_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_matches_numpy_rule() {
        assert_eq!(np_arange(4.0, 512.0, 8.0).len(), 64);
        assert_eq!(np_arange(4.0, 512.0, 8.0)[63], 508.0);
        assert!(np_arange(1.0, 0.0, 1.0).is_empty());
    }

    #[test]
    fn feat_sizes_odd() {
        assert_eq!(
            feat_sizes((100, 150), 3),
            vec![(100, 150), (50, 75), (25, 38), (13, 19)]
        );
    }
}
