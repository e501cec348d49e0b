//! Inputs and CPU reference results shared by the kernel tests that run on a GPU
//! (`cuda_gpu.rs`) and under host emulation (`cuda_emulated.rs`), so both check the same cases.
#![allow(dead_code)]

use effdet::frame::{Frame, PixelFormat, YuvMatrix, YuvRange};
use effdet::postprocess::{
    AnchorConfig, Anchors, ImageInfo, LevelOutput, PostprocessConfig, RawDetection, postprocess,
};
use effdet::rng::Rng;
use half::f16;

/// Every input format the pre-processing kernel reads.
pub const FORMATS: [PixelFormat; 7] = PixelFormat::ALL;

/// Frame sizes for a 64x64 input: down- and up-scaling, both pass orders (101x517 runs
/// Pillow's vertical pass first), one pass only, no pass, odd sizes for the 4:2:0 chroma, a
/// side clamped to 1 pixel.
pub const SIZES: [(usize, usize); 8] = [
    (37, 23),
    (101, 517),
    (7, 5),
    (64, 64),
    (33, 64),
    (128, 96),
    (1000, 10),
    (65, 31),
];

pub const COLORIMETRIES: [(YuvMatrix, YuvRange); 4] = [
    (YuvMatrix::Bt601, YuvRange::Limited),
    (YuvMatrix::Bt709, YuvRange::Limited),
    (YuvMatrix::Bt601, YuvRange::Full),
    (YuvMatrix::Bt709, YuvRange::Full),
];

/// An owned random frame with padded strides.
pub struct OwnedFrame {
    pub format: PixelFormat,
    pub width: usize,
    pub height: usize,
    pub planes: Vec<Vec<u8>>,
    pub strides: Vec<usize>,
}

impl OwnedFrame {
    pub fn random(rng: &mut Rng, format: PixelFormat, width: usize, height: usize) -> Self {
        let mut planes = Vec::new();
        let mut strides = Vec::new();
        for p in 0..format.num_planes() {
            let (row_bytes, rows) = format.plane_extent(p, width, height);
            let stride = row_bytes + rng.below(9) as usize;
            planes.push((0..stride * rows).map(|_| rng.below(256) as u8).collect());
            strides.push(stride);
        }
        OwnedFrame {
            format,
            width,
            height,
            planes,
            strides,
        }
    }

    pub fn frame(&self, matrix: YuvMatrix, range: YuvRange) -> Frame<'_> {
        let refs: Vec<&[u8]> = self.planes.iter().map(|p| p.as_slice()).collect();
        Frame::from_planes(self.format, self.width, self.height, &refs, &self.strides)
            .unwrap()
            .with_colorimetry(matrix, range)
    }
}

/// One random frame per format and size of [`SIZES`] (for a 64x64 input).
pub fn single_frames(rng: &mut Rng) -> Vec<OwnedFrame> {
    FORMATS
        .iter()
        .flat_map(|&f| SIZES.iter().map(move |&(w, h)| (f, w, h)))
        .map(|(f, w, h)| OwnedFrame::random(rng, f, w, h))
        .collect()
}

/// A batch mixing formats and sizes (the first one `first`, e.g. full HD on a GPU).
pub fn mixed_batch(rng: &mut Rng, first: (usize, usize)) -> Vec<OwnedFrame> {
    use PixelFormat::*;
    [
        (Nv12, first.0, first.1),
        (Bgra, 20, 90),
        (I420, 45, 45),
        (Rgb, 300, 200),
    ]
    .iter()
    .map(|&(f, w, h)| OwnedFrame::random(rng, f, w, h))
    .collect()
}

/// The CPU's network input for `frame`, rounded to FP16 bits (what the kernel must write).
pub fn cpu_input_f16(frame: &Frame, size: usize) -> Vec<u16> {
    let (cpu, _) = effdet::preprocess::preprocess(frame, size).unwrap();
    cpu.iter().map(|&v| f16::from_f32(v).to_bits()).collect()
}

