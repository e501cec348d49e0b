//! The CUDA kernels' logic checked on the CPU, without a GPU: the same `.cu` sources compiled
//! as C++ with the host shim in `prelude.cuh` (`EFFDET_HOST_EMULATION`), every thread of every
//! launch run in turn (`tests/emulation/harness.cpp`), and the results compared with the CPU
//! reference on fresh random inputs.
//!
//! Exactness: the pre-processing is integer arithmetic plus a table lookup, so the FP16 output
//! must equal the CPU's f32 input rounded to FP16, bit for bit. The post-processing repeats the
//! CPU's f32 operations in order (`-ffp-contract=off` here, `--fmad=false` under NVRTC) and
//! the emulation's `expf` is the same libm function the CPU reference calls, so detections must
//! be identical. (On a GPU `expf` may differ by an ulp: tests/cuda_gpu.rs allows for that.)
//!
//! Needs a C++ compiler (`c++`, GCC 12 or newer for `_Float16`); the README's test command
//! installs one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use effdet::compute::cuda::params::{DecodeImage, GpuDetection, PreprocessImage, TopkState};
use effdet::frame::{Frame, PixelFormat, YuvMatrix, YuvRange};
use effdet::postprocess::{
    AnchorConfig, Anchors, ImageInfo, LevelOutput, PostprocessConfig, RawDetection, postprocess,
};
use effdet::preprocess::{FILL_RGB, ResizePlan, normalisation_table, preprocess};
use effdet::rng::Rng;
use half::f16;
use libloading::{Library, Symbol};

fn library() -> &'static Library {
    static LIB: OnceLock<Library> = OnceLock::new();
    LIB.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("libeffdet_emulated_kernels.so");
        let status = Command::new(std::env::var("CXX").unwrap_or_else(|_| "c++".into()))
            .args([
                "-std=c++17",
                "-O2",
                "-ffp-contract=off",
                "-fPIC",
                "-shared",
                "-Wall",
            ])
            .args(["-Wno-unused-function", "-DEFFDET_HOST_EMULATION", "-I"])
            .arg(root.join("src/compute/cuda/kernels"))
            .arg(root.join("tests/emulation/harness.cpp"))
            .arg("-o")
            .arg(&out)
            .status()
            .expect("a C++ compiler (`c++`) is needed to emulate the CUDA kernels");
        assert!(status.success(), "compiling the emulated kernels failed");
        // SAFETY: the library is our own harness, with no initialisers besides thread_locals.
        unsafe { Library::new(&out) }.expect("load the emulated kernels")
    })
}

#[test]
fn struct_layouts_match_the_kernels() {
    let mut c = [0usize; 7];
    // SAFETY: emu_layout writes 7 values.
    unsafe {
        let f: Symbol<unsafe extern "C" fn(*mut usize)> = library().get(b"emu_layout").unwrap();
        f(c.as_mut_ptr());
    }
    assert_eq!(c[0], std::mem::size_of::<PreprocessImage>());
    assert_eq!(c[1], std::mem::offset_of!(PreprocessImage, stride));
    assert_eq!(c[2], std::mem::offset_of!(PreprocessImage, yuv));
    assert_eq!(c[3], std::mem::size_of::<TopkState>());
    assert_eq!(c[4], std::mem::size_of::<DecodeImage>());
    assert_eq!(c[5], std::mem::size_of::<GpuDetection>());
    assert_eq!(c[6], std::mem::offset_of!(GpuDetection, class_id));
}

/// A random frame of `format` with padded strides (the owned planes and their strides).
fn random_planes(
    rng: &mut Rng,
    format: PixelFormat,
    w: usize,
    h: usize,
) -> (Vec<Vec<u8>>, Vec<usize>) {
    let mut planes = Vec::new();
    let mut strides = Vec::new();
    for p in 0..format.num_planes() {
        let (row_bytes, rows) = format.plane_extent(p, w, h);
        let stride = row_bytes + rng.below(9) as usize;
        planes.push((0..stride * rows).map(|_| rng.below(256) as u8).collect());
        strides.push(stride);
    }
    (planes, strides)
}

type PreprocessFn =
    unsafe extern "C" fn(*const PreprocessImage, i32, *const f32, *const i32, i32, *mut u16);

