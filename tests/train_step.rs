//! One EfficientDet-D0 training step against effdet 0.4.1's `DetBenchTrain` (fixtures made by
//! `tools/make_train_step_fixtures.py`: golden weights, a batch of two letterboxed images with
//! COCO annotations, training-mode BN, drop-path off).
//!
//! Tolerances and why:
//! - Losses: 1e-4 relative (the issue's bound; measured 6e-7). Both sides compute the network in
//!   f32 and the loss sums differ in order.
//! - Gradients of the stored subset: relative L2 <= 1e-3 against torch's f32 gradients (measured
//!   <= 5e-5), except two BiFPN `edge_weights` the fixture marks ill-conditioned (a node with
//!   one live edge whose normalisation nearly cancels the gradient: torch's own f32 result is
//!   1e-2 away from its f64 result); those are checked against the f64 reference below.
//! - Every parameter (all 460): L2 norm and a fixed random projection of the gradient against
//!   effdet run in f64, relative 1e-3 (the projection error is scaled by the expected size of
//!   the projection of a random vector of the gradient's norm, `|g| |r| / sqrt(n)`).
//! - 52 gradients are zero in exact arithmetic (biases of convolutions followed by a
//!   training-mode BN, which subtracts them again, and BN biases feeding only such convs);
//!   torch's f32 leaves noise up to 2e-4 there. They must be below 1e-3 in L2 norm, where the
//!   other gradients of this step range up to several hundred.
//! - Running statistics after the step: relative L2 <= 1e-5 per tensor (f32 vs our f64 stats).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use effdet::compute::Tensor;
use effdet::compute::cpu::CpuBackend;
use effdet::model::{EfficientDetConfig, WeightStore};
use effdet::train::coco::{CocoAnnotations, load_batch};
use effdet::train::loss::DetectionLoss;
use effdet::train::model::{TrainNet, TrainOptions};
use effdet::train::optim::load_tensors;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
fn fixture(p: &str) -> PathBuf {
    root().join("tests/fixtures/train_step").join(p)
}
fn weights() -> PathBuf {
    root().join("tests/fixtures/golden/weights_f16.safetensors")
}
fn images() -> Vec<PathBuf> {
    ["img0.png", "img1.png"]
        .iter()
        .map(|f| root().join("tests/fixtures/golden").join(f))
        .collect()
}
fn meta() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("meta.json")).unwrap()).unwrap()
}
fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_effdet")
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// The fixture's projection vector: `r(i) = ((i * 2654435761) mod 2^32) / 2^32 - 0.5`.
fn projection(g: &[f32]) -> f64 {
    g.iter()
        .enumerate()
        .map(|(i, &v)| {
            let r = ((i as u64).wrapping_mul(2_654_435_761) % (1u64 << 32)) as f64
                / (1u64 << 32) as f64
                - 0.5;
            v as f64 * r
        })
        .sum()
}

fn check_losses(loss: f64, class: f64, boxes: f64, positives: f64, m: &Value) {
    for (name, ours) in [("loss", loss), ("class_loss", class), ("box_loss", boxes)] {
        let want = m[name].as_f64().unwrap();
        let rel = (ours - want).abs() / want.abs();
        assert!(
            rel <= 1e-4,
            "{name}: ours {ours}, effdet {want} (rel {rel:.2e})"
        );
    }
    assert_eq!(positives, m["num_positives"].as_f64().unwrap());
}

