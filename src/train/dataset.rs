//! A COCO-format detection dataset for training: the annotations file plus an image folder,
//! validated once when opened.
//!
//! What is checked, and what happens (default / `strict`):
//!
//! | problem | default | strict |
//! |---|---|---|
//! | annotations not JSON / not COCO, duplicate image ids | error | error |
//! | image folder missing | error | error |
//! | image file missing or not a readable PNG/JPEG header | image skipped | error |
//! | image size differs from the annotation's width/height | file's size used | error |
//! | annotation of an image id not in `images` | annotation skipped | error |
//! | category id not in `categories` | box skipped | error |
//! | box not finite or with negative size | box skipped | error |
//! | box narrower or lower than 1 px (effdet's parser drops these) | box skipped | error |
//! | box entirely outside its image | box skipped | error |
//! | box partly outside its image (by more than 1 px) | clipped | error |
//! | image without (usable) annotations | image skipped | error |
//! | no usable image at all | error | error |
//!
//! Crowd (`iscrowd: 1`) and `ignore` annotations are not training targets (effdet's parser puts
//! them aside); they are counted, never an error. Category ids map to contiguous classes
//! `1..=K` in increasing id order ([`Dataset::class_of_category`]); the names travel with the
//! model as a label file ([`Dataset::labels_file`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::train::coco::{CocoCategory, CocoFile};

/// One training image and its ground truth in image pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub path: PathBuf,
    pub image_id: u64,
    pub width: usize,
    pub height: usize,
    /// `[y1, x1, y2, x2]` in image pixels (effdet's order), clipped to the image.
    pub boxes: Vec<[f32; 4]>,
    /// Contiguous class per box, `1..=K`.
    pub classes: Vec<u32>,
}

/// What validation skipped or changed, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValidationReport {
    pub images_listed: usize,
    pub images_missing: usize,
    pub images_unreadable: usize,
    pub images_size_mismatch: usize,
    pub images_without_annotations: usize,
    pub annotations_listed: usize,
    pub annotations_unknown_image: usize,
    pub boxes_unknown_category: usize,
    pub boxes_invalid: usize,
    pub boxes_too_small: usize,
    pub boxes_outside: usize,
    pub boxes_clipped: usize,
    pub crowd_or_ignored: usize,
    /// Up to 5 examples per reason, e.g. `missing: images/000123.png`.
    pub examples: Vec<String>,
}

impl ValidationReport {
    /// Whether anything at all was skipped or changed (crowd boxes do not count).
    pub fn is_clean(&self) -> bool {
        self.images_missing
            + self.images_unreadable
            + self.images_size_mismatch
            + self.images_without_annotations
            + self.annotations_unknown_image
            + self.boxes_unknown_category
            + self.boxes_invalid
            + self.boxes_too_small
            + self.boxes_outside
            + self.boxes_clipped
            == 0
    }
}

impl fmt::Display for ValidationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} images, {} annotations listed",
            self.images_listed, self.annotations_listed
        )?;
        for (n, what) in [
            (self.images_missing, "images skipped: file missing"),
            (
                self.images_unreadable,
                "images skipped: not a readable PNG/JPEG",
            ),
            (
                self.images_size_mismatch,
                "images whose file size differs from width/height (file used)",
            ),
            (
                self.images_without_annotations,
                "images skipped: no usable annotations",
            ),
            (
                self.annotations_unknown_image,
                "annotations skipped: unknown image id",
            ),
            (
                self.boxes_unknown_category,
                "boxes skipped: unknown category id",
            ),
            (
                self.boxes_invalid,
                "boxes skipped: not finite or negative size",
            ),
            (
                self.boxes_too_small,
                "boxes skipped: under 1 px wide or high",
            ),
            (
                self.boxes_outside,
                "boxes skipped: entirely outside the image",
            ),
            (self.boxes_clipped, "boxes clipped to the image"),
            (
                self.crowd_or_ignored,
                "crowd/ignore annotations (not training targets)",
            ),
        ] {
            if n > 0 {
                writeln!(f, "  {n:>7} {what}")?;
            }
        }
        for e in &self.examples {
            writeln!(f, "  e.g. {e}")?;
        }
        Ok(())
    }
}

