//! Non-maximum suppression, replicating the reference implementations operation by operation:
//! torchvision's CPU `nms` kernel and `batched_nms` (both of its dispatch paths) for hard NMS,
//! and effdet's `batched_soft_nms` (Gaussian) for soft NMS.
//!
//! All functions take boxes as `[x1, y1, x2, y2]` f32, one score per box and a 0-based class
//! index per box, and return indices into those slices, best first.
//!
//! Ties: boxes are ranked by score descending with a stable sort, so equal scores keep their
//! input order (torchvision's kernel sorts with `stable=true`; effdet's soft-NMS `argmax` takes
//! the first maximum). The final re-sort of torchvision's per-class path uses a non-stable
//! `torch.sort`, whose order among exactly equal scores is unspecified; here it is stable
//! (lower input index first). NaN scores rank above every number.

use crate::error::{Error, Result};

/// torchvision's `batched_nms` on CPU switches from the coordinate-offset trick to a per-class
/// loop when `boxes.numel() > 4000`, i.e. above this many boxes.
pub const TORCHVISION_CPU_VANILLA_MIN_BOXES: usize = 1001;

/// The f64 threshold torchvision compares against: its kernel receives the Python float
/// (a double) and compares `float iou > double threshold`. An f32 threshold such as `0.3f32` is
/// mapped back to the shortest decimal that round-trips (`0.3`), i.e. the value a Python caller
/// would have written.
pub(crate) fn threshold_f64(t: f32) -> f64 {
    t.to_string().parse::<f64>().unwrap_or(t as f64)
}

fn check_lengths(op: &str, boxes: usize, scores: usize, classes: usize) -> Result<()> {
    if boxes != scores || boxes != classes {
        return Err(Error::InvalidArgument(format!(
            "{op}: {boxes} boxes, {scores} scores and {classes} classes must have the same length"
        )));
    }
    Ok(())
}

/// Descending order for scores with NaN first (largest), equal values equal.
#[inline]
fn desc(a: f32, b: f32) -> std::cmp::Ordering {
    use super::topk::order_key;
    order_key(b).cmp(&order_key(a))
}

/// Indices `0..scores.len()` sorted by score descending, stable (torchvision:
/// `scores.sort(stable=True, descending=True)`).
fn order_by_score(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| desc(scores[a], scores[b]));
    order
}

/// torchvision's CPU `nms` kernel on one set of boxes (no classes): visit boxes by score
/// descending (stable), keep a box unless an already kept box overlaps it with
/// `IoU > iou_threshold`, where `IoU = inter / (area_i + area_j - inter)` in f32 and
/// `area = (x2 - x1) * (y2 - y1)`. Stops after `max_keep` boxes are kept (the kept prefix does
/// not depend on later boxes, so this is exact). Returns kept indices, best first.
pub fn nms_single(
    boxes: &[[f32; 4]],
    scores: &[f32],
    iou_threshold: f32,
    max_keep: usize,
) -> Result<Vec<usize>> {
    if boxes.len() != scores.len() {
        return Err(Error::InvalidArgument(format!(
            "nms_single: {} boxes but {} scores",
            boxes.len(),
            scores.len()
        )));
    }
    Ok(nms_kernel(
        boxes,
        scores,
        threshold_f64(iou_threshold),
        max_keep,
    ))
}

