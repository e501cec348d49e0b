//! The training input pipeline: decode, augment, normalise, label anchors, batch, with parallel
//! workers and bounded prefetch so the model never waits on data.
//!
//! Augmentation is effdet's `transforms_coco_train`: a random horizontal flip (p = 0.5) of the
//! decoded image, then `RandomResizePad`: scale the image so its longer side fits
//! `s * input_size` for `s ~ U(scale_min, scale_max)` (0.1..2.0), take a random crop of at most
//! `input_size` when it is larger, paste it top-left on an `input_size` square of the mean colour,
//! move the boxes along, clip them to the pasted image and drop the empty ones. Resizing is our
//! Pillow-exact bilinear (effdet picks bilinear or bicubic at random). Evaluation-style
//! pre-processing (plain letterbox, [`crate::preprocess`]) is [`Augment::None`].
//!
//! Decoding uses the `image` crate (pure Rust, already the CLI's decoder; PNG/JPEG decode of a
//! 512x512 image takes a few ms, far below a training step, so OpenCV's system dependency would
//! buy nothing here).
//!
//! Determinism: the epoch's order comes from `dist::shard_indices` (torch `DistributedSampler`
//! semantics, per rank), and each sample's augmentation from `Rng::derive(seed, epoch, index)`,
//! so batches are identical whatever the number of workers and their timing. Workers claim
//! batch numbers from a shared counter and send finished batches through a bounded crossbeam
//! channel; the consumer puts them back in order.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, bounded};

use crate::compute::Tensor;
use crate::error::{Error, Result};
use crate::image_io::load_image;
use crate::preprocess::{RgbImage, letterbox_normalise_into, resize_bilinear};
use crate::rng::Rng;
use crate::train::dataset::Dataset;
use crate::train::dist::shard_indices;
use crate::train::labeler::{AnchorLabeler, LevelTargets};

/// Which augmentation to apply.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Augment {
    /// effdet's training transforms: horizontal flip, then random resize (scale jitter) with a
    /// random crop / pad to the input size.
    Train {
        hflip_prob: f64,
        scale_min: f64,
        scale_max: f64,
    },
    /// Letterbox only (evaluation pre-processing).
    None,
}

impl Augment {
    /// effdet's defaults: flip 0.5, scale 0.1..2.0.
    pub fn effdet() -> Self {
        Augment::Train {
            hflip_prob: 0.5,
            scale_min: 0.1,
            scale_max: 2.0,
        }
    }
}

/// An augmented image ready for the network.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    /// CHW, normalised, `[3, S, S]`.
    pub chw: Vec<f32>,
    /// `[y1, x1, y2, x2]` in network pixels.
    pub boxes: Vec<[f32; 4]>,
    pub classes: Vec<u32>,
}

fn flip_horizontal(img: &mut RgbImage) {
    let w = img.width;
    for row in img.data.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (w - 1 - x) * 3 + c);
            }
        }
    }
}

