//! A synthetic detection dataset of coloured shapes, and a matching test video, reproducible
//! from a seed (`effdet synth`).
//!
//! Each image shows 3 to 12 objects of six classes ([`ShapeKind`]: circle, square, triangle,
//! star, hexagon, cross; category ids 1..=6) of varied sizes (about 8% tiny, 7-12 px; 20%
//! large, up to 60% of the shorter side), colours, stretches (aspect up to 1.8) and rotations on
//! a textured background (gradients, value noise, stripes, checkers, soft blobs; often two mixed
//! through a noise mask), with anti-aliased edges, partial occlusion (later objects drawn over
//! earlier ones) and sometimes mild blur or noise.
//!
//! **Ground truth.** Each object's box is the tight box, in whole pixels, of the pixels where
//! its *visible* coverage (its own coverage times what objects in front of it let through)
//! exceeds 0.5. Objects with less than [`MIN_VISIBLE_FRACTION`] of their area visible, or a box
//! side under [`MIN_BOX_SIDE`] pixels, are not annotated; when composing a random image a new
//! object that would leave an earlier one (or itself) less than 35% visible, or with a box
//! side under [`MIN_BOX_SIDE`], is placed elsewhere instead, so every object drawn in a dataset
//! image is annotated (the video, whose objects move freely, does drop some).
//!
//! **Reproducibility.** Image `i` of the training split is rendered from
//! `Rng::derive(seed, i)`, of the validation split from `Rng::derive(val_seed, 2^32 + i)`, and
//! the video from `Rng::derive(val_seed, 2^33)`, so images render in parallel and any single
//! image can be regenerated alone ([`render_dataset_image`]). `val_seed` defaults to `seed`;
//! a different `val_seed` gives a held-out set from an independent stream.
//!
//! **Output layout** ([`write_dataset`]):
//!
//! ```text
//! OUT/labels.txt                 "<id> <name>" per line (effdet detect --labels, effdet labels=)
//! OUT/dataset.json               generator version, seeds, sizes, streams, counts, the command
//! OUT/train/images/000000.png    RGB PNGs, SIZE x SIZE
//! OUT/train/annotations.json     COCO: images {id, file_name "000000.png", width, height},
//!                                annotations {id (from 1), image_id, category_id, bbox [x, y,
//!                                w, h] (whole pixels), area (visible pixels), iscrowd 0},
//!                                categories {id, name}; image id = file index
//! OUT/val/images/..., OUT/val/annotations.json     the same for the validation split
//! OUT/video/test.y4m             the test video: YUV 4:2:0, BT.601 limited range, 30 fps
//! OUT/video/annotations.json     COCO, one image per frame: id = frame index (from 0),
//!                                file_name "frame_000000", ...
//! ```

mod background;
mod render;
mod video;

use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::rng::Rng;

pub use background::{Background, Blob, Texture};
pub use render::{
    Effects, MIN_BOX_SIDE, MIN_VISIBLE_FRACTION, ShapeSpec, SynthImage, SynthObject,
    render_random_image, render_scene,
};
pub use video::{VIDEO_FPS, VideoScene, i420_frame_len, rgb_to_i420, write_y4m_frame, y4m_header};

/// Version of the generator: bumped whenever the same seed would give different images or
/// annotations.
pub const GENERATOR_VERSION: u32 = 1;

/// The object classes. The discriminant is the COCO category id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ShapeKind {
    Circle = 1,
    Square = 2,
    Triangle = 3,
    Star = 4,
    Hexagon = 5,
    Cross = 6,
}

/// Number of classes (category ids `1..=NUM_CLASSES`).
pub const NUM_CLASSES: usize = 6;

impl ShapeKind {
    /// Every class, in category-id order.
    pub const ALL: [ShapeKind; NUM_CLASSES] = [
        ShapeKind::Circle,
        ShapeKind::Square,
        ShapeKind::Triangle,
        ShapeKind::Star,
        ShapeKind::Hexagon,
        ShapeKind::Cross,
    ];

    /// The 1-based category id.
    pub fn class_id(self) -> u32 {
        self as u32
    }

    /// The class name (as in `labels.txt`).
    pub fn name(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
            ShapeKind::Star => "star",
            ShapeKind::Hexagon => "hexagon",
            ShapeKind::Cross => "cross",
        }
    }

    /// The class with category id `id`.
    pub fn from_class_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.class_id() == id)
    }
}

/// The label file: one `<id> <name>` line per class (the format of [`crate::labels::Labels`]).
pub fn labels_text() -> String {
    ShapeKind::ALL
        .iter()
        .map(|k| format!("{} {}\n", k.class_id(), k.name()))
        .collect()
}

