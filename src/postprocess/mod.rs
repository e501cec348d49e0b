//! Post-processing of the raw head outputs into detections: effdet's `DetBenchPredict`
//! (`_post_process` + `_batch_detection` / `generate_detections`), reproduced operation by
//! operation in f32 so that the result matches effdet 0.4.1 running on CPU.
//!
//! Pipeline for one image ([`postprocess`]), each stage public for reference tests:
//! 1. top-`max_detection_points` (anchor, class) logits over all levels ([`top_k_logits`]);
//! 2. decode those anchors' box codes to `[x1, y1, x2, y2]` and, with an [`ImageInfo`], clip
//!    them to the original image in network pixels ([`decode_candidates`], built on
//!    [`decode_box`] and [`clip_box`]);
//! 3. scores = [`sigmoid`]`(logit)`;
//! 4. NMS: hard ([`batched_nms`], torchvision's CPU dispatch between [`nms_hard`] and
//!    [`nms_hard_offset`]) or Gaussian soft-NMS ([`soft_nms_gaussian`]);
//! 5. keep the best `max_detections`, scale boxes by `img_scale`, class ids to 1-based;
//! 6. drop detections whose score is below `score_threshold` (effdet has no such step; the
//!    default 0.0 keeps everything). effdet pads to `max_detections` rows with zeros; this
//!    returns only the real detections.
//!
//! Tie rules (where effdet/torch leave the order unspecified): the top-k orders equal logits by
//! flat index `anchor * num_classes + class` ascending (lowest index wins at the k-th value);
//! NMS ranks equal scores in top-k order (stable sort), which torchvision's kernel and effdet's
//! soft-NMS `argmax` also do; only torchvision's final per-class re-sort is unstable in torch.
//! With distinct logits the selection and order are identical to effdet's.
//!
//! Numerics: every arithmetic step is the same f32 operation in the same order as in effdet /
//! torchvision. `exp` comes from the platform libm rather than torch's SLEEF kernels, so
//! sigmoid scores and soft-NMS decays can differ from torch by about 1 ulp (observed: at most
//! 3.2e-7 relative; boxes bit-identical on the fixtures).

mod anchors;
mod nms;
mod topk;

pub use anchors::{AnchorConfig, Anchors, MAX_ANCHORS, feat_sizes};
pub use nms::{
    TORCHVISION_CPU_VANILLA_MIN_BOXES, batched_nms, nms_hard, nms_hard_offset, nms_single,
    offset_boxes_by_class, soft_nms_gaussian,
};
pub use topk::{Candidate, top_k_logits};

use crate::error::{Error, Result};

/// Which suppression [`postprocess`] runs after decoding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NmsMethod {
    /// torchvision `batched_nms` (per class): a box is suppressed by a better box of the same
    /// class with IoU > `iou_threshold`. Dispatches like torchvision on CPU: per-class loop for
    /// more than 1000 candidates (the default 5000), coordinate-offset trick otherwise.
    Hard,
    /// effdet's Gaussian soft-NMS (per class, via coordinate offsets): each selected box decays
    /// the scores of the others by `exp(-iou^2 / sigma)`; boxes whose score falls to `min_score`
    /// or below are pruned. effdet (`soft_nms=True`) uses sigma 0.5, min_score 0.001.
    SoftGaussian {
        /// Gaussian width of the decay.
        sigma: f32,
        /// Pruning threshold (strictly greater survives).
        min_score: f32,
    },
}

impl NmsMethod {
    /// effdet's soft-NMS setting: sigma 0.5, min_score 0.001.
    pub const EFFDET_SOFT: NmsMethod = NmsMethod::SoftGaussian {
        sigma: 0.5,
        min_score: 0.001,
    };
}

/// Post-processing parameters (effdet config names in brackets).
#[derive(Clone, Debug, PartialEq)]
pub struct PostprocessConfig {
    /// Classes per anchor (`num_classes`), 90 for COCO.
    pub num_classes: usize,
    /// Logits kept by the top-k before decoding (`max_detection_points`), 5000.
    pub max_detection_points: usize,
    /// Detections kept after NMS (`max_det_per_image`), 100.
    pub max_detections: usize,
    /// IoU above which hard NMS suppresses, 0.5 (effdet hard-codes 0.5; unused by soft-NMS,
    /// like effdet's Gaussian mode).
    pub iou_threshold: f32,
    /// Detections scoring below this are dropped after NMS and the `max_detections` cut.
    /// 0.0 (default) keeps everything, like effdet.
    pub score_threshold: f32,
    /// Hard (default, effdet `soft_nms=False`) or Gaussian soft-NMS.
    pub nms: NmsMethod,
}