/// Crops `img` to `[x0, x0 + w) x [y0, y0 + h)` (inside the image).
fn crop(img: &RgbImage, x0: usize, y0: usize, w: usize, h: usize) -> RgbImage {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in y0..y0 + h {
        let start = (y * img.width + x0) * 3;
        data.extend_from_slice(&img.data[start..start + w * 3]);
    }
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

/// Augments one decoded image with its boxes (`[y1, x1, y2, x2]` image pixels).
pub fn augment(
    img: RgbImage,
    boxes: &[[f32; 4]],
    classes: &[u32],
    input_size: usize,
    aug: Augment,
    rng: &mut Rng,
) -> Result<Prepared> {
    let mut img = img;
    let mut boxes = boxes.to_vec();
    let (scale_min, scale_max) = match aug {
        Augment::Train {
            hflip_prob,
            scale_min,
            scale_max,
        } => {
            if rng.chance(hflip_prob) {
                flip_horizontal(&mut img);
                let w = img.width as f32;
                for b in &mut boxes {
                    let (x1, x2) = (w - b[3], w - b[1]);
                    b[1] = x1;
                    b[3] = x2;
                }
            }
            (scale_min, scale_max)
        }
        Augment::None => (1.0, 1.0),
    };
    let s = if scale_min == scale_max {
        scale_min
    } else {
        rng.range_f64(scale_min, scale_max)
    };
    let target = input_size as f64 * s;
    let (w, h) = (img.width as f64, img.height as f64);
    let (sy, sx) = (target / h, target / w);
    let img_scale = if sx < sy { sx } else { sy };
    let scaled_h = ((h * img_scale) as usize).max(1);
    let scaled_w = ((w * img_scale) as usize).max(1);
    let off_y = (scaled_h.saturating_sub(input_size) as f64 * if s > 1.0 { rng.f64() } else { 0.0 })
        as usize;
    let off_x = (scaled_w.saturating_sub(input_size) as f64 * if s > 1.0 { rng.f64() } else { 0.0 })
        as usize;
    let resized = resize_bilinear(&img, scaled_w, scaled_h);
    let (cw, ch) = (
        (scaled_w - off_x).min(input_size),
        (scaled_h - off_y).min(input_size),
    );
    let cropped = if (cw, ch) == (scaled_w, scaled_h) {
        resized
    } else {
        crop(&resized, off_x, off_y, cw, ch)
    };
    let mut chw = vec![0f32; 3 * input_size * input_size];
    letterbox_normalise_into(&cropped, input_size, &mut chw)?;
    let (bound_h, bound_w) = (ch as f32, cw as f32);
    let scale = img_scale as f32;
    let mut out_boxes = Vec::with_capacity(boxes.len());
    let mut out_classes = Vec::with_capacity(boxes.len());
    for (b, &c) in boxes.iter().zip(classes) {
        let nb = [
            (b[0] * scale - off_y as f32).clamp(0.0, bound_h),
            (b[1] * scale - off_x as f32).clamp(0.0, bound_w),
            (b[2] * scale - off_y as f32).clamp(0.0, bound_h),
            (b[3] * scale - off_x as f32).clamp(0.0, bound_w),
        ];
        if nb[0] < nb[2] && nb[1] < nb[3] {
            out_boxes.push(nb);
            out_classes.push(c);
        }
    }
    Ok(Prepared {
        chw,
        boxes: out_boxes,
        classes: out_classes,
    })
}

/// A batch for [`crate::train::model::TrainNet::forward_backward`].
#[derive(Clone, Debug)]
pub struct TrainBatch {
    /// Position of the batch in the epoch.
    pub index: usize,
    /// `[B, 3, S, S]`.
    pub input: Tensor,
    pub labels: Vec<LevelTargets>,
    /// Dataset sample indices.
    pub samples: Vec<usize>,
    /// Ground-truth boxes in the batch after augmentation.
    pub num_boxes: usize,
}

/// Settings of a [`Loader`].
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub input_size: usize,
    pub batch_size: usize,
    pub augment: Augment,
    /// Decode/augment threads.
    pub workers: usize,
    /// Finished batches allowed to wait for the consumer.
    pub prefetch: usize,
    pub seed: u64,
    pub shuffle: bool,
    /// Drop a last, incomplete batch (as training does).
    pub drop_last: bool,
    /// This rank and the number of ranks (shards as torch's `DistributedSampler`).
    pub rank: usize,
    pub world: usize,
}

