//! COCO bounding-box evaluation, reproducing pycocotools' `COCOeval(gt, dt, iouType='bbox')`
//! followed by `evaluate()`, `accumulate()` and `summarize()`: the same 12 numbers (AP, AP50,
//! AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl), bit for bit on the committed fixtures.
//!
//! The rules, as pycocotools implements them (several are easy to get subtly wrong):
//!
//! - **What is evaluated.** Every image of the ground truth's `images` and every category of its
//!   `categories` (sorted, duplicates removed; pycocotools' `getImgIds()` / `getCatIds()`).
//!   Annotations and detections of other categories are silently left out. A detection of an
//!   image that is not in `images` is an error (pycocotools asserts).
//! - **Per image and category** the detections are sorted by score, best first, with a stable
//!   sort (numpy's mergesort on `-score`, so ties keep file order), and only the first 100 are
//!   kept. The limit is per image *and category*, not per image.
//! - **IoU** is computed in f64 on `[x, y, w, h]` boxes with no `+1` (the mask API's `bbIou`).
//!   For a crowd ground truth (`iscrowd` non-zero) the union is the detection's area alone, so
//!   the IoU is the fraction of the detection inside the crowd region.
//! - **Ignored ground truth.** A ground truth is ignored when it is a crowd, or when its area is
//!   outside the area range (bounds inclusive). The area is the annotation's `area` field (the
//!   segmentation's area in COCO, not the box's); w * h when the field is absent. The
//!   annotation's `ignore` field plays no part: pycocotools reads it and then overwrites it
//!   with `iscrowd` (`gt['ignore'] = 'iscrowd' in gt and gt['iscrowd']`).
//! - **Matching**, per IoU threshold `t` in `0.50:0.05:0.95` (numpy's `linspace` values, so the
//!   ninth is 0.8999999999999999), detections in score order, ground truths with the non-ignored
//!   ones first (stable): a detection takes the ground truth with the highest IoU `>= t` (on
//!   equal IoU the later one), skipping ground truths already matched unless they are crowds
//!   (a crowd absorbs any number of detections); once it holds a non-ignored match it stops at
//!   the first ignored ground truth. A detection matched to an ignored ground truth is ignored.
//!   An unmatched detection whose area (`w * h`) is outside the area range is ignored.
//! - **Annotation id 0.** pycocotools records a match as the ground truth's `id` and later
//!   tests it for truthiness, so a detection matched to an annotation whose id is 0 counts as
//!   a false positive (and that ground truth as missed). This is reproduced.
//! - **Accumulation** per category, area range and `maxDets` in {1, 10, 100}: the first
//!   `maxDets` detections of every image are merged in image-id order and stably sorted by
//!   score; ignored detections keep their place but count as neither true nor false positive.
//!   `recall = tp / npig`, `precision = tp / (tp + fp + eps)` with `eps = np.spacing(1)`
//!   (2^-52); precision is made non-increasing from the right, and sampled at the 101 recall
//!   thresholds `0:0.01:1` at the first index whose recall is `>=` the threshold (numpy's
//!   `searchsorted(side='left')`), 0 beyond the last recall reached. A category with no
//!   non-ignored ground truth in the area range gets -1 (left out of the means).
//! - **Summary**: each number is the mean of all entries `> -1` over IoU thresholds, recall
//!   thresholds and categories (AP) or IoU thresholds and categories (AR), -1 if there are
//!   none; the mean sums in numpy's pairwise order, so even the last bit agrees.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::detection::Detection;
use crate::error::{Error, Result};
use crate::train::coco::CocoAnnotations;

/// Maximum detections per image and category for the three recall columns (pycocotools'
/// `maxDets`); the last is also how many detections per image and category are evaluated.
pub const MAX_DETS: [usize; 3] = [1, 10, 100];

/// pycocotools' area ranges (`areaRng`, `areaRngLbl`): label, lower and upper bound (both
/// inclusive) in square pixels.
pub const AREA_RANGES: [(&str, f64, f64); 4] = [
    ("all", 0.0, 1e10),
    ("small", 0.0, 1024.0),
    ("medium", 1024.0, 9216.0),
    ("large", 9216.0, 1e10),
];

/// `np.spacing(1)`: the epsilon pycocotools adds to `tp + fp`.
const EPS: f64 = f64::EPSILON;