/// Panics with the first difference unless `got` equals `want` bit for bit.
pub fn assert_same_bits(what: &str, want: &[u16], got: &[u16]) {
    assert_eq!(want.len(), got.len(), "{what}: lengths");
    let bad: Vec<usize> = (0..want.len()).filter(|&i| want[i] != got[i]).collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} values differ, first at {} (want {:#06x}, got {:#06x})",
        bad.len(),
        want.len(),
        bad[0],
        want[bad[0]],
        got[bad[0]]
    );
}

/// Anchors of a 128x128 D0 (3069 anchors over 5 levels).
pub fn small_anchors() -> Anchors {
    Anchors::new(&AnchorConfig::d0().with_image_size(128, 128)).unwrap()
}

/// One level's FP16 head outputs for a whole batch: class `[N, A*K, H, W]`, box `[N, A*4, H, W]`.
pub struct Heads {
    pub class: Vec<u16>,
    pub boxes: Vec<u16>,
}

/// Random FP16 head outputs for `batch` images; logits on a coarse grid so that many are equal
/// (the tie rules matter), box codes small.
pub fn random_heads(rng: &mut Rng, anchors: &Anchors, k: usize, batch: usize) -> Vec<Heads> {
    let a = anchors.anchors_per_location();
    anchors
        .feat_sizes()
        .iter()
        .map(|&(h, w)| Heads {
            class: (0..batch * a * k * h * w)
                .map(|_| f16::from_f32(((rng.normal() * 8.0).round() / 4.0 - 2.0) as f32).to_bits())
                .collect(),
            boxes: (0..batch * a * 4 * h * w)
                .map(|_| f16::from_f32((rng.normal() * 0.6) as f32).to_bits())
                .collect(),
        })
        .collect()
}

/// Distinct image infos (scale and clip limits) for a batch.
pub fn infos(batch: usize) -> Vec<ImageInfo> {
    (0..batch)
        .map(|i| ImageInfo {
            img_scale: 1.5 + i as f32 * 0.75,
            orig_width: 150.0 + 20.0 * i as f32,
            orig_height: 120.0,
        })
        .collect()
}

/// The CPU reference detections of image `img` of the batch.
pub fn cpu_detections(
    heads: &[Heads],
    anchors: &Anchors,
    info: ImageInfo,
    cfg: &PostprocessConfig,
    img: usize,
) -> Vec<RawDetection> {
    let a = anchors.anchors_per_location();
    let k = cfg.num_classes;
    let to = |v: &[u16]| -> Vec<f32> { v.iter().map(|&x| f16::from_bits(x).to_f32()).collect() };
    let f32s: Vec<(Vec<f32>, Vec<f32>)> = heads
        .iter()
        .zip(anchors.feat_sizes())
        .map(|(hd, &(h, w))| {
            let (nc, nb) = (a * k * h * w, a * 4 * h * w);
            (
                to(&hd.class[img * nc..(img + 1) * nc]),
                to(&hd.boxes[img * nb..(img + 1) * nb]),
            )
        })
        .collect();
    let levels: Vec<LevelOutput> = f32s
        .iter()
        .zip(anchors.feat_sizes())
        .map(|((c, b), &(h, w))| LevelOutput {
            class: c,
            boxes: b,
            height: h,
            width: w,
        })
        .collect();
    postprocess(&levels, anchors, Some(info), cfg).unwrap()
}

/// The post-processing settings both kernel tests use: effdet's defaults (5000 candidates,
/// torchvision's per-class NMS path, IoU 0.5, 100 detections) and a variant with thresholds.
pub fn postprocess_cases() -> Vec<(PostprocessConfig, usize, u64)> {
    vec![
        (
            PostprocessConfig {
                num_classes: 6,
                ..Default::default()
            },
            2,
            1,
        ),
        (
            PostprocessConfig {
                num_classes: 3,
                max_detection_points: 1500,
                max_detections: 7,
                iou_threshold: 0.6,
                score_threshold: 0.5,
                ..Default::default()
            },
            3,
            2,
        ),
    ]
}