/// A dataset split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    /// The directory name (`train`, `val`).
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }

    /// The `Rng::derive` stream of image `index` of this split.
    pub fn stream(self, index: u64) -> u64 {
        match self {
            Split::Train => index,
            Split::Val => (1 << 32) + index,
        }
    }
}

/// The `Rng::derive` stream of the test video's scene.
pub const VIDEO_STREAM: u64 = 1 << 33;

/// Image `index` of `split` (square, `size` pixels) generated from `seed` (use `val_seed` for
/// [`Split::Val`]): exactly the image [`write_dataset`] writes.
pub fn render_dataset_image(seed: u64, split: Split, index: u64, size: usize) -> SynthImage {
    let mut rng = Rng::derive(seed, split.stream(index));
    render_random_image(&mut rng, size, size)
}

/// The test video's scene for `seed` (the dataset's `val_seed`).
pub fn dataset_video(seed: u64, width: usize, height: usize, frames: usize) -> VideoScene {
    VideoScene::random(&mut Rng::derive(seed, VIDEO_STREAM), width, height, frames)
}

/// What [`write_dataset`] generates.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetOptions {
    /// Training images.
    pub train: usize,
    /// Validation images.
    pub val: usize,
    pub seed: u64,
    /// Seed of the validation split and the video.
    pub val_seed: u64,
    /// Image side in pixels (images are square).
    pub size: usize,
    /// Video frames (0: no video).
    pub video_frames: usize,
    /// Video frame `(width, height)`.
    pub video_size: (usize, usize),
    /// Replace a previous dataset in a non-empty output directory.
    pub force: bool,
    /// The command line recorded in `dataset.json`.
    pub command: Option<String>,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        DatasetOptions {
            train: 2000,
            val: 200,
            seed: 0,
            val_seed: 0,
            size: 512,
            video_frames: 150,
            video_size: (640, 360),
            force: false,
            command: None,
        }
    }
}

impl DatasetOptions {
    /// Checks sizes and counts (the errors are `Error::InvalidArgument`).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if !(64..=4096).contains(&self.size) {
            return bad(format!("image size {} is outside 64..=4096", self.size));
        }
        let (w, h) = self.video_size;
        if !(64..=4096).contains(&w) || !(64..=4096).contains(&h) {
            return bad(format!(
                "video size {w}x{h}: each side must lie in 64..=4096"
            ));
        }
        if self.train > 10_000_000 || self.val > 10_000_000 || self.video_frames > 1_000_000 {
            return bad("at most 10,000,000 images per split and 1,000,000 video frames".into());
        }
        Ok(())
    }
}

/// Counts of one split (or of the video).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SplitStats {
    /// Images (or frames).
    pub images: usize,
    /// Annotated objects.
    pub objects: usize,
    /// Annotated objects per class, by category id (index 0 is id 1).
    pub per_class: [usize; NUM_CLASSES],
    /// Objects whose box's longer side is at most 12 px.
    pub tiny: usize,
    /// Objects partly hidden by others (visible box smaller than the unoccluded one).
    pub occluded: usize,
    /// Objects drawn but not annotated (too hidden or too small).
    pub dropped: usize,
}

impl SplitStats {
    fn add(&mut self, objects: &[SynthObject], dropped: usize) {
        self.images += 1;
        self.objects += objects.len();
        self.dropped += dropped;
        for o in objects {
            self.per_class[o.class_id() as usize - 1] += 1;
            self.tiny += o.is_tiny() as usize;
            self.occluded += o.is_occluded() as usize;
        }
    }
}

/// What [`write_dataset`] wrote (also saved as `dataset.json`, without `seconds`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DatasetReport {
    pub generator: &'static str,
    pub generator_version: u32,
    pub crate_version: &'static str,
    pub command: Option<String>,
    pub seed: u64,
    pub val_seed: u64,
    pub image_size: usize,
    pub streams: serde_json::Value,
    pub categories: Vec<serde_json::Value>,
    pub train: SplitStats,
    pub val: SplitStats,
    pub video: Option<VideoReport>,
    /// Wall-clock time of the whole generation (not saved in `dataset.json`).
    #[serde(skip)]
    pub seconds: f64,
}

/// The test video part of a [`DatasetReport`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VideoReport {
    pub file: String,
    pub width: usize,
    pub height: usize,
    pub fps: u32,
    pub format: &'static str,
    pub stats: SplitStats,
}