const NUM_IOU: usize = 10;
const NUM_REC: usize = 101;
const NUM_AREA: usize = AREA_RANGES.len();
const NUM_MAXDET: usize = MAX_DETS.len();

/// `np.linspace(start, stop, N)`: `i * step + start` with `step = (stop - start) / (N - 1)`,
/// and exactly `stop` last.
fn linspace<const N: usize>(start: f64, stop: f64) -> [f64; N] {
    let step = (stop - start) / (N - 1) as f64;
    let mut y = [0.0; N];
    for (i, v) in y.iter_mut().enumerate() {
        *v = i as f64 * step + start;
    }
    y[N - 1] = stop;
    y
}

/// The ten IoU thresholds, exactly as pycocotools' `np.linspace(.5, 0.95, 10)`.
pub fn iou_thresholds() -> [f64; NUM_IOU] {
    linspace(0.5, 0.95)
}

/// The 101 recall thresholds, exactly as pycocotools' `np.linspace(.0, 1.00, 101)`.
pub fn recall_thresholds() -> [f64; NUM_REC] {
    linspace(0.0, 1.0)
}

/// One detection in the COCO results format (an element of the JSON array pycocotools'
/// `loadRes` reads). Other fields (`id`, `area`, `segmentation`) are ignored, as `loadRes`
/// overwrites them.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
pub struct CocoDetection {
    pub image_id: u64,
    pub category_id: u64,
    /// `[x, y, width, height]` in image pixels.
    pub bbox: [f64; 4],
    pub score: f64,
}

impl CocoDetection {
    /// The results entry for a detector output on image `image_id`, converted as effdet's
    /// evaluator does: `[x1, y1, x2 - x1, y2 - y1]` computed in f32, category = `class_id`.
    pub fn from_detection(image_id: u64, d: &Detection) -> Self {
        CocoDetection {
            image_id,
            category_id: u64::from(d.class_id),
            bbox: [d.x1, d.y1, d.x2 - d.x1, d.y2 - d.y1].map(f64::from),
            score: f64::from(d.score),
        }
    }
}

/// A validated list of detections and where it came from (named in error messages).
#[derive(Clone, Debug)]
pub struct Detections {
    path: PathBuf,
    items: Vec<CocoDetection>,
}

impl Detections {
    /// Reads a COCO results file (a JSON array of `{image_id, category_id, bbox, score}`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_json(path, &crate::train::coco::read_json_text(path)?)
    }

    /// Parses a COCO results JSON string (`path` is used in messages).
    pub fn from_json(path: impl AsRef<Path>, text: &str) -> Result<Self> {
        let path = path.as_ref();
        let items: Vec<CocoDetection> =
            serde_json::from_str(text).map_err(|e| Error::Annotations {
                path: path.to_path_buf(),
                reason: format!(
                    "not a COCO results file (a JSON array of {{\"image_id\", \"category_id\", \
                     \"bbox\": [x, y, w, h], \"score\"}}): {e}"
                ),
            })?;
        Self::new(path, items)
    }

    /// Wraps detections made in memory; `source` names them in error messages. Every box must
    /// be finite with `w, h >= 0` and every score finite.
    pub fn new(source: impl Into<PathBuf>, items: Vec<CocoDetection>) -> Result<Self> {
        let path = source.into();
        for (i, d) in items.iter().enumerate() {
            let [_, _, w, h] = d.bbox;
            if !d.bbox.iter().all(|v| v.is_finite()) || w < 0.0 || h < 0.0 {
                return Err(Error::Annotations {
                    path,
                    reason: format!(
                        "detection #{i} (image {}) has an invalid bbox {:?} (need finite \
                         [x, y, w, h], w, h >= 0)",
                        d.image_id, d.bbox
                    ),
                });
            }
            if !d.score.is_finite() {
                return Err(Error::Annotations {
                    path,
                    reason: format!(
                        "detection #{i} (image {}) has a non-finite score {}",
                        d.image_id, d.score
                    ),
                });
            }
        }
        Ok(Detections { path, items })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn items(&self) -> &[CocoDetection] {
        &self.items
    }
}