/// Runs the emulated kernel on `frames` as one batch and checks every value against the CPU.
fn check_batch(frames: &[Frame], size: usize) {
    let plans: Vec<ResizePlan> = frames
        .iter()
        .map(|f| ResizePlan::new(f.width(), f.height(), size).unwrap())
        .collect();
    let addr = |v: &[i32]| v.as_ptr() as u64;
    let descs: Vec<PreprocessImage> = frames
        .iter()
        .zip(&plans)
        .map(|(f, p)| {
            let planes = std::array::from_fn(|i| {
                if i < f.format().num_planes() {
                    f.plane(i).as_ptr() as u64
                } else {
                    0
                }
            });
            let (h, v) = (&p.horizontal, &p.vertical);
            let taps = [
                addr(&h.start),
                addr(&h.len),
                addr(&h.k),
                addr(&v.start),
                addr(&v.len),
                addr(&v.k),
            ];
            PreprocessImage::new(f, p, planes, taps)
        })
        .collect();
    let lut = normalisation_table();
    let fill = FILL_RGB.map(i32::from);
    // Poison: a NaN pattern the kernel never writes (normalised values are finite).
    let mut out = vec![0x7e01u16; frames.len() * 3 * size * size];
    // SAFETY: the descriptors point at live planes and taps; `out` holds the whole batch.
    unsafe {
        let f: Symbol<PreprocessFn> = library().get(b"emu_preprocess").unwrap();
        f(
            descs.as_ptr(),
            frames.len() as i32,
            lut.as_ptr(),
            fill.as_ptr(),
            size as i32,
            out.as_mut_ptr(),
        );
    }
    for (i, frame) in frames.iter().enumerate() {
        let (cpu, _) = preprocess(frame, size).unwrap();
        let got = &out[i * cpu.len()..(i + 1) * cpu.len()];
        let mismatches: Vec<usize> = cpu
            .iter()
            .zip(got)
            .enumerate()
            .filter(|(_, (c, g))| f16::from_f32(**c).to_bits() != **g)
            .map(|(j, _)| j)
            .collect();
        assert!(
            mismatches.is_empty(),
            "{} {}x{} -> {size}: {} of {} values differ, first at {} (cpu {} gpu bits {:#06x})",
            frame.format(),
            frame.width(),
            frame.height(),
            mismatches.len(),
            cpu.len(),
            mismatches[0],
            cpu[mismatches[0]],
            got[mismatches[0]]
        );
    }
}

#[test]
fn preprocessing_matches_the_cpu_for_every_format_and_odd_sizes() {
    use PixelFormat::*;
    let formats = [Rgb, Rgba, Rgbx, Bgrx, Bgra, Nv12, I420];
    // Down- and up-scaling, both pass orders (101x517 runs Pillow's vertical pass first), one
    // pass only, no pass, odd sizes for the 4:2:0 chroma, a side clamped to 1 pixel.
    let sizes = [
        (37, 23),
        (101, 517),
        (7, 5),
        (64, 64),
        (33, 64),
        (128, 96),
        (1000, 10),
        (65, 31),
    ];
    let mut rng = Rng::new(7);
    for format in formats {
        for &(w, h) in &sizes {
            let (planes, strides) = random_planes(&mut rng, format, w, h);
            let refs: Vec<&[u8]> = planes.iter().map(|p| p.as_slice()).collect();
            let frame = Frame::from_planes(format, w, h, &refs, &strides).unwrap();
            check_batch(&[frame], 64);
        }
    }
}

#[test]
fn preprocessing_a_mixed_batch_and_every_colorimetry() {
    use PixelFormat::*;
    let mut rng = Rng::new(11);
    let specs = [
        (Nv12, 61, 47),
        (Bgra, 20, 90),
        (I420, 45, 45),
        (Rgb, 300, 200),
    ];
    let owned: Vec<_> = specs
        .iter()
        .map(|&(f, w, h)| (f, w, h, random_planes(&mut rng, f, w, h)))
        .collect();
    let colorimetries = [
        (YuvMatrix::Bt601, YuvRange::Limited),
        (YuvMatrix::Bt709, YuvRange::Limited),
        (YuvMatrix::Bt601, YuvRange::Full),
        (YuvMatrix::Bt709, YuvRange::Full),
    ];
    for (m, r) in colorimetries {
        let frames: Vec<Frame> = owned
            .iter()
            .map(|(f, w, h, (planes, strides))| {
                let refs: Vec<&[u8]> = planes.iter().map(|p| p.as_slice()).collect();
                Frame::from_planes(*f, *w, *h, &refs, strides)
                    .unwrap()
                    .with_colorimetry(m, r)
            })
            .collect();
        check_batch(&frames, 48);
    }
}

#[repr(C)]
struct EmuLevel {
    cls: *const u16,
    boxes: *const u16,
    height: i32,
    width: i32,
}

type PostprocessFn = unsafe extern "C" fn(
    *const EmuLevel,
    i32,
    i32,
    i32,
    i32,
    *const f32,
    i32,
    u32,
    i32,
    f64,
    f32,
    *const DecodeImage,
    *mut GpuDetection,
    *mut u32,
);