fn nms_kernel(boxes: &[[f32; 4]], scores: &[f32], thr: f64, max_keep: usize) -> Vec<usize> {
    let order = order_by_score(scores);
    let areas: Vec<f32> = boxes
        .iter()
        .map(|b| (b[2] - b[0]) * (b[3] - b[1]))
        .collect();
    let mut suppressed = vec![false; boxes.len()];
    let mut keep = Vec::new();
    for (oi, &i) in order.iter().enumerate() {
        if keep.len() >= max_keep {
            break;
        }
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let [ix1, iy1, ix2, iy2] = boxes[i];
        let iarea = areas[i];
        for &j in &order[oi + 1..] {
            if suppressed[j] {
                continue;
            }
            let b = boxes[j];
            // std::max / std::min semantics: max(a, b) = a < b ? b : a.
            let xx1 = if ix1 < b[0] { b[0] } else { ix1 };
            let yy1 = if iy1 < b[1] { b[1] } else { iy1 };
            let xx2 = if b[2] < ix2 { b[2] } else { ix2 };
            let yy2 = if b[3] < iy2 { b[3] } else { iy2 };
            let w = if 0.0 < xx2 - xx1 { xx2 - xx1 } else { 0.0 };
            let h = if 0.0 < yy2 - yy1 { yy2 - yy1 } else { 0.0 };
            let inter = w * h;
            let ovr = inter / (iarea + areas[j] - inter);
            if ovr as f64 > thr {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// Hard NMS per class: torchvision's `_batched_nms_vanilla` (what `batched_nms` runs on CPU for
/// more than 1000 boxes, e.g. effdet's 5000 candidates). Each class runs [`nms_single`] on its
/// boxes in input order; the kept boxes of all classes are then ordered by score descending
/// (ties: lower index first). At most `max_keep` indices are returned (the best ones).
pub fn nms_hard(
    boxes: &[[f32; 4]],
    scores: &[f32],
    classes: &[u32],
    iou_threshold: f32,
    max_keep: usize,
) -> Result<Vec<usize>> {
    check_lengths("nms_hard", boxes.len(), scores.len(), classes.len())?;
    let thr = threshold_f64(iou_threshold);
    // Group indices by class, each group in ascending index order.
    let mut by_class: Vec<usize> = (0..boxes.len()).collect();
    by_class.sort_by_key(|&i| classes[i]);
    let mut kept = Vec::new();
    let mut sub_boxes = Vec::new();
    let mut sub_scores = Vec::new();
    for group in by_class.chunk_by(|&a, &b| classes[a] == classes[b]) {
        sub_boxes.clear();
        sub_scores.clear();
        sub_boxes.extend(group.iter().map(|&i| boxes[i]));
        sub_scores.extend(group.iter().map(|&i| scores[i]));
        kept.extend(
            nms_kernel(&sub_boxes, &sub_scores, thr, max_keep)
                .into_iter()
                .map(|k| group[k]),
        );
    }
    // torch.where(keep_mask) is ascending; then sort by score descending.
    kept.sort_unstable();
    kept.sort_by(|&a, &b| desc(scores[a], scores[b]));
    kept.truncate(max_keep);
    Ok(kept)
}

/// effdet / torchvision class separation by coordinate offsets: every box is shifted by
/// `class * (max_coordinate + 1)` (all four coordinates, f32), where `max_coordinate` is the
/// largest coordinate of all boxes. Boxes with negative coordinates can still overlap a box of
/// the neighbouring class after the shift; that quirk is reproduced, not fixed.
pub fn offset_boxes_by_class(boxes: &[[f32; 4]], classes: &[u32]) -> Vec<[f32; 4]> {
    // torch.max propagates NaN.
    let max_coordinate = boxes.iter().flatten().fold(f32::NEG_INFINITY, |m, &v| {
        if m.is_nan() || v.is_nan() {
            f32::NAN
        } else if v > m {
            v
        } else {
            m
        }
    });
    let step = max_coordinate + 1.0;
    boxes
        .iter()
        .zip(classes)
        .map(|(b, &c)| {
            let off = c as f32 * step;
            [b[0] + off, b[1] + off, b[2] + off, b[3] + off]
        })
        .collect()
}

/// Hard NMS with torchvision's `_batched_nms_coordinate_trick` (what `batched_nms` runs on CPU
/// for at most 1000 boxes, and on CUDA up to 25,000): boxes are shifted apart per class by
/// [`offset_boxes_by_class`] and one [`nms_single`] runs over all of them. The shift costs f32
/// precision (IoU is computed on shifted coordinates), which this reproduces.
pub fn nms_hard_offset(
    boxes: &[[f32; 4]],
    scores: &[f32],
    classes: &[u32],
    iou_threshold: f32,
    max_keep: usize,
) -> Result<Vec<usize>> {
    check_lengths("nms_hard_offset", boxes.len(), scores.len(), classes.len())?;
    if boxes.is_empty() {
        return Ok(Vec::new());
    }
    let shifted = offset_boxes_by_class(boxes, classes);
    Ok(nms_kernel(
        &shifted,
        scores,
        threshold_f64(iou_threshold),
        max_keep,
    ))
}

/// `torchvision.ops.batched_nms` as it runs on CPU: [`nms_hard`] (per class) for more than 1000
/// boxes, [`nms_hard_offset`] (coordinate trick) otherwise.
pub fn batched_nms(
    boxes: &[[f32; 4]],
    scores: &[f32],
    classes: &[u32],
    iou_threshold: f32,
    max_keep: usize,
) -> Result<Vec<usize>> {
    if boxes.len() >= TORCHVISION_CPU_VANILLA_MIN_BOXES {
        nms_hard(boxes, scores, classes, iou_threshold, max_keep)
    } else {
        nms_hard_offset(boxes, scores, classes, iou_threshold, max_keep)
    }
}

/// effdet's `batched_soft_nms(method_gaussian=True)`: boxes are separated per class with
/// [`offset_boxes_by_class`], then repeatedly the highest (first, on ties) remaining score is
/// output with its current score, every remaining score is multiplied by
/// `exp(-iou^2 / sigma)` (IoU with the selected box, effdet's `pairwise_iou`), and boxes whose
/// score is no longer `> min_score` are dropped. Returns `(index, rescored score)` in selection
/// order (scores non-increasing), at most `max_keep` of them (exact: later steps do not change
/// earlier selections).
pub fn soft_nms_gaussian(
    boxes: &[[f32; 4]],
    scores: &[f32],
    classes: &[u32],
    sigma: f32,
    min_score: f32,
    max_keep: usize,
) -> Result<Vec<(usize, f32)>> {
    check_lengths(
        "soft_nms_gaussian",
        boxes.len(),
        scores.len(),
        classes.len(),
    )?;
    if !(sigma.is_finite() && sigma > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "soft_nms_gaussian: sigma {sigma} must be finite and positive"
        )));
    }
    if min_score.is_nan() {
        return Err(Error::InvalidArgument(
            "soft_nms_gaussian: min_score is NaN".into(),
        ));
    }
    if boxes.is_empty() {
        return Ok(Vec::new());
    }
    let shifted = offset_boxes_by_class(boxes, classes);
    // Remaining boxes, in input order: (index, box, area, current score).
    let mut remain: Vec<(usize, [f32; 4], f32, f32)> = shifted
        .iter()
        .zip(scores)
        .enumerate()
        .map(|(i, (b, &s))| (i, *b, (b[2] - b[0]) * (b[3] - b[1]), s))
        .collect();
    let mut out = Vec::new();
    while !remain.is_empty() && out.len() < max_keep {
        // torch.argmax: first maximum, NaN counts as the maximum.
        let mut top = 0;
        for (r, item) in remain.iter().enumerate().skip(1) {
            if desc(item.3, remain[top].3) == std::cmp::Ordering::Less {
                top = r;
            }
        }
        let (top_index, tb, top_area, top_score) = remain[top];
        out.push((top_index, top_score));
        let mut r = 0;
        remain.retain_mut(|item| {
            let this = r;
            r += 1;
            let b = item.1;
            // pairwise_iou: min(x2) - max(x1), min(y2) - max(y1), clamp(min=0), product.
            let w = tb[2].min(b[2]) - tb[0].max(b[0]);
            let h = tb[3].min(b[3]) - tb[1].max(b[1]);
            let w = if w < 0.0 { 0.0 } else { w };
            let h = if h < 0.0 { 0.0 } else { h };
            let inter = w * h;
            let iou = if inter > 0.0 {
                inter / (top_area + item.2 - inter)
            } else {
                0.0
            };
            // exp(-0 / sigma) is exactly 1: skip the exp for non-overlapping boxes.
            if iou != 0.0 {
                item.3 *= (-(iou * iou) / sigma).exp();
            }
            this != top && item.3 > min_score
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_roundtrip() {
        assert_eq!(threshold_f64(0.5), 0.5);
        assert_eq!(threshold_f64(0.3), 0.3);
        assert_eq!(threshold_f64(0.7), 0.7);
    }

    #[test]
    fn identical_boxes_keep_first() {
        let b = [[0.0, 0.0, 10.0, 10.0]; 3];
        let s = [0.5, 0.5, 0.5];
        assert_eq!(nms_single(&b, &s, 0.5, usize::MAX).unwrap(), vec![0]);
    }
}