// ---------------------------------------------------------------------------------------------
// COCO output
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct CocoInfo {
    description: String,
    version: String,
}

#[derive(Serialize)]
struct CocoImageOut {
    id: u64,
    file_name: String,
    width: usize,
    height: usize,
}

#[derive(Serialize)]
struct CocoAnnotationOut {
    id: u64,
    image_id: u64,
    category_id: u32,
    bbox: [u32; 4],
    area: f64,
    iscrowd: u8,
}

#[derive(Serialize)]
struct CocoCategoryOut {
    id: u32,
    name: &'static str,
    supercategory: &'static str,
}

#[derive(Serialize)]
struct CocoOut {
    info: CocoInfo,
    images: Vec<CocoImageOut>,
    annotations: Vec<CocoAnnotationOut>,
    categories: Vec<CocoCategoryOut>,
}

impl CocoOut {
    fn new(description: String) -> Self {
        CocoOut {
            info: CocoInfo {
                description,
                version: format!("effdet synth {GENERATOR_VERSION}"),
            },
            images: Vec::new(),
            annotations: Vec::new(),
            categories: ShapeKind::ALL
                .iter()
                .map(|k| CocoCategoryOut {
                    id: k.class_id(),
                    name: k.name(),
                    supercategory: "shape",
                })
                .collect(),
        }
    }

    /// Adds an image and its objects (annotation ids continue from 1).
    fn push(
        &mut self,
        id: u64,
        file_name: String,
        width: usize,
        height: usize,
        objs: &[SynthObject],
    ) {
        self.images.push(CocoImageOut {
            id,
            file_name,
            width,
            height,
        });
        for o in objs {
            let id_next = self.annotations.len() as u64 + 1;
            self.annotations.push(CocoAnnotationOut {
                id: id_next,
                image_id: id,
                category_id: o.class_id(),
                bbox: o.bbox,
                area: (o.visible_area * 10.0).round() / 10.0,
                iscrowd: 0,
            });
        }
    }

    fn write(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_vec(self).map_err(|e| Error::Annotations {
            path: path.to_path_buf(),
            reason: format!("cannot serialise: {e}"),
        })?;
        text.push(b'\n');
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// The entries of an output directory that [`write_dataset`] writes (and, with `force`,
/// replaces).
const OUTPUTS: [&str; 5] = ["train", "val", "video", "labels.txt", "dataset.json"];

/// Makes `out` an empty-enough directory: created if missing; if not empty, refused unless
/// `force`, which removes a previous dataset's entries (and nothing else).
fn prepare_out_dir(out: &Path, force: bool) -> Result<()> {
    match std::fs::metadata(out) {
        Ok(m) if !m.is_dir() => Err(Error::InvalidArgument(format!(
            "output {} exists and is not a directory",
            out.display()
        ))),
        Ok(_) => {
            let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
            if entries.next().is_none() {
                return Ok(());
            }
            if !force {
                return Err(Error::InvalidArgument(format!(
                    "output directory {} is not empty (pass --force to replace a dataset there)",
                    out.display()
                )));
            }
            for name in OUTPUTS {
                let p = out.join(name);
                match std::fs::symlink_metadata(&p) {
                    Ok(m) if m.is_dir() => {
                        std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?
                    }
                    Ok(_) => std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?,
                    Err(_) => {}
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))
        }
        Err(e) => Err(Error::io(out, e)),
    }
}

fn create_dir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))
}

/// Encodes RGB8 as PNG and writes it.
pub fn write_png(path: &Path, rgb: &[u8], width: usize, height: usize) -> Result<()> {
    use image::ImageEncoder;
    let mut buf = Vec::new();
    image::codecs::png::PngEncoder::new(&mut buf)
        .write_image(
            rgb,
            width as u32,
            height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            reason: format!("cannot encode PNG: {e}"),
        })?;
    std::fs::write(path, buf).map_err(|e| Error::io(path, e))
}

/// Renders and writes one split: `dir/images/NNNNNN.png` and `dir/annotations.json`.
fn write_split(
    dir: &Path,
    split: Split,
    count: usize,
    seed: u64,
    size: usize,
) -> Result<SplitStats> {
    let images = dir.join("images");
    create_dir(&images)?;
    let rendered: Vec<(Vec<SynthObject>, usize)> = (0..count)
        .into_par_iter()
        .map(|i| {
            let img = render_dataset_image(seed, split, i as u64, size);
            write_png(&images.join(format!("{i:06}.png")), &img.rgb, size, size)?;
            Ok((img.objects, img.dropped))
        })
        .collect::<Result<_>>()?;
    let mut coco = CocoOut::new(format!(
        "effdet synthetic shapes, {} split, seed {seed}",
        split.name()
    ));
    let mut stats = SplitStats::default();
    for (i, (objects, dropped)) in rendered.into_iter().enumerate() {
        coco.push(i as u64, format!("{i:06}.png"), size, size, &objects);
        stats.add(&objects, dropped);
    }
    coco.write(&dir.join("annotations.json"))?;
    Ok(stats)
}

