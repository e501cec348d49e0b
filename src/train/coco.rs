//! COCO-format detection annotations (`images`, `annotations`, `categories`) and their
//! conversion into the network-space targets effdet trains on.
//!
//! effdet's path from a COCO annotation to a training target, reproduced here:
//! `parser_coco.py` turns `[x, y, w, h]` into `[x, y, x + w, y + h]` (Python floats, then an f32
//! array) and reorders it to `[y1, x1, y2, x2]`; crowd boxes (`iscrowd: 1`) go to an ignore list
//! that training does not use; `transforms.py` `ResizePad` multiplies the boxes by the letterbox
//! scale (f32 arithmetic), clips them to the resized image and drops boxes left without area.
//! The class is the COCO category id (1-based), as for effdet's 90-class TF-ported models.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::compute::Tensor;
use crate::error::{Error, Result};
use crate::image_io::load_image;
use crate::preprocess::{Letterbox, preprocess};
use crate::train::labeler::{AnchorLabeler, LevelTargets};

/// One entry of `images`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct CocoImage {
    pub id: u64,
    pub file_name: String,
    #[serde(default)]
    pub width: Option<u64>,
    #[serde(default)]
    pub height: Option<u64>,
}

/// One entry of `annotations`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct CocoAnnotation {
    #[serde(default)]
    pub id: Option<u64>,
    pub image_id: u64,
    pub category_id: u64,
    /// `[x, y, width, height]` in image pixels.
    pub bbox: [f64; 4],
    /// The object's area in square pixels (in COCO the segmentation's area, not the box's);
    /// COCO evaluation uses it for the small / medium / large ranges. Training ignores it.
    #[serde(default)]
    pub area: Option<f64>,
    #[serde(default)]
    pub iscrowd: u8,
    /// effdet's parser skips annotations marked `"ignore": true`.
    #[serde(default)]
    pub ignore: bool,
}

/// One entry of `categories`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct CocoCategory {
    pub id: u64,
    pub name: String,
}

/// A parsed annotations file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct CocoFile {
    pub images: Vec<CocoImage>,
    #[serde(default)]
    pub annotations: Vec<CocoAnnotation>,
    #[serde(default)]
    pub categories: Vec<CocoCategory>,
}

/// Ground truth of one image in network space: `[y1, x1, y2, x2]` boxes and 1-based classes,
/// ready for [`crate::train::labeler::AnchorLabeler::label`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Targets {
    pub boxes: Vec<[f32; 4]>,
    pub classes: Vec<u32>,
}

/// The text of a COCO JSON file (annotations or results); an unreadable file is an
/// [`Error::Annotations`] naming it.
pub(crate) fn read_json_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::Annotations {
        path: path.to_path_buf(),
        reason: format!("cannot read: {e}"),
    })
}

/// An annotations file with an index from file name to image.
#[derive(Clone, Debug)]
pub struct CocoAnnotations {
    path: PathBuf,
    file: CocoFile,
    by_name: HashMap<String, usize>,
    by_id: HashMap<u64, Vec<usize>>,
}

