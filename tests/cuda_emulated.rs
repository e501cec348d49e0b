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

mod kernel_cases;

use effdet::compute::cuda::params::{DecodeImage, GpuDetection, PreprocessImage, TopkState};
use effdet::frame::{Frame, PixelFormat};
use effdet::postprocess::{PostprocessConfig, RawDetection};
use effdet::preprocess::{FILL_RGB, ResizePlan, normalisation_table};
use effdet::rng::Rng;
use kernel_cases::*;
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
    let plane = 3 * size * size;
    for (i, frame) in frames.iter().enumerate() {
        let what = format!(
            "{} {}x{} -> {size}",
            frame.format(),
            frame.width(),
            frame.height()
        );
        let want = cpu_input_f16(frame, size);
        assert_same_bits(&what, &want, &out[i * plane..(i + 1) * plane]);
    }
}

#[test]
fn preprocessing_matches_the_cpu_for_every_format_and_odd_sizes() {
    let mut rng = Rng::new(7);
    let (m, r) = COLORIMETRIES[0];
    for format in FORMATS {
        for &(w, h) in &SIZES {
            let owned = OwnedFrame::random(&mut rng, format, w, h);
            check_batch(&[owned.frame(m, r)], 64);
        }
    }
}

#[test]
fn preprocessing_a_mixed_batch_and_every_colorimetry() {
    use PixelFormat::*;
    let mut rng = Rng::new(11);
    let owned: Vec<OwnedFrame> = [
        (Nv12, 61, 47),
        (Bgra, 20, 90),
        (I420, 45, 45),
        (Rgb, 300, 200),
    ]
    .iter()
    .map(|&(f, w, h)| OwnedFrame::random(&mut rng, f, w, h))
    .collect();
    for (m, r) in COLORIMETRIES {
        let frames: Vec<Frame> = owned.iter().map(|o| o.frame(m, r)).collect();
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

fn check_postprocess(cfg: &PostprocessConfig, batch: usize, seed: u64) {
    let anchors = small_anchors();
    let k = cfg.num_classes;
    let mut rng = Rng::new(seed);
    let heads = random_heads(&mut rng, &anchors, k, batch);
    let infos = infos(batch);
    let levels: Vec<EmuLevel> = heads
        .iter()
        .zip(anchors.feat_sizes())
        .map(|(hd, &(h, w))| EmuLevel {
            cls: hd.class.as_ptr(),
            boxes: hd.boxes.as_ptr(),
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
    for (img, info) in infos.iter().enumerate() {
        let cpu = cpu_detections(&heads, &anchors, *info, cfg, img);
        let got: Vec<RawDetection> = dets[img * md..img * md + counts[img] as usize]
            .iter()
            .map(|d| RawDetection {
                bbox: d.bbox,
                score: d.score,
                class_id: d.class_id,
            })
            .collect();
        assert!(!cpu.is_empty(), "the random heads must produce detections");
        assert_eq!(got, cpu, "image {img}");
    }
}

#[test]
fn postprocessing_matches_the_cpu_exactly() {
    for (cfg, batch, seed) in postprocess_cases() {
        check_postprocess(&cfg, batch, seed);
    }
}