impl Default for PostprocessConfig {
    fn default() -> Self {
        PostprocessConfig {
            num_classes: 90,
            max_detection_points: 5000,
            max_detections: 100,
            iou_threshold: 0.5,
            score_threshold: 0.0,
            nms: NmsMethod::Hard,
        }
    }
}

impl PostprocessConfig {
    fn validate(&self) -> Result<()> {
        if self.num_classes == 0 {
            return Err(Error::InvalidArgument(
                "postprocess: num_classes must be at least 1".into(),
            ));
        }
        if self.iou_threshold.is_nan() {
            return Err(Error::InvalidArgument(
                "postprocess: iou_threshold is NaN".into(),
            ));
        }
        if self.score_threshold.is_nan() {
            return Err(Error::InvalidArgument(
                "postprocess: score_threshold is NaN".into(),
            ));
        }
        if let NmsMethod::SoftGaussian { sigma, min_score } = self.nms
            && (!(sigma.is_finite() && sigma > 0.0) || min_score.is_nan())
        {
            return Err(Error::InvalidArgument(format!(
                "postprocess: soft-NMS sigma {sigma} must be finite and positive and \
                 min_score {min_score} a number"
            )));
        }
        Ok(())
    }
}

/// One image's raw head output for one level, in the network's NCHW layout (batch index
/// already removed): `class` is `[A*K, H, W]` with channel = `anchor * K + class`; `boxes` is
/// `[A*4, H, W]` with channel = `anchor * 4 + (ty, tx, th, tw)`.
#[derive(Clone, Copy, Debug)]
pub struct LevelOutput<'a> {
    /// Class logits, `A * K * height * width` values.
    pub class: &'a [f32],
    /// Box codes, `A * 4 * height * width` values.
    pub boxes: &'a [f32],
    /// Feature-map height.
    pub height: usize,
    /// Feature-map width.
    pub width: usize,
}

/// How the network input relates to the original image (effdet's `img_info`): boxes are
/// clipped to `(orig_width, orig_height) / img_scale` in network pixels BEFORE NMS, then
/// multiplied by `img_scale`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImageInfo {
    /// Original pixels per network pixel (effdet `img_scale`, 1 / resize factor).
    pub img_scale: f32,
    /// Original image width (effdet `img_size[0]`).
    pub orig_width: f32,
    /// Original image height (effdet `img_size[1]`).
    pub orig_height: f32,
}

impl ImageInfo {
    /// The clip limits `(width, height) / img_scale` in network pixels, computed in f32.
    pub fn clip_size(&self) -> (f32, f32) {
        (
            self.orig_width / self.img_scale,
            self.orig_height / self.img_scale,
        )
    }

    fn validate(&self) -> Result<()> {
        let ok = |v: f32| v.is_finite() && v > 0.0;
        if !(ok(self.img_scale) && ok(self.orig_width) && ok(self.orig_height)) {
            return Err(Error::InvalidArgument(format!(
                "image info: img_scale {}, orig_width {} and orig_height {} must be finite and \
                 positive",
                self.img_scale, self.orig_width, self.orig_height
            )));
        }
        Ok(())
    }
}

/// One detection before label lookup: box `[x1, y1, x2, y2]` (original-image pixels when an
/// [`ImageInfo`] was given, network pixels otherwise), score, 1-based class id.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawDetection {
    /// `[x1, y1, x2, y2]`.
    pub bbox: [f32; 4],
    /// Sigmoid score (soft-NMS: the decayed score).
    pub score: f32,
    /// 1-based class id (effdet's `class + 1`).
    pub class_id: u32,
}

/// The IoU threshold as the NMS compares it: the f64 Python float effdet passes (e.g. exactly
/// 0.5, or 0.6 rather than f32's 0.60000002), parsed from the f32's shortest decimal form.
pub fn iou_threshold_f64(t: f32) -> f64 {
    nms::threshold_f64(t)
}