impl CocoAnnotations {
    /// Reads and indexes `path`. Errors name the file: unreadable, not JSON, not COCO
    /// (missing `images`), duplicate image ids or file names, annotations of unknown images,
    /// boxes that are not finite or have negative sizes.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_json(path, &read_json_text(path)?)
    }

    /// Parses annotations from a JSON string (`path` is used in messages).
    pub fn from_json(path: impl AsRef<Path>, text: &str) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bad = |reason: String| Error::Annotations {
            path: path.clone(),
            reason,
        };
        let file: CocoFile =
            serde_json::from_str(text).map_err(|e| bad(format!("not COCO JSON: {e}")))?;
        let mut by_name = HashMap::new();
        let mut ids = HashMap::new();
        for (i, im) in file.images.iter().enumerate() {
            if ids.insert(im.id, i).is_some() {
                return Err(bad(format!("image id {} appears twice", im.id)));
            }
            if by_name.insert(im.file_name.clone(), i).is_some() {
                return Err(bad(format!("file_name {:?} appears twice", im.file_name)));
            }
        }
        let mut by_id: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, a) in file.annotations.iter().enumerate() {
            if !ids.contains_key(&a.image_id) {
                return Err(bad(format!(
                    "annotation {} refers to image id {}, which is not in `images`",
                    a.id.map_or(format!("#{i}"), |id| id.to_string()),
                    a.image_id
                )));
            }
            let [x, y, w, h] = a.bbox;
            if !(x.is_finite() && y.is_finite() && w.is_finite() && h.is_finite())
                || w < 0.0
                || h < 0.0
            {
                return Err(bad(format!(
                    "annotation {} has an invalid bbox {:?} (need finite [x, y, w, h], w, h >= 0)",
                    a.id.map_or(format!("#{i}"), |id| id.to_string()),
                    a.bbox
                )));
            }
            by_id.entry(a.image_id).or_default().push(i);
        }
        Ok(CocoAnnotations {
            path,
            file,
            by_name,
            by_id,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &CocoFile {
        &self.file
    }

    /// The image whose `file_name` is `name`, or else whose `file_name` ends in `/name`.
    pub fn image_by_file_name(&self, name: &str) -> Option<&CocoImage> {
        if let Some(&i) = self.by_name.get(name) {
            return Some(&self.file.images[i]);
        }
        self.file.images.iter().find(|im| {
            Path::new(&im.file_name)
                .file_name()
                .is_some_and(|f| f == std::ffi::OsStr::new(name))
        })
    }

    /// The annotations of image `id` that effdet trains on: not crowd, not `ignore`, at least
    /// one pixel wide and high.
    pub fn annotations_of(&self, id: u64) -> impl Iterator<Item = &CocoAnnotation> {
        self.by_id
            .get(&id)
            .into_iter()
            .flatten()
            .map(|&i| &self.file.annotations[i])
            .filter(|a| a.iscrowd == 0 && !a.ignore && a.bbox[2] >= 1.0 && a.bbox[3] >= 1.0)
    }

    /// effdet's training targets for image `id` letterboxed as `lb` (see the module docs).
    /// Category ids must lie in `1..=num_classes`.
    pub fn targets(&self, id: u64, lb: &Letterbox, num_classes: usize) -> Result<Targets> {
        let mut t = Targets::default();
        // effdet: img_scale = min(target_h / h, target_w / w) in Python floats, applied to the
        // f32 boxes in f32.
        let target = lb.input_size as f64;
        let (sy, sx) = (
            target / lb.orig_height as f64,
            target / lb.orig_width as f64,
        );
        let scale = if sx < sy { sx } else { sy } as f32;
        let bound_h = lb.resized_height.min(lb.input_size) as f32;
        let bound_w = lb.resized_width.min(lb.input_size) as f32;
        for a in self.annotations_of(id) {
            if a.category_id == 0 || a.category_id > num_classes as u64 {
                return Err(Error::Annotations {
                    path: self.path.clone(),
                    reason: format!(
                        "annotation {} of image {id}: category_id {} is outside 1..={num_classes} \
                         (the model's classes)",
                        a.id.map_or("?".into(), |v| v.to_string()),
                        a.category_id
                    ),
                });
            }
            let [x, y, w, h] = a.bbox;
            let xyxy = [x as f32, y as f32, (x + w) as f32, (y + h) as f32];
            let [x1, y1, x2, y2] = xyxy.map(|v| v * scale);
            let b = [
                y1.clamp(0.0, bound_h),
                x1.clamp(0.0, bound_w),
                y2.clamp(0.0, bound_h),
                x2.clamp(0.0, bound_w),
            ];
            if b[0] < b[2] && b[1] < b[3] {
                t.boxes.push(b);
                t.classes.push(a.category_id as u32);
            }
        }
        Ok(t)
    }
}

/// A training batch read from image files and their annotations.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Normalised, letterboxed input `[N, 3, S, S]`.
    pub input: Tensor,
    /// Network-space ground truth per image.
    pub targets: Vec<Targets>,
    /// Labeled anchors per image.
    pub labels: Vec<LevelTargets>,
    /// How each image was letterboxed.
    pub letterboxes: Vec<Letterbox>,
}

/// Reads `images` (matched to `anns` by file name), letterboxes and normalises them to
/// `input_size` exactly as for inference, converts their annotations to network space and
/// labels the anchors: the batch effdet's `DetBenchTrain` would see with eval-style
/// pre-processing (no augmentation).
pub fn load_batch(
    images: &[impl AsRef<Path>],
    anns: &CocoAnnotations,
    input_size: usize,
    labeler: &AnchorLabeler,
) -> Result<Batch> {
    if images.is_empty() {
        return Err(Error::InvalidArgument(
            "a batch needs at least one image".into(),
        ));
    }
    let mut input = Vec::with_capacity(images.len() * 3 * input_size * input_size);
    let mut batch = Batch {
        input: Tensor::zeros(vec![0]),
        targets: Vec::with_capacity(images.len()),
        labels: Vec::with_capacity(images.len()),
        letterboxes: Vec::with_capacity(images.len()),
    };
    for path in images {
        let path = path.as_ref();
        let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            Error::InvalidArgument(format!("{}: not a file name", path.display()))
        })?;
        let entry = anns
            .image_by_file_name(name)
            .ok_or_else(|| Error::Annotations {
                path: anns.path().to_path_buf(),
                reason: format!("no image with file_name {name:?} (for {})", path.display()),
            })?;
        let img = load_image(path)?;
        let (chw, lb) = preprocess(&img.frame()?, input_size)?;
        input.extend_from_slice(&chw);
        let t = anns.targets(entry.id, &lb, labeler.num_classes())?;
        batch.labels.push(labeler.label(&t.boxes, &t.classes)?);
        batch.targets.push(t);
        batch.letterboxes.push(lb);
    }
    batch.input = Tensor::new(vec![images.len(), 3, input_size, input_size], input)?;
    Ok(batch)
}