/// One epoch of batches, produced in the background. Iterate to receive them in order.
pub struct Loader {
    rx: Receiver<(usize, Result<TrainBatch>)>,
    pending: BTreeMap<usize, Result<TrainBatch>>,
    next: usize,
    num_batches: usize,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl Loader {
    /// Starts loading epoch `epoch` of `dataset`.
    pub fn new(
        dataset: Arc<Dataset>,
        labeler: Arc<AnchorLabeler>,
        cfg: &LoaderConfig,
        epoch: u64,
    ) -> Result<Self> {
        if cfg.batch_size == 0 || cfg.workers == 0 || cfg.input_size == 0 {
            return Err(Error::InvalidArgument(
                "loader: batch size, workers and input size must be at least 1".into(),
            ));
        }
        let order = shard_indices(
            dataset.samples.len(),
            cfg.rank,
            cfg.world,
            epoch,
            cfg.seed,
            cfg.shuffle,
        )?;
        let num_batches = if cfg.drop_last {
            order.len() / cfg.batch_size
        } else {
            order.len().div_ceil(cfg.batch_size)
        };
        let order = Arc::new(order);
        let (tx, rx) = bounded(cfg.prefetch.max(1));
        let counter = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::with_capacity(cfg.workers);
        for w in 0..cfg.workers {
            let (dataset, labeler, order, counter, stop, tx) = (
                Arc::clone(&dataset),
                Arc::clone(&labeler),
                Arc::clone(&order),
                Arc::clone(&counter),
                Arc::clone(&stop),
                tx.clone(),
            );
            let cfg = cfg.clone();
            let handle = std::thread::Builder::new()
                .name(format!("effdet-loader-{w}"))
                .spawn(move || {
                    loop {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let b = counter.fetch_add(1, Ordering::Relaxed);
                        if b >= num_batches {
                            break;
                        }
                        let end = ((b + 1) * cfg.batch_size).min(order.len());
                        let idx = &order[b * cfg.batch_size..end];
                        let batch = make_batch(&dataset, &labeler, &cfg, epoch, b, idx);
                        if tx.send((b, batch)).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| {
                    Error::InvalidArgument(format!("cannot start a loader thread: {e}"))
                })?;
            workers.push(handle);
        }
        Ok(Loader {
            rx,
            pending: BTreeMap::new(),
            next: 0,
            num_batches,
            stop,
            workers,
        })
    }

    /// Batches in this epoch.
    pub fn len(&self) -> usize {
        self.num_batches
    }

    pub fn is_empty(&self) -> bool {
        self.num_batches == 0
    }
}

impl Iterator for Loader {
    type Item = Result<TrainBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.num_batches {
            return None;
        }
        loop {
            if let Some(b) = self.pending.remove(&self.next) {
                self.next += 1;
                return Some(b);
            }
            match self.rx.recv() {
                Ok((i, b)) => {
                    self.pending.insert(i, b);
                }
                Err(_) => {
                    self.next = self.num_batches;
                    return Some(Err(Error::InvalidArgument(
                        "loader: a worker thread stopped before the epoch was complete".into(),
                    )));
                }
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Unblock workers waiting on a full channel, then join them.
        while self.rx.try_recv().is_ok() {}
        for w in self.workers.drain(..) {
            while !w.is_finished() {
                while self.rx.try_recv().is_ok() {}
                std::thread::yield_now();
            }
            let _ = w.join();
        }
    }
}

/// Loads, augments and labels the samples `idx` as batch `b` of `epoch`.
fn make_batch(
    dataset: &Dataset,
    labeler: &AnchorLabeler,
    cfg: &LoaderConfig,
    epoch: u64,
    b: usize,
    idx: &[usize],
) -> Result<TrainBatch> {
    let s = cfg.input_size;
    let mut input = Vec::with_capacity(idx.len() * 3 * s * s);
    let mut labels = Vec::with_capacity(idx.len());
    let mut num_boxes = 0;
    for &i in idx {
        let sample = &dataset.samples[i];
        let img = load_rgb(&sample.path)?;
        let mut rng = Rng::derive(
            cfg.seed ^ epoch.wrapping_mul(0x2545_F491_4F6C_DD1D),
            i as u64,
        );
        let p = augment(
            img,
            &sample.boxes,
            &sample.classes,
            s,
            cfg.augment,
            &mut rng,
        )?;
        num_boxes += p.boxes.len();
        labels.push(labeler.label(&p.boxes, &p.classes)?);
        input.extend_from_slice(&p.chw);
    }
    Ok(TrainBatch {
        index: b,
        input: Tensor::new(vec![idx.len(), 3, s, s], input)?,
        labels,
        samples: idx.to_vec(),
        num_boxes,
    })
}

fn load_rgb(path: &Path) -> Result<RgbImage> {
    let d = load_image(path)?;
    RgbImage::new(d.width, d.height, d.rgb)
}