/// pycocotools' `COCOeval.stats` for `iouType='bbox'`, in its order. Serialises as one JSON
/// object with the keys `AP`, `AP50`, `AP75`, `APs`, `APm`, `APl`, `AR1`, `AR10`, `AR100`,
/// `ARs`, `ARm`, `ARl`. A value is -1 when no category has ground truth for it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CocoStats {
    /// AP at IoU 0.50:0.95, all areas, 100 detections.
    #[serde(rename = "AP")]
    pub ap: f64,
    /// AP at IoU 0.50.
    #[serde(rename = "AP50")]
    pub ap50: f64,
    /// AP at IoU 0.75.
    #[serde(rename = "AP75")]
    pub ap75: f64,
    /// AP for small objects (area <= 32^2).
    #[serde(rename = "APs")]
    pub ap_small: f64,
    /// AP for medium objects (32^2 <= area <= 96^2).
    #[serde(rename = "APm")]
    pub ap_medium: f64,
    /// AP for large objects (area >= 96^2).
    #[serde(rename = "APl")]
    pub ap_large: f64,
    /// AR with at most 1 detection per image and category.
    #[serde(rename = "AR1")]
    pub ar1: f64,
    /// AR with at most 10 detections per image and category.
    #[serde(rename = "AR10")]
    pub ar10: f64,
    /// AR with at most 100 detections per image and category.
    #[serde(rename = "AR100")]
    pub ar100: f64,
    /// AR for small objects.
    #[serde(rename = "ARs")]
    pub ar_small: f64,
    /// AR for medium objects.
    #[serde(rename = "ARm")]
    pub ar_medium: f64,
    /// AR for large objects.
    #[serde(rename = "ARl")]
    pub ar_large: f64,
}

/// How pycocotools' `summarize()` computes and prints each stat: AP (else AR), IoU threshold
/// (else all), area range index, `MAX_DETS` index.
const SUMMARY: [(bool, Option<f64>, usize, usize); 12] = [
    (true, None, 0, 2),
    (true, Some(0.5), 0, 2),
    (true, Some(0.75), 0, 2),
    (true, None, 1, 2),
    (true, None, 2, 2),
    (true, None, 3, 2),
    (false, None, 0, 0),
    (false, None, 0, 1),
    (false, None, 0, 2),
    (false, None, 1, 2),
    (false, None, 2, 2),
    (false, None, 3, 2),
];

impl CocoStats {
    /// The stats' names in `COCOeval.stats` order (also their JSON keys).
    pub const NAMES: [&'static str; 12] = [
        "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
    ];

    /// The 12 values in `COCOeval.stats` order.
    pub fn to_array(&self) -> [f64; 12] {
        [
            self.ap,
            self.ap50,
            self.ap75,
            self.ap_small,
            self.ap_medium,
            self.ap_large,
            self.ar1,
            self.ar10,
            self.ar100,
            self.ar_small,
            self.ar_medium,
            self.ar_large,
        ]
    }

    /// Builds the stats from the 12 values in `COCOeval.stats` order.
    pub fn from_array(s: [f64; 12]) -> Self {
        CocoStats {
            ap: s[0],
            ap50: s[1],
            ap75: s[2],
            ap_small: s[3],
            ap_medium: s[4],
            ap_large: s[5],
            ar1: s[6],
            ar10: s[7],
            ar100: s[8],
            ar_small: s[9],
            ar_medium: s[10],
            ar_large: s[11],
        }
    }
}

/// The 12 lines pycocotools' `summarize()` prints, character for character.
impl fmt::Display for CocoStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (&(ap, iou, area, m), value)) in SUMMARY.iter().zip(self.to_array()).enumerate() {
            let (title, kind) = if ap {
                ("Average Precision", "(AP)")
            } else {
                ("Average Recall", "(AR)")
            };
            let iou = iou.map_or("0.50:0.95".to_string(), |t| format!("{t:.2}"));
            let area = AREA_RANGES[area].0;
            let max_det = MAX_DETS[m];
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                " {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6} | maxDets={max_det:>3} ] = {value:.3}"
            )?;
        }
        Ok(())
    }
}

/// The number of detections whose category is not in the ground truth's `categories`
/// (pycocotools leaves them out of the evaluation without a word).
pub fn detections_outside_categories(gt: &CocoAnnotations, dets: &Detections) -> usize {
    let cats: HashSet<u64> = gt.file().categories.iter().map(|c| c.id).collect();
    dets.items()
        .iter()
        .filter(|d| !cats.contains(&d.category_id))
        .count()
}