/// How strictly to validate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatasetOptions {
    /// Turn every skipped or changed item into an error.
    pub strict: bool,
}

/// A validated dataset.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub annotations: PathBuf,
    pub image_dir: PathBuf,
    pub samples: Vec<Sample>,
    /// Categories in class order: `categories[k - 1]` is class `k`.
    pub categories: Vec<CocoCategory>,
    pub report: ValidationReport,
}

struct Check<'a> {
    strict: bool,
    path: &'a Path,
    report: ValidationReport,
    per_reason: HashMap<&'static str, usize>,
}

impl Check<'_> {
    /// Records one problem: an error in strict mode, else counted (with a few examples).
    fn problem(&mut self, reason: &'static str, detail: String) -> Result<()> {
        if self.strict {
            return Err(Error::Annotations {
                path: self.path.to_path_buf(),
                reason: format!("{reason}: {detail} (--strict)"),
            });
        }
        let seen = self.per_reason.entry(reason).or_default();
        *seen += 1;
        if *seen <= 5 {
            self.report.examples.push(format!("{reason}: {detail}"));
        }
        Ok(())
    }
}

impl Dataset {
    /// Reads `annotations` (COCO JSON) with images under `image_dir` (`file_name`s are relative
    /// to it) and validates everything as the module docs describe.
    pub fn open(
        annotations: impl AsRef<Path>,
        image_dir: impl AsRef<Path>,
        opts: DatasetOptions,
    ) -> Result<Self> {
        let path = annotations.as_ref();
        let image_dir = image_dir.as_ref();
        let bad = |reason: String| Error::Annotations {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let file: CocoFile =
            serde_json::from_str(&text).map_err(|e| bad(format!("not COCO JSON: {e}")))?;
        if !image_dir.is_dir() {
            return Err(bad(format!(
                "image directory {} does not exist or is not a directory",
                image_dir.display()
            )));
        }
        if file.categories.is_empty() {
            return Err(bad(
                "no `categories`: cannot map category ids to classes".into()
            ));
        }
        let mut categories = file.categories.clone();
        categories.sort_by_key(|c| c.id);
        let mut class_of: HashMap<u64, u32> = HashMap::new();
        for (i, c) in categories.iter().enumerate() {
            if class_of.insert(c.id, i as u32 + 1).is_some() {
                return Err(bad(format!("category id {} appears twice", c.id)));
            }
        }

        let mut check = Check {
            strict: opts.strict,
            path,
            report: ValidationReport {
                images_listed: file.images.len(),
                annotations_listed: file.annotations.len(),
                ..ValidationReport::default()
            },
            per_reason: HashMap::new(),
        };
        let mut ids = HashSet::new();
        for im in &file.images {
            if !ids.insert(im.id) {
                return Err(bad(format!("image id {} appears twice", im.id)));
            }
        }
        let mut by_image: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, a) in file.annotations.iter().enumerate() {
            if ids.contains(&a.image_id) {
                by_image.entry(a.image_id).or_default().push(i);
            } else {
                check.report.annotations_unknown_image += 1;
                check.problem(
                    "unknown image id",
                    format!(
                        "annotation {} refers to image {}",
                        a.id.unwrap_or(i as u64),
                        a.image_id
                    ),
                )?;
            }
        }

        let mut samples = Vec::with_capacity(file.images.len());
        for im in &file.images {
            let img_path = image_dir.join(&im.file_name);
            if !img_path.is_file() {
                check.report.images_missing += 1;
                check.problem("missing image", img_path.display().to_string())?;
                continue;
            }
            let (w, h) = match image::image_dimensions(&img_path) {
                Ok((w, h)) if w > 0 && h > 0 => (w as usize, h as usize),
                Ok(_) => {
                    check.report.images_unreadable += 1;
                    check.problem(
                        "unreadable image",
                        format!("{}: zero size", img_path.display()),
                    )?;
                    continue;
                }
                Err(e) => {
                    check.report.images_unreadable += 1;
                    check.problem("unreadable image", format!("{}: {e}", img_path.display()))?;
                    continue;
                }
            };
            if im.width.is_some_and(|v| v as usize != w)
                || im.height.is_some_and(|v| v as usize != h)
            {
                check.report.images_size_mismatch += 1;
                check.problem(
                    "image size mismatch",
                    format!(
                        "{}: file is {w}x{h}, annotations say {}x{}",
                        img_path.display(),
                        im.width.unwrap_or(0),
                        im.height.unwrap_or(0)
                    ),
                )?;
            }
            let mut sample = Sample {
                path: img_path,
                image_id: im.id,
                width: w,
                height: h,
                boxes: Vec::new(),
                classes: Vec::new(),
            };
            for &ai in by_image.get(&im.id).into_iter().flatten() {
                let a = &file.annotations[ai];
                let aid = a.id.unwrap_or(ai as u64);
                if a.iscrowd != 0 || a.ignore {
                    check.report.crowd_or_ignored += 1;
                    continue;
                }
                let Some(&class) = class_of.get(&a.category_id) else {
                    check.report.boxes_unknown_category += 1;
                    check.problem(
                        "unknown category",
                        format!("annotation {aid}: category_id {}", a.category_id),
                    )?;
                    continue;
                };
                let [x, y, bw, bh] = a.bbox;
                if !(x.is_finite() && y.is_finite() && bw.is_finite() && bh.is_finite())
                    || bw < 0.0
                    || bh < 0.0
                {
                    check.report.boxes_invalid += 1;
                    check.problem("invalid box", format!("annotation {aid}: {:?}", a.bbox))?;
                    continue;
                }
                if bw < 1.0 || bh < 1.0 {
                    check.report.boxes_too_small += 1;
                    check.problem("box under 1 px", format!("annotation {aid}: {:?}", a.bbox))?;
                    continue;
                }
                let (wf, hf) = (w as f64, h as f64);
                let (x2, y2) = (x + bw, y + bh);
                if x2 <= 0.0 || y2 <= 0.0 || x >= wf || y >= hf {
                    check.report.boxes_outside += 1;
                    check.problem(
                        "box outside image",
                        format!("annotation {aid}: {:?} in a {w}x{h} image", a.bbox),
                    )?;
                    continue;
                }
                if x < -1.0 || y < -1.0 || x2 > wf + 1.0 || y2 > hf + 1.0 {
                    check.report.boxes_clipped += 1;
                    check.problem(
                        "box partly outside image",
                        format!("annotation {aid}: {:?} in a {w}x{h} image", a.bbox),
                    )?;
                }
                let b = [
                    y.clamp(0.0, hf) as f32,
                    x.clamp(0.0, wf) as f32,
                    y2.clamp(0.0, hf) as f32,
                    x2.clamp(0.0, wf) as f32,
                ];
                sample.boxes.push(b);
                sample.classes.push(class);
            }
            if sample.boxes.is_empty() {
                check.report.images_without_annotations += 1;
                check.problem(
                    "image without annotations",
                    format!("image {} ({})", im.id, im.file_name),
                )?;
                continue;
            }
            samples.push(sample);
        }
        if samples.is_empty() {
            return Err(bad(format!(
                "no usable training image (of {} listed):\n{}",
                file.images.len(),
                check.report
            )));
        }
        Ok(Dataset {
            annotations: path.to_path_buf(),
            image_dir: image_dir.to_path_buf(),
            samples,
            categories,
            report: check.report,
        })
    }

    /// Number of classes `K`.
    pub fn num_classes(&self) -> usize {
        self.categories.len()
    }

    /// The contiguous class (`1..=K`) of COCO category `id`.
    pub fn class_of_category(&self, id: u64) -> Option<u32> {
        self.categories
            .iter()
            .position(|c| c.id == id)
            .map(|i| i as u32 + 1)
    }

    /// The COCO category id of class `class` (`1..=K`).
    pub fn category_of_class(&self, class: u32) -> Option<u64> {
        let i = (class as usize).checked_sub(1)?;
        self.categories.get(i).map(|c| c.id)
    }

    /// A label file (`<class> <name>` per line, [`crate::labels`]' format) for the classes.
    pub fn labels_file(&self) -> String {
        let mut s = String::from("# class id (1-based, contiguous) and name; category ids:");
        for c in &self.categories {
            s.push_str(&format!(" {}", c.id));
        }
        s.push('\n');
        for (i, c) in self.categories.iter().enumerate() {
            s.push_str(&format!("{} {}\n", i + 1, c.name));
        }
        s
    }
}
