//! The GPU kernels on a real GPU against the CPU reference, on the same cases as the host
//! emulation (`kernel_cases`). Without a usable GPU each test prints why and passes, unless
//! `EFFDET_REQUIRE_GPU=1` (the GPU lane, `scripts/gpu/run.sh`) makes that a failure.
//!
//! Tolerances: pre-processing must be bit-identical (integer arithmetic and a shared table).
//! Post-processing selects, orders and suppresses exactly as the CPU; only `expf` differs (the
//! device's is within 2 ulp of libm's), so box sides and scores may move by a few ulp: scores
//! within 1e-6 relative, box coordinates within 1e-5 relative to the clip size.
#![cfg(feature = "cuda")]

mod kernel_cases;

use std::sync::Arc;

use effdet::compute::cuda::GpuContext;
use effdet::compute::cuda::postprocess::{GpuLevel, GpuPostprocessor};
use effdet::compute::cuda::preprocess::GpuPreprocessor;
use effdet::frame::{Frame, PixelFormat};
use effdet::rng::Rng;
use kernel_cases::*;

fn gpu_or_skip(test: &str) -> Option<Arc<GpuContext>> {
    match GpuContext::new(0) {
        Ok(g) => Some(Arc::new(g)),
        Err(e) => {
            let required = std::env::var("EFFDET_REQUIRE_GPU").is_ok_and(|v| v == "1");
            assert!(!required, "{test}: EFFDET_REQUIRE_GPU=1 but: {e}");
            eprintln!("{test}: skipped, no GPU: {e}");
            None
        }
    }
}

fn run_preprocess(gpu: &Arc<GpuContext>, pre: &GpuPreprocessor, frames: &[Frame], size: usize) {
    let n = frames.len() * 3 * size * size;
    // Poison first: a NaN pattern the kernel never writes, so an unwritten value shows.
    let mut out = gpu.stream().clone_htod(&vec![0x7e01u16; n]).unwrap();
    pre.run(frames, &mut out).unwrap();
    let got = gpu.stream().clone_dtoh(&out).unwrap();
    let plane = 3 * size * size;
    for (i, f) in frames.iter().enumerate() {
        let what = format!("{} {}x{} -> {size}", f.format(), f.width(), f.height());
        assert_same_bits(
            &what,
            &cpu_input_f16(f, size),
            &got[i * plane..(i + 1) * plane],
        );
    }
}

#[test]
fn gpu_preprocessing_is_bit_identical_to_the_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_preprocessing_is_bit_identical_to_the_cpu") else {
        return;
    };
    let pre = GpuPreprocessor::new(gpu.clone(), 64).unwrap();
    let mut rng = Rng::new(7);
    let (m, r) = COLORIMETRIES[0];
    for format in FORMATS {
        for &(w, h) in &SIZES {
            let owned = OwnedFrame::random(&mut rng, format, w, h);
            run_preprocess(&gpu, &pre, &[owned.frame(m, r)], 64);
        }
    }
    use PixelFormat::*;
    let owned: Vec<OwnedFrame> = [
        (Nv12, 1920, 1080),
        (Bgra, 20, 90),
        (I420, 45, 45),
        (Rgb, 300, 200),
    ]
    .iter()
    .map(|&(f, w, h)| OwnedFrame::random(&mut rng, f, w, h))
    .collect();
    let pre512 = GpuPreprocessor::new(gpu.clone(), 512).unwrap();
    for (m, r) in COLORIMETRIES {
        let frames: Vec<Frame> = owned.iter().map(|o| o.frame(m, r)).collect();
        run_preprocess(&gpu, &pre512, &frames, 512);
    }
}

#[test]
fn gpu_postprocessing_matches_the_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_postprocessing_matches_the_cpu") else {
        return;
    };
    let anchors = small_anchors();
    for (cfg, batch, seed) in postprocess_cases() {
        let mut rng = Rng::new(seed);
        let heads = random_heads(&mut rng, &anchors, cfg.num_classes, batch);
        let infos = infos(batch);
        let dev: Vec<_> = heads
            .iter()
            .map(|h| {
                let s = gpu.stream();
                (
                    s.clone_htod(&h.class).unwrap(),
                    s.clone_htod(&h.boxes).unwrap(),
                )
            })
            .collect();
        let levels: Vec<GpuLevel> = dev
            .iter()
            .map(|(c, b)| GpuLevel { class: c, boxes: b })
            .collect();
        let post = GpuPostprocessor::new(gpu.clone(), &anchors, &cfg).unwrap();
        let got = post.run(&levels, &infos).unwrap();
        for (img, info) in infos.iter().enumerate() {
            let cpu = cpu_detections(&heads, &anchors, *info, &cfg, img);
            assert!(!cpu.is_empty());
            assert_eq!(got[img].len(), cpu.len(), "image {img}: detection count");
            let (cw, ch) = info.clip_size();
            let tol = 1e-5 * cw.max(ch) * info.img_scale;
            for (i, (g, c)) in got[img].iter().zip(&cpu).enumerate() {
                assert_eq!(
                    g.class_id, c.class_id,
                    "image {img} detection {i}: {g:?} vs {c:?}"
                );
                assert!(
                    (g.score - c.score).abs() <= 1e-6 * c.score.abs(),
                    "image {img} detection {i}: {g:?} vs {c:?}"
                );
                for (a, b) in g.bbox.iter().zip(&c.bbox) {
                    assert!(
                        (a - b).abs() <= tol,
                        "image {img} detection {i}: {g:?} vs {c:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_missing_gpu_is_a_clear_error() {
    if gpu_or_skip("a_missing_gpu_is_a_clear_error").is_none() {
        // No GPU here: the error itself is what this test checks.
        let e = GpuContext::new(0).unwrap_err();
        assert!(
            matches!(e, effdet::error::Error::BackendUnavailable { .. }),
            "{e}"
        );
        return;
    }
    let e = GpuContext::new(999).unwrap_err();
    assert!(e.to_string().contains("no GPU 999"), "{e}");
}