/// A ground truth as the evaluation sees it.
struct Gt {
    bbox: [f64; 4],
    area: f64,
    crowd: bool,
    /// Whether the annotation id is non-zero: pycocotools stores a match as the matched id and
    /// tests it for truthiness (see the module docs).
    id_nonzero: bool,
}

/// A detection as the evaluation sees it (`loadRes` sets `area = w * h`).
struct Dt {
    bbox: [f64; 4],
    area: f64,
    score: f64,
}

/// The ground truths and detections of one image and category. Detections are sorted best
/// first (stable) and cut to `MAX_DETS[2]`.
#[derive(Default)]
struct Cell {
    gts: Vec<Gt>,
    dts: Vec<Dt>,
}

/// The cells keyed (category index, image index).
type Cells = BTreeMap<(usize, usize), Cell>;

/// pycocotools' `evaluateImg` result for one image, category and area range, for all IoU
/// thresholds. `[t * D + d]` indexes threshold `t`, detection `d`.
struct ImgEval {
    scores: Vec<f64>,
    /// `dtMatches != 0`: matched to a ground truth with a non-zero id.
    matched: Vec<bool>,
    /// `dtIgnore`.
    ignored: Vec<bool>,
    /// Ground truths not ignored (`count_nonzero(gtIgnore == 0)`).
    num_gt: usize,
}

/// The mask API's `bbIou` for one detection and one ground truth box (`[x, y, w, h]`, f64, no
/// `+1`); for a crowd ground truth the union is the detection's area.
fn bbox_iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
    let w = (d[2] + d[0]).min(g[2] + g[0]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[3] + d[1]).min(g[3] + g[1]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let i = w * h;
    let da = d[2] * d[3];
    let u = if crowd { da } else { da + g[2] * g[3] - i };
    i / u
}

/// pycocotools' `evaluateImg` for one cell and area range `[lo, hi]`; `ious[d * G + g]` is the
/// IoU of detection `d` and ground truth `g` (in the cell's order).
fn evaluate_img(cell: &Cell, ious: &[f64], lo: f64, hi: f64, iou_thrs: &[f64]) -> ImgEval {
    let (num_g, num_d) = (cell.gts.len(), cell.dts.len());
    let ignore: Vec<bool> = cell
        .gts
        .iter()
        .map(|g| g.crowd || g.area < lo || g.area > hi)
        .collect();
    // Non-ignored ground truths first, otherwise in file order (a stable sort on the flag).
    let order: Vec<usize> = (0..num_g)
        .filter(|&g| !ignore[g])
        .chain((0..num_g).filter(|&g| ignore[g]))
        .collect();
    let mut matched = vec![false; NUM_IOU * num_d];
    let mut ignored = vec![false; NUM_IOU * num_d];
    // `gtMatches > 0`, per threshold and ground truth (in `order`).
    let mut gt_taken = vec![false; num_g];
    if num_d > 0 && num_g > 0 {
        for (t, &thr) in iou_thrs.iter().enumerate() {
            gt_taken.fill(false);
            for d in 0..num_d {
                let mut best = thr.min(1.0 - 1e-10);
                let mut m: Option<usize> = None;
                for (j, &g) in order.iter().enumerate() {
                    // Already matched and not a crowd: unavailable.
                    if gt_taken[j] && !cell.gts[g].crowd {
                        continue;
                    }
                    // Holding a real match: the ignored ground truths that follow cannot win.
                    if m.is_some_and(|mj| !ignore[order[mj]]) && ignore[g] {
                        break;
                    }
                    let iou = ious[d * num_g + g];
                    if iou < best {
                        continue;
                    }
                    best = iou;
                    m = Some(j);
                }
                if let Some(j) = m {
                    let g = order[j];
                    ignored[t * num_d + d] = ignore[g];
                    matched[t * num_d + d] = cell.gts[g].id_nonzero;
                    gt_taken[j] = true;
                }
            }
        }
    }
    // Unmatched (`dtMatches == 0`) detections outside the area range are ignored.
    for t in 0..NUM_IOU {
        for (d, dt) in cell.dts.iter().enumerate() {
            let k = t * num_d + d;
            if !matched[k] && (dt.area < lo || dt.area > hi) {
                ignored[k] = true;
            }
        }
    }
    ImgEval {
        scores: cell.dts.iter().map(|d| d.score).collect(),
        matched,
        ignored,
        num_gt: ignore.iter().filter(|&&i| !i).count(),
    }
}

