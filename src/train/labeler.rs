//! Anchor labeling, exactly as effdet 0.4.1's `AnchorLabeler` (`effdet/anchors.py`) with its
//! `TargetAssigner`, `IouSimilarity`, `ArgMaxMatcher` and `FasterRcnnBoxCoder`
//! (`effdet/object_detection/`).
//!
//! For one image with `G` ground-truth boxes and the `M` anchors of [`Anchors`]:
//!
//! 1. IoU matrix `[G, M]` in f32, in effdet's operation order: intersection height
//!    `clamp(min(ymax_g, ymax_a) - max(ymin_g, ymin_a), 0)` (same for width), areas
//!    `(ymax - ymin) * (xmax - xmin)`, union `(area_g + area_a) - inter`, IoU `inter / union`
//!    except exactly 0 where `inter == 0`.
//! 2. `ArgMaxMatcher(match_threshold, unmatched_threshold = match_threshold,
//!    negatives_lower_than_unmatched = True, force_match_for_each_row = True)`: every anchor takes
//!    its best ground truth (the FIRST maximum over ground truths, as `torch.max(dim=0)`);
//!    `best < threshold` -> unmatched (-1); there is no ignore band because both thresholds are
//!    equal. Then every ground truth `g` is force-matched to its best anchor (the FIRST maximum
//!    over anchors, as `torch.argmax(dim=1)`, so all-zero IoU rows land on anchor 0); when several
//!    ground truths force the same anchor, the lowest ground-truth index wins
//!    (`torch.max` over a boolean one-hot). Forced matches override the threshold result.
//! 3. Class target: `class - 1` (0-based) for matched anchors, `-1` for the rest (effdet gathers
//!    0 for unmatched and ignored anchors, then subtracts 1).
//! 4. Box target: `FasterRcnnBoxCoder()` with NO scale factors and `eps = 1e-7`, for matched
//!    anchors only, zeros elsewhere: with centres `c = min + size / 2` computed from the
//!    un-padded sizes, then `size += eps` for anchors and boxes,
//!    `[ty, tx, th, tw] = [(yc - yc_a) / h_a, (xc - xc_a) / w_a, ln(h / h_a), ln(w / w_a)]`,
//!    all in f32. Every value is bit-identical to effdet's except that `ln` is correctly
//!    rounded here while torch's f32 `log` (MKL VML on x86 builds) is not always: `th`/`tw` can
//!    differ from effdet's by 1 ulp (29 of the 416 `th`/`tw` codes of
//!    positive anchors in the 128x128 test fixture, 0 of 66 in the 512x512 one).
//! 5. `num_positives` = number of matched anchors.
//!
//! effdet's `filter_valid` (drop rows whose class is `<= -1`, i.e. the `-1` padding of its
//! collate function) is [`AnchorLabeler::label_padded`].
//!
//! Deliberate differences (inputs on which effdet produces garbage or crashes): class ids outside
//! `1..=num_classes` (effdet turns class 0 into a positive anchor with background class target
//! and fails in the loss for ids above `num_classes`), non-finite coordinates and inverted boxes
//! (`ymax < ymin` or `xmax < xmin`, whose box codes are NaN in effdet) are errors here.
//! Zero-size boxes are accepted and behave as in effdet (IoU 0 everywhere, forced onto the first
//! anchor).

use crate::error::{Error, Result};
use crate::postprocess::Anchors;

/// `FasterRcnnBoxCoder`'s `eps` (effdet `object_detection/box_coder.py` `EPS = 1e-7`), added to
/// anchor and ground-truth heights and widths before encoding (as an f32, like torch does).
pub const BOX_CODER_EPS: f32 = 1e-7;

/// Class target of an anchor matched to nothing (background): all classes are negatives.
pub const BACKGROUND: i32 = -1;

/// Class target of an ignored anchor (effdet's loss masks anchors whose target is `-2` out of
/// the class loss). [`AnchorLabeler`] never produces it (effdet's labeler does not either); the
/// loss accepts it in user-supplied targets.
pub const IGNORE: i32 = -2;