/// Random FP16 head outputs for `batch` images; logits on a coarse grid so that many are equal
/// (the tie rules matter), box codes small.
fn random_heads(
    rng: &mut Rng,
    anchors: &Anchors,
    k: usize,
    batch: usize,
) -> Vec<(Vec<u16>, Vec<u16>)> {
    let a = anchors.anchors_per_location();
    anchors
        .feat_sizes()
        .iter()
        .map(|&(h, w)| {
            let cls = (0..batch * a * k * h * w)
                .map(|_| f16::from_f32(((rng.normal() * 8.0).round() / 4.0 - 2.0) as f32).to_bits())
                .collect();
            let boxes = (0..batch * a * 4 * h * w)
                .map(|_| f16::from_f32((rng.normal() * 0.6) as f32).to_bits())
                .collect();
            (cls, boxes)
        })
        .collect()
}

fn check_postprocess(cfg: &PostprocessConfig, batch: usize, seed: u64) {
    let anchors = Anchors::new(&AnchorConfig::d0().with_image_size(128, 128)).unwrap();
    let k = cfg.num_classes;
    let mut rng = Rng::new(seed);
    let heads = random_heads(&mut rng, &anchors, k, batch);
    let infos: Vec<ImageInfo> = (0..batch)
        .map(|i| ImageInfo {
            img_scale: 1.5 + i as f32 * 0.75,
            orig_width: 150.0 + 20.0 * i as f32,
            orig_height: 120.0,
        })
        .collect();
    let levels: Vec<EmuLevel> = heads
        .iter()
        .zip(anchors.feat_sizes())
        .map(|((c, b), &(h, w))| EmuLevel {
            cls: c.as_ptr(),
            boxes: b.as_ptr(),
            height: h as i32,
            width: w as i32,
        })
        .collect();
    let flat: Vec<f32> = anchors.boxes().iter().flatten().copied().collect();
    let decode: Vec<DecodeImage> = infos.iter().map(DecodeImage::new).collect();
    let md = cfg.max_detections.max(1);
    let mut dets = vec![GpuDetection::default(); batch * md];
    let mut counts = vec![u32::MAX; batch];
    // SAFETY: all pointers cover the sizes the harness reads and writes.
    unsafe {
        let f: Symbol<PostprocessFn> = library().get(b"emu_postprocess").unwrap();
        f(
            levels.as_ptr(),
            levels.len() as i32,
            batch as i32,
            anchors.anchors_per_location() as i32,
            k as i32,
            flat.as_ptr(),
            anchors.len() as i32,
            cfg.max_detection_points as u32,
            cfg.max_detections as i32,
            effdet::postprocess::iou_threshold_f64(cfg.iou_threshold),
            cfg.score_threshold,
            decode.as_ptr(),
            dets.as_mut_ptr(),
            counts.as_mut_ptr(),
        );
    }
    let a = anchors.anchors_per_location();
    for img in 0..batch {
        let f32s: Vec<(Vec<f32>, Vec<f32>)> = heads
            .iter()
            .zip(anchors.feat_sizes())
            .map(|((c, b), &(h, w))| {
                let (nc, nb) = (a * k * h * w, a * 4 * h * w);
                let to = |v: &[u16]| v.iter().map(|&x| f16::from_bits(x).to_f32()).collect();
                (
                    to(&c[img * nc..(img + 1) * nc]),
                    to(&b[img * nb..(img + 1) * nb]),
                )
            })
            .collect();
        let lv: Vec<LevelOutput> = f32s
            .iter()
            .zip(anchors.feat_sizes())
            .map(|((c, b), &(h, w))| LevelOutput {
                class: c,
                boxes: b,
                height: h,
                width: w,
            })
            .collect();
        let cpu = postprocess(&lv, &anchors, Some(infos[img]), cfg).unwrap();
        let got: Vec<RawDetection> = dets[img * md..img * md + counts[img] as usize]
            .iter()
            .map(|d| RawDetection {
                bbox: d.bbox,
                score: d.score,
                class_id: d.class_id,
            })
            .collect();
        assert!(!cpu.is_empty(), "the random heads must produce detections");
        assert_eq!(got.len(), cpu.len(), "image {img}: detection count");
        for (i, (g, c)) in got.iter().zip(&cpu).enumerate() {
            assert_eq!(g, c, "image {img}, detection {i}");
        }
    }
}

#[test]
fn postprocessing_matches_the_cpu_exactly() {
    // Defaults: 5000 candidates (torchvision's per-class NMS path), IoU 0.5, 100 detections.
    let cfg = PostprocessConfig {
        num_classes: 6,
        ..Default::default()
    };
    check_postprocess(&cfg, 2, 1);
}

#[test]
fn postprocessing_with_thresholds_and_few_detections() {
    let cfg = PostprocessConfig {
        num_classes: 3,
        max_detection_points: 1500,
        max_detections: 7,
        iou_threshold: 0.6,
        score_threshold: 0.5,
        ..Default::default()
    };
    check_postprocess(&cfg, 3, 2);
}