/// numpy's pairwise summation of a contiguous f64 array (`np.add.reduce`, hence `np.mean`):
/// 8 interleaved accumulators for blocks of up to 128, halves (cut at a multiple of 8) above.
fn numpy_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for &x in a {
            res += x;
        }
        res
    } else if n <= 128 {
        let mut r = [0.0; 8];
        r.copy_from_slice(&a[..8]);
        let whole = n - n % 8;
        let mut i = 8;
        while i < whole {
            for (j, rj) in r.iter_mut().enumerate() {
                *rj += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[whole..] {
            res += x;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        numpy_sum(&a[..n2]) + numpy_sum(&a[n2..])
    }
}

/// `np.mean(s[s > -1])`, or -1 when nothing is left.
fn mean_defined(values: impl Iterator<Item = f64>) -> f64 {
    let kept: Vec<f64> = values.filter(|&v| v > -1.0).collect();
    if kept.is_empty() {
        -1.0
    } else {
        numpy_sum(&kept) / kept.len() as f64
    }
}

/// Evaluates `dets` against the ground truth `gt` as pycocotools' `COCOeval` with
/// `iouType='bbox'` and default parameters (see the module docs for the rules).
///
/// Errors (`Error::Annotations`, naming the file at fault): a ground-truth annotation without
/// an `id`, a repeated annotation id, a non-finite or negative `area`; a detection of an image
/// that is not in the ground truth's `images`. An empty `dets` is fine (AP 0 wherever there
/// is ground truth), where pycocotools' `loadRes` would crash.
pub fn evaluate(gt: &CocoAnnotations, dets: &Detections) -> Result<CocoStats> {
    let (cells, num_k) = index_cells(gt, dets)?;
    let iou_thrs = iou_thresholds();
    let mut acc = Accumulator::new(num_k);
    // pycocotools' loops: per category (`evaluateImg` per image and area range, then
    // `accumulate` over the category's images).
    let mut cells = cells.into_iter().peekable();
    while let Some(&((k, _), _)) = cells.peek() {
        let mut cat_cells = Vec::new();
        while let Some((_, cell)) = cells.next_if(|((kk, _), _)| *kk == k) {
            cat_cells.push(cell);
        }
        // `computeIoU`, once per image: ious[d * G + g].
        let ious: Vec<Vec<f64>> = cat_cells
            .iter()
            .map(|c| {
                c.dts
                    .iter()
                    .flat_map(|d| c.gts.iter().map(|g| bbox_iou(&d.bbox, &g.bbox, g.crowd)))
                    .collect()
            })
            .collect();
        for (a, &(_, lo, hi)) in AREA_RANGES.iter().enumerate() {
            let evals: Vec<ImgEval> = cat_cells
                .iter()
                .zip(&ious)
                .map(|(c, iou)| evaluate_img(c, iou, lo, hi, &iou_thrs))
                .collect();
            acc.accumulate(k, a, &evals);
        }
    }
    Ok(acc.summarize())
}

/// Validates the ground truth's ids and areas and groups what is evaluated into cells keyed
/// (category index, image index), in sorted id order (`np.unique`): iterating the map follows
/// pycocotools' loops. Only cells with a ground truth or a detection exist (the others are
/// `evaluateImg`'s `None`). Returns the cells and the number of categories.
fn index_cells(gt: &CocoAnnotations, dets: &Detections) -> Result<(Cells, usize)> {
    let file = gt.file();
    let gt_err = |reason: String| Error::Annotations {
        path: gt.path().to_path_buf(),
        reason,
    };
    let index = |mut ids: Vec<u64>| -> HashMap<u64, usize> {
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter().enumerate().map(|(i, id)| (id, i)).collect()
    };
    let img_index = index(file.images.iter().map(|im| im.id).collect());
    let cat_index = index(file.categories.iter().map(|c| c.id).collect());

    let mut cells = Cells::new();
    let mut seen_ids = HashSet::new();
    for (i, a) in file.annotations.iter().enumerate() {
        let id = a.id.ok_or_else(|| {
            gt_err(format!(
                "annotation #{i} (0-based) has no `id` (COCO evaluation needs annotation ids)"
            ))
        })?;
        if !seen_ids.insert(id) {
            return Err(gt_err(format!("annotation id {id} appears twice")));
        }
        let [_, _, w, h] = a.bbox;
        let area = a.area.unwrap_or(w * h);
        if !(area.is_finite() && area >= 0.0) {
            return Err(gt_err(format!(
                "annotation {id} has an invalid area {area} (need a finite value >= 0)"
            )));
        }
        // CocoAnnotations guarantees the image exists; other categories are not evaluated.
        let (Some(&k), Some(&im)) = (cat_index.get(&a.category_id), img_index.get(&a.image_id))
        else {
            continue;
        };
        cells.entry((k, im)).or_default().gts.push(Gt {
            bbox: a.bbox,
            area,
            crowd: a.iscrowd != 0,
            id_nonzero: id != 0,
        });
    }
    for (i, d) in dets.items().iter().enumerate() {
        let Some(&im) = img_index.get(&d.image_id) else {
            return Err(Error::Annotations {
                path: dets.path().to_path_buf(),
                reason: format!(
                    "detection #{i} (0-based) refers to image id {}, which is not in the ground \
                     truth's `images` ({})",
                    d.image_id,
                    gt.path().display()
                ),
            });
        };
        let Some(&k) = cat_index.get(&d.category_id) else {
            continue;
        };
        let [_, _, w, h] = d.bbox;
        cells.entry((k, im)).or_default().dts.push(Dt {
            bbox: d.bbox,
            area: w * h,
            score: d.score,
        });
    }
    for cell in cells.values_mut() {
        // Stable, best first: numpy's mergesort on -score. Scores are finite; -0.0 and 0.0
        // tie, as in numpy.
        cell.dts
            .sort_by(|a, b| b.score.partial_cmp(&a.score).unwrap_or(Ordering::Equal));
        cell.dts.truncate(MAX_DETS[NUM_MAXDET - 1]);
    }
    Ok((cells, cat_index.len()))
}

/// pycocotools' `accumulate()` results: `precision[t][r][k][a][m]` and `recall[t][k][a][m]`
/// (IoU threshold, recall threshold, category, area range, maxDets), -1 where a category has
/// no ground truth in an area range.
struct Accumulator {
    num_k: usize,
    precision: Vec<f64>,
    recall: Vec<f64>,
    rec_thrs: [f64; NUM_REC],
}

impl Accumulator {
    fn new(num_k: usize) -> Self {
        Accumulator {
            num_k,
            precision: vec![-1.0; NUM_IOU * NUM_REC * num_k * NUM_AREA * NUM_MAXDET],
            recall: vec![-1.0; NUM_IOU * num_k * NUM_AREA * NUM_MAXDET],
            rec_thrs: recall_thresholds(),
        }
    }

    fn p_index(&self, t: usize, r: usize, k: usize, a: usize, m: usize) -> usize {
        (((t * NUM_REC + r) * self.num_k + k) * NUM_AREA + a) * NUM_MAXDET + m
    }

    fn r_index(&self, t: usize, k: usize, a: usize, m: usize) -> usize {
        ((t * self.num_k + k) * NUM_AREA + a) * NUM_MAXDET + m
    }

    /// Precision and recall of category `k` in area range `a` for every maxDets, from its
    /// images' `evaluateImg` results (in image order).
    fn accumulate(&mut self, k: usize, a: usize, evals: &[ImgEval]) {
        let num_gt: usize = evals.iter().map(|e| e.num_gt).sum();
        if num_gt == 0 {
            return;
        }
        for (m, &max_det) in MAX_DETS.iter().enumerate() {
            // (score, image slot, detection): the first max_det of every image, merged in image
            // order, then a stable sort best first (numpy's mergesort on -score).
            let mut order: Vec<(f64, usize, usize)> = evals
                .iter()
                .enumerate()
                .flat_map(|(e, ev)| {
                    (0..ev.scores.len().min(max_det)).map(move |d| (ev.scores[d], e, d))
                })
                .collect();
            order.sort_by(|x, y| y.0.partial_cmp(&x.0).unwrap_or(Ordering::Equal));
            let nd = order.len();
            let mut rc = Vec::with_capacity(nd);
            let mut pr = Vec::with_capacity(nd);
            for t in 0..NUM_IOU {
                rc.clear();
                pr.clear();
                // Ignored detections keep their place but count as neither tp nor fp.
                let (mut tp, mut fp) = (0u64, 0u64);
                for &(_, e, d) in &order {
                    let ev = &evals[e];
                    let i = t * ev.scores.len() + d;
                    if !ev.ignored[i] {
                        if ev.matched[i] {
                            tp += 1;
                        } else {
                            fp += 1;
                        }
                    }
                    let (tpf, fpf) = (tp as f64, fp as f64);
                    rc.push(tpf / num_gt as f64);
                    pr.push(tpf / (fpf + tpf + EPS));
                }
                let ri = self.r_index(t, k, a, m);
                self.recall[ri] = rc.last().copied().unwrap_or(0.0);
                // The precision envelope: non-increasing from the right.
                for i in (1..nd).rev() {
                    if pr[i] > pr[i - 1] {
                        pr[i - 1] = pr[i];
                    }
                }
                for r in 0..NUM_REC {
                    // searchsorted(rc, thr, side='left'); rc is non-decreasing. Recall
                    // thresholds beyond the last recall reached get precision 0.
                    let thr = self.rec_thrs[r];
                    let i = rc.partition_point(|&x| x < thr);
                    let pi = self.p_index(t, r, k, a, m);
                    self.precision[pi] = if i < nd { pr[i] } else { 0.0 };
                }
            }
        }
    }

    /// pycocotools' `summarize()`: each stat is the mean of the defined (`> -1`) entries of its
    /// slice, in C order (IoU threshold, recall threshold, category).
    fn summarize(&self) -> CocoStats {
        let iou_thrs = iou_thresholds();
        let mut stats = [0.0; 12];
        for (s, &(ap, iou, a, m)) in stats.iter_mut().zip(&SUMMARY) {
            // `np.where(iouThr == p.iouThrs)`: an exact comparison, as pycocotools.
            let ts: Vec<usize> = (0..NUM_IOU)
                .filter(|&t| iou.is_none_or(|v| v == iou_thrs[t]))
                .collect();
            let num_k = self.num_k;
            *s = if ap {
                let idx = ts.iter().flat_map(|&t| {
                    (0..NUM_REC).flat_map(move |r| (0..num_k).map(move |k| (t, r, k)))
                });
                mean_defined(idx.map(|(t, r, k)| self.precision[self.p_index(t, r, k, a, m)]))
            } else {
                let idx = ts.iter().flat_map(|&t| (0..num_k).map(move |k| (t, k)));
                mean_defined(idx.map(|(t, k)| self.recall[self.r_index(t, k, a, m)]))
            };
        }
        CocoStats::from_array(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_numpy_linspace() {
        let t = iou_thresholds();
        assert_eq!(t[0], 0.5);
        assert_eq!(t[5], 0.75);
        assert_eq!(t[8], 0.8999999999999999);
        assert_eq!(t[9], 0.95);
        let r = recall_thresholds();
        assert_eq!(r[0], 0.0);
        assert_eq!(r[1], 0.01);
        assert_eq!(r[100], 1.0);
    }

    #[test]
    fn iou_matches_the_mask_api() {
        let g = [0.0, 0.0, 10.0, 10.0];
        assert_eq!(bbox_iou(&[0.0, 0.0, 10.0, 20.0], &g, false), 0.5);
        assert_eq!(bbox_iou(&[5.0, 0.0, 10.0, 10.0], &g, false), 50.0 / 150.0);
        // Crowd: fraction of the detection inside the region.
        assert_eq!(bbox_iou(&[5.0, 0.0, 10.0, 10.0], &g, true), 0.5);
        // Touching boxes and empty boxes do not overlap.
        assert_eq!(bbox_iou(&[10.0, 0.0, 5.0, 5.0], &g, false), 0.0);
        assert_eq!(bbox_iou(&[2.0, 2.0, 0.0, 5.0], &g, true), 0.0);
    }

    #[test]
    fn pairwise_sum_follows_numpy_blocking() {
        let a: Vec<f64> = (0..1000).map(|i| 1.0 / (i as f64 + 1.0)).collect();
        let exact: f64 = a.iter().sum();
        assert!((numpy_sum(&a) - exact).abs() < 1e-12);
        assert_eq!(numpy_sum(&a[..5]), a[..5].iter().sum::<f64>());
        assert_eq!(mean_defined([-1.0, -1.0].into_iter()), -1.0);
        assert_eq!(mean_defined([-1.0, 0.5, 1.0].into_iter()), 0.75);
    }
}