/// Renders and writes the test video: `dir/test.y4m` and `dir/annotations.json`.
fn write_video(dir: &Path, scene: &VideoScene, frames: usize, seed: u64) -> Result<SplitStats> {
    use std::io::Write;
    create_dir(dir)?;
    let (w, h) = (scene.width, scene.height);
    let path = dir.join("test.y4m");
    let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
    let mut out = std::io::BufWriter::new(file);
    out.write_all(y4m_header(w, h, VIDEO_FPS).as_bytes())
        .map_err(|e| Error::io(&path, e))?;
    let mut coco = CocoOut::new(format!("effdet synthetic shapes, test video, seed {seed}"));
    let mut stats = SplitStats::default();
    // Render a chunk of frames in parallel, then write it in order.
    let chunk = rayon::current_num_threads().max(1) * 2;
    for start in (0..frames).step_by(chunk) {
        let end = (start + chunk).min(frames);
        let rendered: Vec<(Vec<u8>, SynthImage)> = (start..end)
            .into_par_iter()
            .map(|t| {
                let img = scene.render_frame(t);
                (rgb_to_i420(&img.rgb, w, h), img)
            })
            .collect();
        for (t, (yuv, img)) in (start..end).zip(rendered) {
            out.write_all(b"FRAME\n")
                .and_then(|()| out.write_all(&yuv))
                .map_err(|e| Error::io(&path, e))?;
            coco.push(t as u64, format!("frame_{t:06}"), w, h, &img.objects);
            stats.add(&img.objects, img.dropped);
        }
    }
    out.flush().map_err(|e| Error::io(&path, e))?;
    coco.write(&dir.join("annotations.json"))?;
    Ok(stats)
}

/// Generates the dataset into `out` (layout in the module docs): refuses a non-empty `out`
/// unless `opts.force`; bad options are `Error::InvalidArgument`, unwritable output
/// `Error::Io`. Renders with the current rayon pool.
pub fn write_dataset(out: &Path, opts: &DatasetOptions) -> Result<DatasetReport> {
    let start = Instant::now();
    opts.validate()?;
    prepare_out_dir(out, opts.force)?;
    let labels = out.join("labels.txt");
    std::fs::write(&labels, labels_text()).map_err(|e| Error::io(&labels, e))?;
    let train = write_split(
        &out.join("train"),
        Split::Train,
        opts.train,
        opts.seed,
        opts.size,
    )?;
    let val = write_split(
        &out.join("val"),
        Split::Val,
        opts.val,
        opts.val_seed,
        opts.size,
    )?;
    let video = if opts.video_frames > 0 {
        let (w, h) = opts.video_size;
        let scene = dataset_video(opts.val_seed, w, h, opts.video_frames);
        let stats = write_video(&out.join("video"), &scene, opts.video_frames, opts.val_seed)?;
        Some(VideoReport {
            file: "video/test.y4m".into(),
            width: w,
            height: h,
            fps: VIDEO_FPS,
            format: "YUV4MPEG2, I420 (4:2:0, chroma centred), BT.601 limited range",
            stats,
        })
    } else {
        None
    };
    let mut report = DatasetReport {
        generator: "effdet synth",
        generator_version: GENERATOR_VERSION,
        crate_version: env!("CARGO_PKG_VERSION"),
        command: opts.command.clone(),
        seed: opts.seed,
        val_seed: opts.val_seed,
        image_size: opts.size,
        streams: serde_json::json!({
            "train": "image i: Rng::derive(seed, i)",
            "val": "image i: Rng::derive(val_seed, 2^32 + i)",
            "video": "scene: Rng::derive(val_seed, 2^33)",
        }),
        categories: ShapeKind::ALL
            .iter()
            .map(|k| serde_json::json!({"id": k.class_id(), "name": k.name()}))
            .collect(),
        train,
        val,
        video,
        seconds: 0.0,
    };
    let path = out.join("dataset.json");
    let mut text = serde_json::to_vec_pretty(&report).map_err(|e| Error::Annotations {
        path: path.clone(),
        reason: format!("cannot serialise: {e}"),
    })?;
    text.push(b'\n');
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}