fn check_grads(grads: &BTreeMap<String, Tensor>, m: &Value) {
    let params = m["params"].as_object().unwrap();
    assert_eq!(grads.len(), params.len(), "one gradient per parameter");
    let ill: Vec<&str> = m["grads"]["ill_conditioned"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let stored = load_tensors(fixture("grads.safetensors")).unwrap();
    let mut checked_full = 0;
    for (name, p) in params {
        let g = grads
            .get(name)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let shape: Vec<usize> = p["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(g.shape(), shape.as_slice(), "{name}");
        let norm = g
            .data()
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        if p["structural_zero"].as_bool().unwrap() {
            assert!(
                norm < 1e-3,
                "{name}: gradient should vanish, norm {norm:.3e}"
            );
            continue;
        }
        let ref_norm = p["f64_grad_l2"].as_f64().unwrap();
        let rel_norm = (norm - ref_norm).abs() / ref_norm;
        assert!(
            rel_norm <= 1e-3,
            "{name}: |g| {norm} vs effdet f64 {ref_norm}"
        );
        let scale = ref_norm * p["proj_r_l2"].as_f64().unwrap() / (g.len() as f64).sqrt();
        let proj = projection(g.data());
        let want = p["f64_grad_proj"].as_f64().unwrap();
        assert!(
            (proj - want).abs() <= 1e-3 * scale,
            "{name}: projection {proj} vs effdet f64 {want} (scale {scale})"
        );
        if let Some(t) = stored.get(name)
            && !ill.contains(&name.as_str())
        {
            let e = rel_l2(g.data(), t.data());
            assert!(e <= 1e-3, "{name}: relative L2 {e:.2e} against effdet");
            checked_full += 1;
        }
    }
    assert!(
        checked_full > 300,
        "only {checked_full} full gradients compared"
    );
}

#[test]
fn effdet_loss_cli_matches_detbenchtrain() {
    let m = meta();
    let dir = tempfile::tempdir().unwrap();
    let gpath = dir.path().join("grads.safetensors");
    let imgs: Vec<String> = images().iter().map(|p| p.display().to_string()).collect();
    let out = Command::new(bin())
        .args(["loss", "--threads", "2", "--json", "--weights"])
        .arg(weights())
        .arg("--images")
        .arg(imgs.join(","))
        .arg("--annotations")
        .arg(fixture("annotations.json"))
        .arg("--grads-out")
        .arg(&gpath)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "effdet loss failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("no {k} in {v}"));
    check_losses(
        f("loss"),
        f("class_loss"),
        f("box_loss"),
        f("num_positives"),
        &m,
    );
    check_grads(&load_tensors(&gpath).unwrap(), &m);
}

#[test]
fn training_step_targets_and_running_statistics_match_effdet() {
    let m = meta();
    let store = WeightStore::open(weights()).unwrap();
    let mut net = TrainNet::from_store(&store, EfficientDetConfig::d0()).unwrap();
    let anns = CocoAnnotations::open(fixture("annotations.json")).unwrap();
    let batch = load_batch(&images(), &anns, 512, &net.labeler().unwrap()).unwrap();

    // effdet-space targets: bit-identical boxes and classes.
    for (t, im) in batch.targets.iter().zip(m["images"].as_array().unwrap()) {
        let want: Vec<[f32; 4]> = im["target_bbox_yxyx"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                let b = b.as_array().unwrap();
                std::array::from_fn(|i| b[i].as_f64().unwrap() as f32)
            })
            .collect();
        let cls: Vec<u32> = im["target_cls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(t.boxes, want, "{}", im["file"]);
        assert_eq!(t.classes, cls, "{}", im["file"]);
    }
    let positives: Vec<usize> = batch.labels.iter().map(|l| l.num_positives).collect();
    let want: Vec<usize> = m["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|im| im["num_positives"].as_f64().unwrap() as usize)
        .collect();
    assert_eq!(positives, want);

    let backend = CpuBackend::new(2).unwrap();
    let stats = net
        .forward_backward(
            &backend,
            &batch.input,
            &batch.labels,
            &DetectionLoss::d0(),
            &TrainOptions::default(),
            None,
        )
        .unwrap();
    check_losses(
        stats.loss as f64,
        stats.class_loss as f64,
        stats.box_loss as f64,
        stats.num_positives as f64,
        &m,
    );
    let want = load_tensors(fixture("running_stats.safetensors")).unwrap();
    assert_eq!(want.len(), net.buffers().len(), "every BN's statistics");
    for (name, t) in &want {
        let ours = &net.buffers()[name];
        let e = rel_l2(ours.data(), t.data());
        assert!(e <= 1e-5, "{name}: relative L2 {e:.2e} after the step");
    }
    // The step's peak tape memory is reported and plausible (activations of a 512x512 batch
    // of two are several hundred MiB).
    assert!(stats.peak_bytes > 100 << 20, "peak {}", stats.peak_bytes);
}

fn run_loss(args: &[&str], annotations: &Path) -> std::process::Output {
    Command::new(bin())
        .arg("loss")
        .args(args)
        .arg("--annotations")
        .arg(annotations)
        .output()
        .unwrap()
}

#[test]
fn effdet_loss_rejects_bad_annotations_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let w = weights().display().to_string();
    let img0 = images()[0].display().to_string();
    let cases = [
        ("not json", "{", "not COCO JSON"),
        ("no images key", r#"{"annotations": []}"#, "not COCO JSON"),
        (
            "image not listed",
            r#"{"images": [{"id": 1, "file_name": "other.png"}], "annotations": []}"#,
            "no image with file_name \"img0.png\"",
        ),
        (
            "category out of range",
            r#"{"images": [{"id": 1, "file_name": "img0.png"}],
                "annotations": [{"id": 7, "image_id": 1, "category_id": 91, "bbox": [1, 2, 30, 40]}]}"#,
            "category_id 91 is outside 1..=90",
        ),
        (
            "unknown image id",
            r#"{"images": [{"id": 1, "file_name": "img0.png"}],
                "annotations": [{"id": 3, "image_id": 9, "category_id": 1, "bbox": [1, 2, 30, 40]}]}"#,
            "refers to image id 9",
        ),
        (
            "negative size",
            r#"{"images": [{"id": 1, "file_name": "img0.png"}],
                "annotations": [{"id": 4, "image_id": 1, "category_id": 1, "bbox": [1, 2, -30, 40]}]}"#,
            "invalid bbox",
        ),
    ];
    for (what, json, msg) in cases {
        let p = dir.path().join("ann.json");
        std::fs::write(&p, json).unwrap();
        let out = run_loss(&["--weights", &w, "--images", &img0], &p);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "{what}: {err}");
        assert!(err.contains(msg), "{what}: {err}");
    }
    // A missing annotations file, a missing weights file.
    let out = run_loss(
        &["--weights", &w, "--images", &img0],
        &dir.path().join("missing.json"),
    );
    assert_eq!(out.status.code(), Some(5), "missing annotations file");
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.json"));
    let out = run_loss(
        &["--weights", "/nonexistent.safetensors", "--images", &img0],
        &fixture("annotations.json"),
    );
    assert_eq!(out.status.code(), Some(3), "missing weights");
}