/// The training targets of one image, split by pyramid level (`min_level` first), in effdet's
/// layout (`AnchorLabeler.label_anchors` outputs, `cls_targets` cast to `i32`).
#[derive(Clone, Debug, PartialEq)]
pub struct LevelTargets {
    /// Class targets per level, row-major `[H, W, A]`: the 0-based class of the matched ground
    /// truth, [`BACKGROUND`] (-1) for unmatched anchors, or [`IGNORE`] (-2, only in
    /// user-supplied targets).
    pub cls: Vec<Vec<i32>>,
    /// Box regression targets per level, row-major `[H, W, A * 4]` with the codes of anchor `a`
    /// at `a * 4 .. a * 4 + 4` ordered `ty, tx, th, tw`; all zero for unmatched anchors.
    pub boxes: Vec<Vec<f32>>,
    /// Feature-map size `(H, W)` of each level.
    pub feat_sizes: Vec<(usize, usize)>,
    /// Anchors per feature-map position `A` (9 for D0).
    pub anchors_per_location: usize,
    /// Number of matched (positive) anchors.
    pub num_positives: usize,
}

impl LevelTargets {
    /// Number of pyramid levels.
    pub fn num_levels(&self) -> usize {
        self.feat_sizes.len()
    }

    /// Checks that every level's vectors have the lengths its feature size implies.
    pub fn check_shapes(&self) -> Result<()> {
        let a = self.anchors_per_location;
        if self.cls.len() != self.feat_sizes.len() || self.boxes.len() != self.feat_sizes.len() {
            return Err(Error::InvalidArgument(format!(
                "targets: {} class and {} box levels for {} feature sizes",
                self.cls.len(),
                self.boxes.len(),
                self.feat_sizes.len()
            )));
        }
        for (l, ((cls, boxes), &(h, w))) in self
            .cls
            .iter()
            .zip(&self.boxes)
            .zip(&self.feat_sizes)
            .enumerate()
        {
            let n = h
                .checked_mul(w)
                .and_then(|hw| hw.checked_mul(a))
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("targets: level {l} size {h}x{w} overflows"))
                })?;
            if cls.len() != n || boxes.len() != n * 4 {
                return Err(Error::InvalidArgument(format!(
                    "targets: level {l} ({h}x{w}, {a} anchors) has {} class targets and {} box \
                     targets, expected {n} and {}",
                    cls.len(),
                    boxes.len(),
                    n * 4
                )));
            }
        }
        Ok(())
    }
}

/// Anchor center/size representation used by the box coder, precomputed per anchor.
#[derive(Clone, Copy, Debug)]
struct AnchorCode {
    yc: f32,
    xc: f32,
    /// Height + eps.
    h: f32,
    /// Width + eps.
    w: f32,
}

/// effdet's `AnchorLabeler`: assigns class and box targets to every anchor from an image's
/// ground-truth boxes. See the [module documentation](self) for the exact rules.
#[derive(Clone, Debug)]
pub struct AnchorLabeler {
    boxes: Vec<[f32; 4]>,
    areas: Vec<f32>,
    codes: Vec<AnchorCode>,
    feat_sizes: Vec<(usize, usize)>,
    level_offsets: Vec<usize>,
    anchors_per_location: usize,
    num_classes: usize,
    match_threshold: f32,
}

/// `BoxList.get_center_coordinates_and_sizes` in f32: `(ycenter, xcenter, height, width)`.
fn center_size(b: &[f32; 4]) -> (f32, f32, f32, f32) {
    let height = b[2] - b[0];
    let width = b[3] - b[1];
    (b[0] + height / 2.0, b[1] + width / 2.0, height, width)
}