/// Sigmoid as torch computes it in f32: `1 / (1 + exp(-x))`.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Decodes one box exactly as effdet's `decode_box_outputs(output_xyxy=True)`: `code` is
/// `(ty, tx, th, tw)`, `anchor` is `[ymin, xmin, ymax, xmax]`; returns `[x1, y1, x2, y2]`.
#[inline]
pub fn decode_box(code: [f32; 4], anchor: [f32; 4]) -> [f32; 4] {
    let ycenter_a = (anchor[0] + anchor[2]) / 2.0;
    let xcenter_a = (anchor[1] + anchor[3]) / 2.0;
    let ha = anchor[2] - anchor[0];
    let wa = anchor[3] - anchor[1];
    let [ty, tx, th, tw] = code;
    let w = tw.exp() * wa;
    let h = th.exp() * ha;
    let ycenter = ty * ha + ycenter_a;
    let xcenter = tx * wa + xcenter_a;
    [
        xcenter - w / 2.0,
        ycenter - h / 2.0,
        xcenter + w / 2.0,
        ycenter + h / 2.0,
    ]
}

/// [`decode_box`] over slices of codes and anchors (same length).
pub fn decode_boxes(codes: &[[f32; 4]], anchors: &[[f32; 4]]) -> Result<Vec<[f32; 4]>> {
    if codes.len() != anchors.len() {
        return Err(Error::InvalidArgument(format!(
            "decode_boxes: {} codes but {} anchors",
            codes.len(),
            anchors.len()
        )));
    }
    Ok(codes
        .iter()
        .zip(anchors)
        .map(|(&c, &a)| decode_box(c, a))
        .collect())
}

/// effdet's `clip_boxes_xyxy`: `clamp(min=0)` then `min(size)` with size `(width, height)`
/// (NaN stays NaN, as in torch).
#[inline]
pub fn clip_box(b: [f32; 4], size: (f32, f32)) -> [f32; 4] {
    let lim = [size.0, size.1, size.0, size.1];
    let mut out = b;
    for (v, &m) in out.iter_mut().zip(&lim) {
        if *v < 0.0 {
            *v = 0.0;
        }
        if *v > m {
            *v = m;
        }
    }
    out
}

/// Checks `levels` against `anchors` and `num_classes`: level count, feature sizes, class and
/// box slice lengths. Returns the first mismatch as [`Error::InvalidArgument`].
pub fn validate_levels(
    levels: &[LevelOutput],
    anchors: &Anchors,
    num_classes: usize,
) -> Result<()> {
    check_levels(levels, anchors, Some(num_classes), true)
}

/// [`validate_levels`] with the class check (`Some(num_classes)`) and box check optional.
pub(crate) fn check_levels(
    levels: &[LevelOutput],
    anchors: &Anchors,
    num_classes: Option<usize>,
    check_boxes: bool,
) -> Result<()> {
    if levels.is_empty() {
        return Err(Error::InvalidArgument(
            "postprocess: no levels given".into(),
        ));
    }
    if num_classes == Some(0) {
        return Err(Error::InvalidArgument(
            "postprocess: num_classes must be at least 1".into(),
        ));
    }
    if levels.len() != anchors.num_levels() {
        return Err(Error::InvalidArgument(format!(
            "postprocess: {} levels given but the anchors have {}",
            levels.len(),
            anchors.num_levels()
        )));
    }
    let a = anchors.anchors_per_location();
    for (l, (level, &(fh, fw))) in levels.iter().zip(anchors.feat_sizes()).enumerate() {
        if (level.height, level.width) != (fh, fw) {
            return Err(Error::InvalidArgument(format!(
                "postprocess: level {l} is {}x{} but the anchors expect {fh}x{fw}",
                level.height, level.width
            )));
        }
        let hw = fh * fw;
        if let Some(k) = num_classes {
            let expected = a.saturating_mul(k).saturating_mul(hw);
            if level.class.len() != expected {
                return Err(Error::InvalidArgument(format!(
                    "postprocess: level {l} class output has {} values, expected {expected} \
                     ({a} anchors x {k} classes x {fh}x{fw})",
                    level.class.len(),
                )));
            }
        }
        if check_boxes && level.boxes.len() != a * 4 * hw {
            return Err(Error::InvalidArgument(format!(
                "postprocess: level {l} box output has {} values, expected {} \
                 ({a} anchors x 4 x {fh}x{fw})",
                level.boxes.len(),
                a * 4 * hw
            )));
        }
    }
    Ok(())
}