/// With frozen batch norm the training network computes what inference computes: its loss on
/// the golden batch equals the loss of the inference network's outputs (BN folded into the
/// convolutions) within 1e-4 relative (both f32; folding reorders the arithmetic of ~200
/// layers), the running statistics stay untouched, and the result differs from the
/// training-mode (batch statistics) loss, so the option is not a no-op.
#[test]
fn frozen_bn_training_loss_is_the_loss_of_the_inference_network() {
    use effdet::model::EfficientDet;
    use effdet::train::loss::detection_loss_batched;
    let store = WeightStore::open(weights()).unwrap();
    let mut net = TrainNet::from_store(&store, EfficientDetConfig::d0()).unwrap();
    let anns = CocoAnnotations::open(fixture("annotations.json")).unwrap();
    let batch = load_batch(&images(), &anns, 512, &net.labeler().unwrap()).unwrap();
    let backend = CpuBackend::new(2).unwrap();
    let loss_cfg = DetectionLoss::d0();

    let inference = EfficientDet::load(&backend, &store, EfficientDetConfig::d0()).unwrap();
    let outputs = backend
        .install(|| inference.forward(&backend, &batch.input))
        .unwrap();
    let class: Vec<&[f32]> = outputs.iter().map(|o| o.class.data()).collect();
    let boxes: Vec<&[f32]> = outputs.iter().map(|o| o.boxes.data()).collect();
    let want = detection_loss_batched(&class, &boxes, &batch.labels, &loss_cfg).unwrap();

    let before = net.buffers().clone();
    let frozen = TrainOptions {
        frozen_bn: true,
        ..TrainOptions::default()
    };
    let got = net
        .forward_backward(
            &backend,
            &batch.input,
            &batch.labels,
            &loss_cfg,
            &frozen,
            None,
        )
        .unwrap();
    assert_eq!(
        net.buffers(),
        &before,
        "frozen BN must not move the running statistics"
    );
    for (name, a, b) in [
        ("loss", got.loss, want.loss),
        ("class", got.class_loss, want.class_loss),
        ("box", got.box_loss, want.box_loss),
    ] {
        let rel = ((a - b) / b).abs();
        assert!(
            rel <= 1e-4,
            "{name}: frozen-BN training {a} vs inference {b} ({rel:.1e})"
        );
    }
    // Gradients reach the BN affine parameters (they still learn).
    let gamma = net
        .params()
        .iter()
        .find(|p| p.name == "backbone.bn1.weight")
        .unwrap();
    assert!(
        gamma
            .grad
            .as_ref()
            .unwrap()
            .data()
            .iter()
            .any(|g| *g != 0.0)
    );

    let train_mode = net
        .forward_backward(
            &backend,
            &batch.input,
            &batch.labels,
            &loss_cfg,
            &TrainOptions::default(),
            None,
        )
        .unwrap();
    assert!(
        ((train_mode.loss - got.loss) / got.loss).abs() > 1e-3,
        "training-mode {} vs frozen {}",
        train_mode.loss,
        got.loss
    );
}