/// `region_similarity_calculator.area`: `(ymax - ymin) * (xmax - xmin)` in f32.
fn area(b: &[f32; 4]) -> f32 {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// effdet's pairwise IoU for one (ground truth, anchor) pair, same f32 operations and order.
#[inline]
fn iou(g: &[f32; 4], g_area: f32, a: &[f32; 4], a_area: f32) -> f32 {
    let ih = (g[2].min(a[2]) - g[0].max(a[0])).max(0.0);
    let iw = (g[3].min(a[3]) - g[1].max(a[1])).max(0.0);
    let inter = ih * iw;
    let union = (g_area + a_area) - inter;
    if inter == 0.0 { 0.0 } else { inter / union }
}

/// `ln(x)` for f32 correctly rounded (evaluated in f64, rounded once). torch's CPU `log` on f32
/// tensors (MKL VML `vsLn` in effdet's usual torch builds) is within 1 ulp of this but not
/// always equal: on 4M random inputs it differed in the last bit for 2.3% of them (libm's
/// `logf` differs from torch about as often). This choice is platform-independent.
fn ln_f32(x: f32) -> f32 {
    (x as f64).ln() as f32
}

impl AnchorLabeler {
    /// A labeler for `anchors` and `num_classes` classes (ground-truth ids `1..=num_classes`).
    /// `match_threshold` is effdet's `match_threshold` (0.5 in `DetBenchTrain`), used as both
    /// the matched and the unmatched threshold of the `ArgMaxMatcher`, compared in f32.
    ///
    /// Errors: `num_classes` 0 or above `i32::MAX`, a threshold that is not finite, no anchors.
    pub fn new(anchors: &Anchors, num_classes: usize, match_threshold: f32) -> Result<Self> {
        if num_classes == 0 || num_classes > i32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "anchor labeler: num_classes {num_classes} must be between 1 and 2^31 - 1"
            )));
        }
        if !match_threshold.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "anchor labeler: match_threshold {match_threshold} is not finite"
            )));
        }
        if anchors.is_empty() {
            return Err(Error::InvalidArgument("anchor labeler: no anchors".into()));
        }
        let boxes = anchors.boxes().to_vec();
        let areas = boxes.iter().map(area).collect();
        let codes = boxes
            .iter()
            .map(|b| {
                let (yc, xc, h, w) = center_size(b);
                AnchorCode {
                    yc,
                    xc,
                    h: h + BOX_CODER_EPS,
                    w: w + BOX_CODER_EPS,
                }
            })
            .collect();
        let level_offsets = (0..anchors.num_levels())
            .map(|l| anchors.level_offset(l).unwrap_or(0))
            .collect();
        Ok(AnchorLabeler {
            boxes,
            areas,
            codes,
            feat_sizes: anchors.feat_sizes().to_vec(),
            level_offsets,
            anchors_per_location: anchors.anchors_per_location(),
            num_classes,
            match_threshold,
        })
    }

    /// Number of classes (ground-truth ids are `1..=num_classes`).
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// The matching threshold.
    pub fn match_threshold(&self) -> f32 {
        self.match_threshold
    }

    /// Number of anchors labeled per image.
    pub fn num_anchors(&self) -> usize {
        self.boxes.len()
    }

    /// Labels the anchors of one image (effdet `label_anchors` on already-valid rows).
    ///
    /// `gt_boxes` are `[ymin, xmin, ymax, xmax]` in network-input pixels (effdet's `bbox`
    /// target after its transforms), `gt_classes` the 1-based class of each box. An empty list is
    /// valid: every anchor is background and `num_positives` is 0.
    ///
    /// Errors ([`Error::InvalidArgument`]): different lengths, a class outside
    /// `1..=num_classes`, a non-finite coordinate or area, an inverted box.
    pub fn label(&self, gt_boxes: &[[f32; 4]], gt_classes: &[u32]) -> Result<LevelTargets> {
        if gt_boxes.len() != gt_classes.len() {
            return Err(Error::InvalidArgument(format!(
                "anchor labeler: {} ground-truth boxes but {} classes",
                gt_boxes.len(),
                gt_classes.len()
            )));
        }
        for (i, (b, &c)) in gt_boxes.iter().zip(gt_classes).enumerate() {
            if c == 0 || c as usize > self.num_classes {
                return Err(Error::InvalidArgument(format!(
                    "anchor labeler: ground truth {i} has class {c}, expected 1..={}",
                    self.num_classes
                )));
            }
            if !b.iter().all(|v| v.is_finite()) || !area(b).is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "anchor labeler: ground truth {i} box {b:?} is not finite"
                )));
            }
            if b[2] < b[0] || b[3] < b[1] {
                return Err(Error::InvalidArgument(format!(
                    "anchor labeler: ground truth {i} box {b:?} is inverted (expected [ymin, \
                     xmin, ymax, xmax] with ymax >= ymin and xmax >= xmin)"
                )));
            }
        }
        let matches = self.match_anchors(gt_boxes);
        Ok(self.targets(gt_boxes, gt_classes, &matches))
    }

    /// Labels one image given effdet-style padded rows: rows whose class is `<= -1` are dropped
    /// first (effdet's `filter_valid`), the rest go to [`AnchorLabeler::label`] (so a remaining
    /// class outside `1..=num_classes`, including 0, is an error).
    pub fn label_padded(&self, gt_boxes: &[[f32; 4]], gt_classes: &[i64]) -> Result<LevelTargets> {
        if gt_boxes.len() != gt_classes.len() {
            return Err(Error::InvalidArgument(format!(
                "anchor labeler: {} ground-truth boxes but {} classes",
                gt_boxes.len(),
                gt_classes.len()
            )));
        }
        let mut boxes = Vec::with_capacity(gt_boxes.len());
        let mut classes = Vec::with_capacity(gt_classes.len());
        for (i, (b, &c)) in gt_boxes.iter().zip(gt_classes).enumerate() {
            if c <= -1 {
                continue;
            }
            let c = u32::try_from(c).map_err(|_| {
                Error::InvalidArgument(format!(
                    "anchor labeler: ground truth {i} has class {c}, expected 1..={}",
                    self.num_classes
                ))
            })?;
            boxes.push(*b);
            classes.push(c);
        }
        self.label(&boxes, &classes)
    }

    /// The matcher's result per anchor: `Some(ground-truth index)` or `None` (unmatched).
    fn match_anchors(&self, gt: &[[f32; 4]]) -> Vec<Option<usize>> {
        let m = self.boxes.len();
        let mut matches = vec![None; m];
        if gt.is_empty() {
            return matches;
        }
        let gt_areas: Vec<f32> = gt.iter().map(area).collect();
        // Per ground truth: (best IoU, first anchor reaching it).
        let mut row_best = vec![(f32::NEG_INFINITY, 0usize); gt.len()];
        let thr = self.match_threshold;
        for (j, (a, &a_area)) in self.boxes.iter().zip(&self.areas).enumerate() {
            let mut best = f32::NEG_INFINITY;
            let mut best_i = 0usize;
            for (i, (g, &g_area)) in gt.iter().zip(&gt_areas).enumerate() {
                let v = iou(g, g_area, a, a_area);
                // Strict comparisons keep the first maximum, like torch.max / torch.argmax.
                if v > best {
                    best = v;
                    best_i = i;
                }
                if v > row_best[i].0 {
                    row_best[i] = (v, j);
                }
            }
            // unmatched_threshold > v -> -1; matched_threshold > v >= unmatched -> -2 (empty
            // band: both thresholds are `thr`); ignored anchors get the same targets as
            // unmatched ones, so both are `None`.
            let below = thr > best;
            let between = best >= thr && thr > best;
            matches[j] = if below || between { None } else { Some(best_i) };
        }
        // Forced matches; iterating ground truths backwards leaves the lowest index on an
        // anchor that several ground truths force.
        for (i, &(_, j)) in row_best.iter().enumerate().rev() {
            matches[j] = Some(i);
        }
        matches
    }

    /// Class and box targets from the matches, split per level.
    fn targets(
        &self,
        gt: &[[f32; 4]],
        gt_classes: &[u32],
        matches: &[Option<usize>],
    ) -> LevelTargets {
        let gt_codes: Vec<(f32, f32, f32, f32)> = gt
            .iter()
            .map(|b| {
                let (yc, xc, h, w) = center_size(b);
                (yc, xc, h + BOX_CODER_EPS, w + BOX_CODER_EPS)
            })
            .collect();
        let a = self.anchors_per_location;
        let mut cls_levels = Vec::with_capacity(self.feat_sizes.len());
        let mut box_levels = Vec::with_capacity(self.feat_sizes.len());
        let mut num_positives = 0;
        for (&(h, w), &offset) in self.feat_sizes.iter().zip(&self.level_offsets) {
            let n = h * w * a;
            let mut cls = vec![BACKGROUND; n];
            let mut boxes = vec![0f32; n * 4];
            for (k, m) in matches[offset..offset + n].iter().enumerate() {
                let Some(i) = *m else { continue };
                num_positives += 1;
                // Classes are validated to 1..=num_classes, so this fits in i32.
                cls[k] = gt_classes[i] as i32 - 1;
                let an = &self.codes[offset + k];
                let (yc, xc, gh, gw) = gt_codes[i];
                let tx = (xc - an.xc) / an.w;
                let ty = (yc - an.yc) / an.h;
                let tw = ln_f32(gw / an.w);
                let th = ln_f32(gh / an.h);
                boxes[k * 4..k * 4 + 4].copy_from_slice(&[ty, tx, th, tw]);
            }
            cls_levels.push(cls);
            box_levels.push(boxes);
        }
        LevelTargets {
            cls: cls_levels,
            boxes: box_levels,
            feat_sizes: self.feat_sizes.clone(),
            anchors_per_location: a,
            num_positives,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postprocess::AnchorConfig;

    fn labeler(size: usize) -> AnchorLabeler {
        let anchors = Anchors::new(&AnchorConfig::d0().with_image_size(size, size)).unwrap();
        AnchorLabeler::new(&anchors, 90, 0.5).unwrap()
    }

    #[test]
    fn empty_ground_truth_is_all_background() {
        let l = labeler(128);
        let t = l.label(&[], &[]).unwrap();
        assert_eq!(t.num_positives, 0);
        assert_eq!(t.num_levels(), 5);
        t.check_shapes().unwrap();
        assert!(t.cls.iter().flatten().all(|&c| c == BACKGROUND));
        assert!(t.boxes.iter().flatten().all(|&v| v == 0.0));
        let padded = l.label_padded(&[[-1.0; 4], [-1.0; 4]], &[-1, -1]).unwrap();
        assert_eq!(padded, t);
    }

    #[test]
    fn exact_anchor_is_positive_with_zero_offsets() {
        let anchors = Anchors::new(&AnchorConfig::d0().with_image_size(128, 128)).unwrap();
        let l = AnchorLabeler::new(&anchors, 90, 0.5).unwrap();
        let idx = 100;
        let b = anchors.boxes()[idx];
        let t = l.label(&[b], &[7]).unwrap();
        assert!(t.num_positives >= 1);
        let cls0 = &t.cls[0];
        assert_eq!(cls0[idx], 6);
        assert_eq!(&t.boxes[0][idx * 4..idx * 4 + 4], &[0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn forced_match_below_threshold() {
        let l = labeler(128);
        // A 4x3 box: IoU with every anchor is far below 0.5, so only the forced match exists.
        let t = l.label(&[[100.0, 100.0, 104.0, 103.0]], &[5]).unwrap();
        assert_eq!(t.num_positives, 1);
        let pos: Vec<i32> = t
            .cls
            .iter()
            .flatten()
            .copied()
            .filter(|&c| c >= 0)
            .collect();
        assert_eq!(pos, vec![4]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let l = labeler(128);
        let b = [10.0, 10.0, 20.0, 20.0];
        assert!(matches!(l.label(&[b], &[]), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            l.label(&[b], &[0]),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            l.label(&[b], &[91]),
            Err(Error::InvalidArgument(_))
        ));
        assert!(l.label(&[b], &[90]).is_ok());
        assert!(matches!(
            l.label(&[[10.0, 10.0, 5.0, 20.0]], &[1]),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            l.label(&[[f32::NAN, 10.0, 20.0, 20.0]], &[1]),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            l.label(&[[0.0, 0.0, 3e38, 3e38]], &[1]),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            l.label_padded(&[b], &[0]),
            Err(Error::InvalidArgument(_))
        ));
        let anchors = Anchors::new(&AnchorConfig::d0()).unwrap();
        assert!(AnchorLabeler::new(&anchors, 0, 0.5).is_err());
        assert!(AnchorLabeler::new(&anchors, 90, f32::NAN).is_err());
    }
}