/// Reads the box codes of `candidates` from the NCHW box outputs, decodes them against their
/// anchors ([`decode_box`]) and, with `info`, clips them ([`clip_box`] to
/// [`ImageInfo::clip_size`]): effdet's `generate_detections` up to NMS. Returns one
/// `[x1, y1, x2, y2]` box in network pixels per candidate.
pub fn decode_candidates(
    levels: &[LevelOutput],
    anchors: &Anchors,
    candidates: &[Candidate],
    info: Option<ImageInfo>,
) -> Result<Vec<[f32; 4]>> {
    check_levels(levels, anchors, None, true)?;
    if let Some(info) = &info {
        info.validate()?;
    }
    let a = anchors.anchors_per_location();
    let offsets: Vec<usize> = (0..levels.len())
        .map(|l| anchors.level_offset(l).unwrap_or(0))
        .collect();
    let clip = info.map(|i| i.clip_size());
    let anchor_boxes = anchors.boxes();
    candidates
        .iter()
        .map(|c| {
            let anchor = anchor_boxes.get(c.anchor).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "decode_candidates: anchor {} out of range ({} anchors)",
                    c.anchor,
                    anchor_boxes.len()
                ))
            })?;
            // The anchor's level and position locate its 4 codes in the NCHW box tensor.
            let l = offsets.partition_point(|&o| o <= c.anchor) - 1;
            let level = &levels[l];
            let hw = level.height * level.width;
            let local = c.anchor - offsets[l];
            let (spatial, an) = (local / a, local % a);
            let idx = |j: usize| (an * 4 + j) * hw + spatial;
            let b = decode_box(std::array::from_fn(|j| level.boxes[idx(j)]), *anchor);
            Ok(match clip {
                Some(size) => clip_box(b, size),
                None => b,
            })
        })
        .collect()
}

/// Whole `DetBenchPredict` post-processing for one image: top-k over all levels' logits,
/// decode, clip (with `info`), sigmoid, NMS, keep `max_detections` (best first), scale by
/// `img_scale`, then drop `score < score_threshold`. Zero detections give an empty Vec (effdet
/// pads with zero rows instead).
///
/// Fails with [`Error::InvalidArgument`] when `levels` does not match `anchors` (count, sizes,
/// slice lengths) or a parameter is out of range; never panics.
pub fn postprocess(
    levels: &[LevelOutput],
    anchors: &Anchors,
    info: Option<ImageInfo>,
    cfg: &PostprocessConfig,
) -> Result<Vec<RawDetection>> {
    cfg.validate()?;
    if let Some(info) = &info {
        info.validate()?;
    }
    validate_levels(levels, anchors, cfg.num_classes)?;
    let cands = top_k_logits(levels, anchors, cfg.num_classes, cfg.max_detection_points)?;
    if cands.is_empty() || cfg.max_detections == 0 {
        return Ok(Vec::new());
    }
    let boxes = decode_candidates(levels, anchors, &cands, info)?;
    let scores: Vec<f32> = cands.iter().map(|c| sigmoid(c.logit)).collect();
    let classes: Vec<u32> = cands.iter().map(|c| c.class as u32).collect();

    let picked: Vec<(usize, f32)> = match cfg.nms {
        NmsMethod::Hard => batched_nms(
            &boxes,
            &scores,
            &classes,
            cfg.iou_threshold,
            cfg.max_detections,
        )?
        .into_iter()
        .map(|i| (i, scores[i]))
        .collect(),
        NmsMethod::SoftGaussian { sigma, min_score } => soft_nms_gaussian(
            &boxes,
            &scores,
            &classes,
            sigma,
            min_score,
            cfg.max_detections,
        )?,
    };

    let scale = info.map(|i| i.img_scale);
    Ok(picked
        .into_iter()
        .take(cfg.max_detections)
        .filter(|&(_, s)| s.partial_cmp(&cfg.score_threshold) != Some(std::cmp::Ordering::Less))
        .map(|(i, score)| {
            let mut bbox = boxes[i];
            if let Some(s) = scale {
                for v in &mut bbox {
                    *v *= s;
                }
            }
            RawDetection {
                bbox,
                score,
                class_id: classes[i] + 1,
            }
        })
        .collect())
}
