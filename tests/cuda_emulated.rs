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
use effdet::frame::Frame;
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
                "-pthread",
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
    let (m, r) = COLORIMETRIES[0];
    for owned in single_frames(&mut Rng::new(7)) {
        check_batch(&[owned.frame(m, r)], 64);
    }
}

#[test]
fn preprocessing_a_mixed_batch_and_every_colorimetry() {
    let owned = mixed_batch(&mut Rng::new(11), (61, 47));
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

// ------------------------------------------------------------------------------------------
// The network's kernels (conv.cu, elementwise.cu) against the CPU engine's ops.
//
// Inputs are FP16 values; the CPU computes in f32 on the same values. The kernels accumulate in
// FP32 (a different order) and round the result to FP16, so they agree with the CPU to FP16
// rounding: |gpu - cpu| <= 2^-10 |cpu| + 1e-5 (one FP16 ulp, plus the f32 order noise).
// ------------------------------------------------------------------------------------------

use effdet::compute::cpu::CpuBackend;
use effdet::compute::cuda::params::{ConvParams, activation_code};
use effdet::compute::{Activation, Backend, ConvSpec, Padding, Tensor};
use half::f16;

/// A random FP16-representable tensor: (its FP16 bits, the same values as an f32 Tensor).
fn random_half(rng: &mut Rng, shape: &[usize], scale: f64) -> (Vec<u16>, Tensor) {
    let n: usize = shape.iter().product();
    let bits: Vec<u16> = (0..n)
        .map(|_| f16::from_f32((rng.normal() * scale) as f32).to_bits())
        .collect();
    let vals = bits.iter().map(|&b| f16::from_bits(b).to_f32()).collect();
    (bits, Tensor::new(shape.to_vec(), vals).unwrap())
}

fn assert_close_f16(what: &str, cpu: &Tensor, got: &[u16]) {
    assert_eq!(cpu.len(), got.len(), "{what}: lengths");
    for (i, (&c, &g)) in cpu.data().iter().zip(got).enumerate() {
        let g = f16::from_bits(g).to_f32();
        assert!(
            (g - c).abs() <= c.abs() / 1024.0 + 1e-5,
            "{what}: element {i}: kernel {g}, cpu {c}"
        );
    }
}

fn cpu() -> CpuBackend {
    CpuBackend::new(1).unwrap()
}

type ConvFn =
    unsafe extern "C" fn(*const u16, *const u16, *const u16, *const u16, *mut u16, ConvParams);

#[test]
fn conv_kernel_matches_the_cpu_engine() {
    let mut rng = Rng::new(21);
    let same = Padding::Same;
    // (input NCHW, cout, kernel, stride, groups, padding, act, bias, residual)
    let cases = [
        (
            [2, 3, 17, 13],
            8,
            3,
            2,
            1,
            same,
            Activation::Swish,
            true,
            false,
        ), // the stem
        (
            [1, 6, 15, 11],
            6,
            5,
            2,
            6,
            same,
            Activation::None,
            false,
            false,
        ), // depthwise, s2
        (
            [2, 16, 9, 7],
            16,
            3,
            1,
            16,
            same,
            Activation::Swish,
            true,
            false,
        ), // depthwise, s1
        (
            [2, 24, 5, 6],
            12,
            1,
            1,
            1,
            same,
            Activation::None,
            true,
            true,
        ), // 1x1 + residual
        (
            [1, 8, 7, 7],
            4,
            3,
            1,
            1,
            Padding::Explicit {
                top: 0,
                bottom: 2,
                left: 1,
                right: 0,
            },
            Activation::Sigmoid,
            true,
            false,
        ), // explicit padding (the CPU has no general groups)
        (
            [1, 4, 1, 1],
            5,
            1,
            1,
            1,
            same,
            Activation::Relu,
            true,
            false,
        ), // 1x1 input (SE)
    ];
    let f: Symbol<ConvFn> = unsafe { library().get(b"emu_conv2d") }.unwrap();
    for (shape, cout, k, stride, groups, padding, act, with_bias, with_res) in cases {
        let [n, cin, _, _] = shape;
        let (xb, xt) = random_half(&mut rng, &shape, 1.0);
        let (wb, wt) = random_half(&mut rng, &[cout, cin / groups, k, k], 0.3);
        let (bb, bt) = random_half(&mut rng, &[cout], 0.5);
        let spec = ConvSpec {
            stride,
            groups,
            padding,
            act,
        };
        let p = ConvParams::new(shape, [cout, cin / groups, k, k], spec).unwrap();
        let (oh, ow) = (p.oh as usize, p.ow as usize);
        let (rb, rt) = random_half(&mut rng, &[n, cout, oh, ow], 1.0);
        let want = cpu()
            .conv2d(
                &xt,
                &wt,
                with_bias.then_some(&bt),
                spec,
                with_res.then_some(&rt),
            )
            .unwrap();
        let mut got = vec![0x7e01u16; n * cout * oh * ow];
        let null = std::ptr::null();
        // SAFETY: buffers sized as ConvParams describes; null bias/residual are allowed.
        unsafe {
            f(
                xb.as_ptr(),
                wb.as_ptr(),
                if with_bias { bb.as_ptr() } else { null },
                if with_res { rb.as_ptr() } else { null },
                got.as_mut_ptr(),
                p,
            )
        };
        assert_close_f16(
            &format!("conv {shape:?} k{k} s{stride} g{groups}"),
            &want,
            &got,
        );
    }
}

#[test]
fn elementwise_kernels_match_the_cpu_engine() {
    let lib = library();
    let mut rng = Rng::new(22);
    let shape = [2, 5, 7, 9];
    let (n, c, h, w) = (2usize, 5usize, 7usize, 9usize);
    let len = n * c * h * w;
    let (xb, xt) = random_half(&mut rng, &shape, 2.0);
    let (yb, yt) = random_half(&mut rng, &shape, 2.0);
    let (zb, zt) = random_half(&mut rng, &shape, 2.0);
    let (sb, st) = random_half(&mut rng, &[c], 1.0);
    let (tb, tt) = random_half(&mut rng, &[c], 1.0);
    let (gb, gt) = random_half(&mut rng, &[n, c, 1, 1], 1.0);
    let b = cpu();
    let mut out = vec![0x7e01u16; len];
    // SAFETY (every block): buffers hold the element counts passed.
    unsafe {
        for act in [
            Activation::None,
            Activation::Swish,
            Activation::Sigmoid,
            Activation::Relu,
        ] {
            let f: Symbol<
                unsafe extern "C" fn(
                    *const u16,
                    *mut u16,
                    *const u16,
                    *const u16,
                    i64,
                    i32,
                    i64,
                    i32,
                ),
            > = lib.get(b"emu_channel_affine").unwrap();
            f(
                xb.as_ptr(),
                out.as_mut_ptr(),
                sb.as_ptr(),
                tb.as_ptr(),
                len as i64,
                c as i32,
                (h * w) as i64,
                activation_code(act),
            );
            assert_close_f16(
                &format!("channel_affine {act:?}"),
                &b.channel_affine(&xt, &st, &tt, act).unwrap(),
                &out,
            );
            let f: Symbol<unsafe extern "C" fn(*const u16, *mut u16, i64, i32)> =
                lib.get(b"emu_activation").unwrap();
            f(
                xb.as_ptr(),
                out.as_mut_ptr(),
                len as i64,
                activation_code(act),
            );
            assert_close_f16(
                &format!("activation {act:?}"),
                &b.activation(&xt, act).unwrap(),
                &out,
            );
        }
        let f: Symbol<unsafe extern "C" fn(*const u16, *const u16, *mut u16, i64)> =
            lib.get(b"emu_add").unwrap();
        f(xb.as_ptr(), yb.as_ptr(), out.as_mut_ptr(), len as i64);
        assert_close_f16("add", &b.add(&xt, &yt).unwrap(), &out);

        let mut pooled = vec![0x7e01u16; n * c];
        let f: Symbol<unsafe extern "C" fn(*const u16, *mut u16, i64, i64)> =
            lib.get(b"emu_global_avg_pool").unwrap();
        f(
            xb.as_ptr(),
            pooled.as_mut_ptr(),
            (n * c) as i64,
            (h * w) as i64,
        );
        assert_close_f16("global_avg_pool", &b.global_avg_pool(&xt).unwrap(), &pooled);
        // Planes larger than the block (256 threads), not a multiple of it, and a 1x1 plane:
        // every thread's strided share and the block reduction.
        for pshape in [[1usize, 3, 97, 61], [2, 2, 1, 1], [1, 1, 16, 16]] {
            let (pb, pt) = random_half(&mut rng, &pshape, 2.0);
            let planes = pshape[0] * pshape[1];
            let mut pooled = vec![0x7e01u16; planes];
            f(
                pb.as_ptr(),
                pooled.as_mut_ptr(),
                planes as i64,
                (pshape[2] * pshape[3]) as i64,
            );
            assert_close_f16(
                &format!("global_avg_pool {pshape:?}"),
                &b.global_avg_pool(&pt).unwrap(),
                &pooled,
            );
        }

        let f: Symbol<unsafe extern "C" fn(*const u16, *const u16, *mut u16, i64, i64)> =
            lib.get(b"emu_scale_channels").unwrap();
        f(
            xb.as_ptr(),
            gb.as_ptr(),
            out.as_mut_ptr(),
            len as i64,
            (h * w) as i64,
        );
        assert_close_f16("scale_channels", &b.scale_channels(&xt, &gt).unwrap(), &out);

        for (k, stride) in [(3, 2), (3, 1), (2, 2)] {
            let (oh, pt, _) = Padding::Same.resolve(h, k, stride, true);
            let (ow, pl, _) = Padding::Same.resolve(w, k, stride, false);
            let mut pooled = vec![0x7e01u16; n * c * oh * ow];
            let f: Symbol<
                unsafe extern "C" fn(
                    *const u16,
                    *mut u16,
                    i64,
                    i32,
                    i32,
                    i32,
                    i32,
                    i32,
                    i32,
                    i32,
                    i32,
                ),
            > = lib.get(b"emu_max_pool_same").unwrap();
            f(
                xb.as_ptr(),
                pooled.as_mut_ptr(),
                (n * c) as i64,
                h as i32,
                w as i32,
                oh as i32,
                ow as i32,
                k as i32,
                stride as i32,
                pt as i32,
                pl as i32,
            );
            assert_close_f16(
                &format!("max_pool_same k{k} s{stride}"),
                &b.max_pool_same(&xt, k, stride).unwrap(),
                &pooled,
            );
        }
        for (oh, ow) in [(14, 18), (4, 5), (15, 19)] {
            let mut up = vec![0x7e01u16; n * c * oh * ow];
            let f: Symbol<unsafe extern "C" fn(*const u16, *mut u16, i64, i32, i32, i32, i32)> =
                lib.get(b"emu_upsample_nearest").unwrap();
            f(
                xb.as_ptr(),
                up.as_mut_ptr(),
                (n * c) as i64,
                h as i32,
                w as i32,
                oh as i32,
                ow as i32,
            );
            assert_close_f16(
                &format!("upsample_nearest {oh}x{ow}"),
                &b.upsample_nearest(&xt, oh, ow).unwrap(),
                &up,
            );
        }
        let f: Symbol<
            unsafe extern "C" fn(
                *const u16,
                *const u16,
                *const u16,
                f32,
                f32,
                f32,
                *mut u16,
                i64,
                i32,
            ),
        > = lib.get(b"emu_weighted_sum").unwrap();
        let wts = [0.31f32, 0.52, 0.17];
        f(
            xb.as_ptr(),
            yb.as_ptr(),
            std::ptr::null(),
            wts[0],
            wts[1],
            0.0,
            out.as_mut_ptr(),
            len as i64,
            activation_code(Activation::Swish),
        );
        assert_close_f16(
            "weighted_sum of 2",
            &b.weighted_sum(&[&xt, &yt], &wts[..2], Activation::Swish)
                .unwrap(),
            &out,
        );
        f(
            xb.as_ptr(),
            yb.as_ptr(),
            zb.as_ptr(),
            wts[0],
            wts[1],
            wts[2],
            out.as_mut_ptr(),
            len as i64,
            activation_code(Activation::Swish),
        );
        assert_close_f16(
            "weighted_sum of 3",
            &b.weighted_sum(&[&xt, &yt, &zt], &wts, Activation::Swish)
                .unwrap(),
            &out,
        );
    }
}
