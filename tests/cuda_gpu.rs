//! The GPU kernels on a real GPU against the CPU reference, on the same cases as the host
//! emulation (`kernel_cases`). Without a usable GPU each test prints why and passes, unless
//! `EFFDET_REQUIRE_GPU=1` (the GPU lane, `scripts/gpu/run.sh`) makes that a failure; then
//! nothing skips: a missing cuBLAS fails the GEMM test too, and every test prints which path
//! it ran.
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
use effdet::frame::Frame;
use effdet::rng::Rng;
use kernel_cases::*;

fn required() -> bool {
    std::env::var("EFFDET_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

fn gpu_or_skip(test: &str) -> Option<Arc<GpuContext>> {
    match GpuContext::new(0) {
        Ok(g) => {
            eprintln!("{test}: on {:?}", g.info());
            Some(Arc::new(g))
        }
        Err(e) => {
            assert!(!required(), "{test}: EFFDET_REQUIRE_GPU=1 but: {e}");
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
    let (m, r) = COLORIMETRIES[0];
    for owned in single_frames(&mut Rng::new(7)) {
        run_preprocess(&gpu, &pre, &[owned.frame(m, r)], 64);
    }
    let owned = mixed_batch(&mut Rng::new(11), (1920, 1080));
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

/// The golden fixtures: here, or under `$EFFDET_REPO` on a GPU host where the repository copy
/// lives elsewhere than where the test was built.
fn golden_dir() -> std::path::PathBuf {
    let root = std::env::var_os("EFFDET_REPO")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    root.join("tests/fixtures/golden")
}

fn iou(a: &effdet::Detection, b: &effdet::Detection) -> f32 {
    let iw = (a.x2.min(b.x2) - a.x1.max(b.x1)).max(0.0);
    let ih = (a.y2.min(b.y2) - a.y1.max(b.y1)).max(0.0);
    let inter = iw * ih;
    let area = |d: &effdet::Detection| (d.x2 - d.x1) * (d.y2 - d.y1);
    inter / (area(a) + area(b) - inter)
}

fn rel_l2(ours: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&a, &b) in ours.iter().zip(want) {
        num += (f64::from(a) - f64::from(b)).powi(2);
        den += f64::from(b).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// The whole FP16 network against the CPU's f32 network on the golden weights and images:
/// raw outputs within 1e-2 relative L2 per level (the bound; FP16 storage of every
/// activation), and the CPU's confident detections found again (same class, IoU >= 0.9, score
/// within 0.02) except where a near-tie can reorder them.
#[test]
fn fp16_network_matches_the_cpu_on_the_golden_images() {
    use effdet::{BackendKind, Detector, DetectorOptions};
    if gpu_or_skip("fp16_network_matches_the_cpu_on_the_golden_images").is_none() {
        return;
    }
    let dir = golden_dir();
    let weights = dir.join("weights_f16.safetensors");
    let cpu = Detector::new(
        &weights,
        DetectorOptions {
            backend: BackendKind::Cpu,
            ..Default::default()
        },
    )
    .unwrap();
    let gpu = Detector::new(
        &weights,
        DetectorOptions {
            backend: BackendKind::Cuda,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(gpu.backend_name(), "cuda");
    let images: Vec<_> = (0..3)
        .map(|i| effdet::image_io::load_image(dir.join(format!("img{i}.png"))).unwrap())
        .collect();
    let frames: Vec<Frame> = images.iter().map(|im| im.frame().unwrap()).collect();
    let (input, _) = cpu.preprocess(&frames).unwrap();
    let want = cpu.forward(&input).unwrap();
    let got = gpu.forward(&input).unwrap();
    for (l, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.class.shape(), w.class.shape());
        let (ec, eb) = (
            rel_l2(g.class.data(), w.class.data()),
            rel_l2(g.boxes.data(), w.boxes.data()),
        );
        eprintln!("level {l}: relative L2 class {ec:.2e}, box {eb:.2e}");
        assert!(ec <= 1e-2 && eb <= 1e-2, "level {l}: class {ec}, box {eb}");
    }
    let cpu_dets = cpu.detect_batch(&frames).unwrap();
    let gpu_dets = gpu.detect_batch(&frames).unwrap();
    for (i, (c, g)) in cpu_dets.iter().zip(&gpu_dets).enumerate() {
        assert_eq!(c.len(), g.len(), "image {i}: detection count");
        for d in c.iter().filter(|d| d.score >= 0.2) {
            let found = g.iter().any(|e| {
                e.class_id == d.class_id && iou(e, d) >= 0.9 && (e.score - d.score).abs() <= 0.02
            });
            assert!(
                found,
                "image {i}: {d:?} not found among the GPU's detections"
            );
        }
    }
    // Batch against alone: bit-exact on the direct path in
    // `the_network_gives_each_image_the_same_bits_in_a_batch_of_3_or_128_as_alone`, and as
    // detections of a trained model in `detect_batch_of_128_matches_batch_1_on_the_same_frames`
    // (these seeded golden weights score a hundred overlapping boxes near 0.99, where FP16
    // near-ties reorder NMS).
}

/// Two detection lists (each at score threshold 0, so up to 100 long) agree: every detection
/// of either with score >= 0.3 (the element's default threshold) has a partner in the other
/// with the same class, IoU >= 0.98 and a score within 0.01. The tolerance is FP16's: a batch
/// may pick other GEMM kernels than a single image, whose FP32 sums round differently before
/// each activation is stored in FP16.
fn assert_same_detections(what: &str, a: &[effdet::Detection], b: &[effdet::Detection]) {
    let partner = |d: &effdet::Detection, other: &[effdet::Detection]| {
        other.iter().any(|e| {
            e.class_id == d.class_id && iou(e, d) >= 0.98 && (e.score - d.score).abs() <= 0.01
        })
    };
    let mut checked = 0;
    for (x, y) in [(a, b), (b, a)] {
        for d in x.iter().filter(|d| d.score >= 0.3) {
            assert!(partner(d, y), "{what}: {d:?} has no partner in {y:?}");
            checked += 1;
        }
    }
    assert!(checked > 0, "{what}: no detection above 0.3 to compare");
}

/// The golden weights on a CUDA backend with `policy`, as the model code runs them.
fn golden_model(
    gpu: Arc<GpuContext>,
    policy: effdet::compute::cuda::gemm::ConvPolicy,
) -> (
    effdet::compute::cuda::backend::CudaBackend,
    effdet::model::EfficientDet<effdet::compute::cuda::backend::CudaBackend>,
) {
    use effdet::compute::cuda::backend::CudaBackend;
    use effdet::model::{EfficientDet, EfficientDetConfig, WeightStore};
    let mut cuda = CudaBackend::new(gpu).unwrap();
    cuda.set_conv_policy(policy).unwrap();
    let store = WeightStore::open(golden_dir().join("weights_f16.safetensors")).unwrap();
    let model = EfficientDet::load(&cuda, &store, EfficientDetConfig::d0()).unwrap();
    (cuda, model)
}

/// The three golden images, pre-processed for D0 at 512 by the CPU (the same input for every
/// GPU run below), `[3, 3, 512, 512]`.
fn golden_input() -> effdet::compute::Tensor {
    use effdet::{BackendKind, Detector, DetectorOptions};
    let dir = golden_dir();
    let cpu = Detector::new(
        dir.join("weights_f16.safetensors"),
        DetectorOptions {
            backend: BackendKind::Cpu,
            ..Default::default()
        },
    )
    .unwrap();
    let images: Vec<_> = (0..3)
        .map(|i| effdet::image_io::load_image(dir.join(format!("img{i}.png"))).unwrap())
        .collect();
    let frames: Vec<Frame> = images.iter().map(|im| im.frame().unwrap()).collect();
    cpu.preprocess(&frames).unwrap().0
}

/// Images `order[j]` of `input` stacked into one batch.
fn stack(input: &effdet::compute::Tensor, order: &[usize]) -> effdet::compute::Tensor {
    let plane = input.data().len() / input.shape()[0];
    let mut data = Vec::with_capacity(order.len() * plane);
    for &i in order {
        data.extend_from_slice(&input.data()[i * plane..(i + 1) * plane]);
    }
    let mut shape = input.shape().to_vec();
    shape[0] = order.len();
    effdet::compute::Tensor::new(shape, data).unwrap()
}

/// On the direct-kernel path every kernel computes each output element from its own image in
/// a fixed order, so the batch size cannot change a single bit: a batch of 3 and a batch of
/// 128 (the three images cycled) give every image exactly the raw outputs it gets alone.
#[test]
fn the_network_gives_each_image_the_same_bits_in_a_batch_of_3_or_128_as_alone() {
    use effdet::compute::Backend;
    use effdet::compute::cuda::gemm::ConvPolicy;
    let Some(gpu) = gpu_or_skip("the_network_gives_each_image_the_same_bits_in_a_batch") else {
        return;
    };
    let (cuda, model) = golden_model(gpu, ConvPolicy::Direct);
    let input = golden_input();
    let run = |order: &[usize]| {
        let x = cuda.upload(&stack(&input, order)).unwrap();
        let outs = model.forward(&cuda, &x).unwrap();
        outs.iter()
            .map(|o| {
                (
                    cuda.download(&o.class).unwrap(),
                    cuda.download(&o.boxes).unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    let alone: Vec<_> = (0..3).map(|i| run(&[i])).collect();
    for n in [3usize, 128] {
        let order: Vec<usize> = (0..n).map(|j| j % 3).collect();
        let batch = run(&order);
        for (j, &img) in order.iter().enumerate() {
            for (l, ((bc, bb), (ac, ab))) in batch.iter().zip(&alone[img]).enumerate() {
                let (pc, pb) = (ac.data().len(), ab.data().len());
                assert!(
                    bc.data()[j * pc..(j + 1) * pc] == *ac.data()
                        && bb.data()[j * pb..(j + 1) * pb] == *ab.data(),
                    "batch {n}, position {j} (image {img}), level {l}: differs from alone"
                );
            }
        }
        eprintln!("batch {n}: every image bit-identical to its batch-1 run");
    }
}

/// The engine as users run it (the per-shape choice of cuBLAS or the direct kernel, GPU
/// pre- and post-processing), with the bundled trained model on three held-out shapes images:
/// 128 frames in one `detect_batch` give each frame the detections it gets alone.
#[test]
fn detect_batch_of_128_matches_batch_1_on_the_same_frames() {
    use effdet::frame::PixelFormat;
    use effdet::synth::{Split, render_dataset_image};
    use effdet::{BackendKind, Detector, DetectorOptions};
    if gpu_or_skip("detect_batch_of_128_matches_batch_1_on_the_same_frames").is_none() {
        return;
    }
    let images: Vec<_> = (0..3)
        .map(|i| render_dataset_image(1, Split::Val, i, 256))
        .collect();
    let frames: Vec<Frame> = images
        .iter()
        .map(|im| Frame::packed(PixelFormat::Rgb, im.width, im.height, &im.rgb).unwrap())
        .collect();
    let root = golden_dir().join("../../..");
    let gpu = Detector::new(
        root.join("models/effdet-d0-shapes256.safetensors"),
        DetectorOptions {
            backend: BackendKind::Cuda,
            ..Default::default()
        },
    )
    .unwrap();
    let alone: Vec<_> = frames.iter().map(|f| gpu.detect(f).unwrap()).collect();
    let batch: Vec<Frame> = (0..128).map(|j| frames[j % 3].clone()).collect();
    let got = gpu.detect_batch(&batch).unwrap();
    assert_eq!(got.len(), 128);
    for (j, dets) in got.iter().enumerate() {
        assert_same_detections(
            &format!("batch 128, position {j} (image {})", j % 3),
            dets,
            &alone[j % 3],
        );
    }
    eprintln!("engine: {}", gpu.engine_report().unwrap().unwrap());
}

/// Pointwise convolutions through cuBLAS (`ConvPolicy::Gemm`), the direct kernel and the
/// per-shape choice (`Auto`) against the CPU engine, with and without bias, activation and
/// residual. cuBLAS rounds the product to FP16 before the epilogue adds the bias (and the
/// residual), so the bound is two FP16 roundings of the largest term:
/// `|gpu - cpu| <= 2^-9 (|cpu| + |product|) + 1e-4`.
#[test]
fn pointwise_convolutions_match_the_cpu_on_every_path() {
    use effdet::compute::cpu::CpuBackend;
    use effdet::compute::cuda::backend::CudaBackend;
    use effdet::compute::cuda::gemm::ConvPolicy;
    use effdet::compute::{Activation, Backend, ConvSpec, Tensor};
    let Some(gpu) = gpu_or_skip("pointwise_convolutions_match_the_cpu_on_every_path") else {
        return;
    };
    let cpu = CpuBackend::new(1).unwrap();
    let mut cuda = CudaBackend::new(gpu).unwrap();
    let mut rng = Rng::new(5);
    let mut half_tensor = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|_| half::f16::from_f32(rng.normal() as f32 * 0.5).to_f32())
            .collect();
        Tensor::new(shape.to_vec(), v).unwrap()
    };
    // (input NCHW, cout, act, bias, residual): the network's pointwise shapes in miniature,
    // odd sizes so no dimension is a multiple of a tile.
    let cases = [
        ([2, 40, 17, 13], 24, Activation::Swish, true, true),
        ([1, 16, 9, 7], 96, Activation::Swish, true, false),
        ([3, 64, 5, 5], 64, Activation::None, false, false),
        ([1, 3, 31, 1], 5, Activation::Relu, true, true),
    ];
    for policy in [ConvPolicy::Direct, ConvPolicy::Gemm, ConvPolicy::Auto] {
        cuda.set_conv_policy(policy).unwrap();
        if policy != ConvPolicy::Direct && !cuda.has_gemm() {
            // The GPU lane has cuBLAS (pip's nvidia-cublas): its absence there is a failure.
            assert!(
                !required(),
                "EFFDET_REQUIRE_GPU=1 but cuBLAS (libcublas.so.13) is not loadable: {policy:?} \
                 cannot be checked"
            );
            eprintln!("no cuBLAS here: {policy:?} not checked");
            continue;
        }
        for (shape, cout, act, with_bias, with_res) in cases {
            let x = half_tensor(&shape);
            let w = half_tensor(&[cout, shape[1], 1, 1]);
            let b = half_tensor(&[cout]);
            let r = half_tensor(&[shape[0], cout, shape[2], shape[3]]);
            let spec = ConvSpec::same(act);
            let bias = with_bias.then_some(&b);
            let res = with_res.then_some(&r);
            let want = cpu.conv2d(&x, &w, bias, spec, res).unwrap();
            let product = cpu
                .conv2d(&x, &w, None, ConvSpec::same(Activation::None), None)
                .unwrap();
            let (gx, gw) = (cuda.upload(&x).unwrap(), cuda.upload(&w).unwrap());
            let (gb, gr) = (cuda.upload(&b).unwrap(), cuda.upload(&r).unwrap());
            let got = cuda
                .conv2d(
                    &gx,
                    &gw,
                    with_bias.then_some(&gb),
                    spec,
                    with_res.then_some(&gr),
                )
                .unwrap();
            let got = cuda.download(&got).unwrap();
            assert_eq!(got.shape(), want.shape());
            for (i, ((&g, &c), &p)) in got
                .data()
                .iter()
                .zip(want.data())
                .zip(product.data())
                .enumerate()
            {
                assert!(
                    (g - c).abs() <= (c.abs() + p.abs()) / 512.0 + 1e-4,
                    "{policy:?} {shape:?} -> {cout} {act:?}: element {i}: gpu {g}, cpu {c}"
                );
            }
        }
        eprintln!("{policy:?}: {:?}", cuda.conv_paths());
    }
    // Auto timed both paths on each of the four shapes and recorded a choice for each.
    let paths = cuda.conv_paths();
    if paths.cublas {
        assert_eq!(
            paths.gemm_shapes + paths.direct_shapes,
            cases.len(),
            "{paths:?}"
        );
    }
}
