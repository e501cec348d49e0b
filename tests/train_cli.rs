//! `effdet train` end to end on a tiny dataset (the golden images at 128x128): the output files,
//! exact resume (a run interrupted and resumed ends bit-identical to an uninterrupted one), and
//! clear errors for incompatible checkpoints and bad data.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use effdet::train::optim::load_tensors;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Annotations for the two golden images with the categories they use (12 of COCO's).
fn dataset(dir: &Path, drop_category: Option<u64>) -> PathBuf {
    let text =
        std::fs::read_to_string(root().join("tests/fixtures/train_step/annotations.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let used: std::collections::BTreeSet<u64> = v["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["category_id"].as_u64().unwrap())
        .filter(|&c| Some(c) != drop_category)
        .collect();
    let cats: Vec<serde_json::Value> = v["categories"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| used.contains(&c["id"].as_u64().unwrap()))
        .cloned()
        .collect();
    v["categories"] = serde_json::Value::Array(cats);
    let p = dir.join(format!("ann{}.json", drop_category.unwrap_or(0)));
    std::fs::write(&p, v.to_string()).unwrap();
    p
}

fn train(ann: &Path, out: &Path, extra: &[&str]) -> Output {
    let imgs = root().join("tests/fixtures/golden");
    // Defaults for the test unless `extra` sets them.
    let mut base = vec!["train", "--epochs", "4", "--threads", "2", "--workers", "2"];
    for (flag, value) in [("--size", "128"), ("--batch", "2"), ("--eval-every", "0")] {
        if !extra.contains(&flag) {
            base.extend([flag, value]);
        }
    }
    Command::new(env!("CARGO_BIN_EXE_effdet"))
        .args(&base)
        .arg("--train-annotations")
        .arg(ann)
        .arg("--train-images")
        .arg(&imgs)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "effdet train failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn training_writes_its_artefacts_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ann = dataset(dir.path(), None);
    let imgs = root().join("tests/fixtures/golden");
    let (ann_s, imgs_s) = (ann.to_str().unwrap(), imgs.to_str().unwrap());

    // Uninterrupted: 4 updates, validated at the end.
    let full = dir.path().join("full");
    ok(&train(
        &ann,
        &full,
        &["--val-annotations", ann_s, "--val-images", imgs_s],
    ));
    for f in [
        "model.safetensors",
        "model.onnx",
        "labels.txt",
        "metrics.csv",
        "curves.svg",
        "MODEL_CARD.md",
        "checkpoint.safetensors",
    ] {
        assert!(full.join(f).is_file(), "{f} missing");
    }
    let csv = std::fs::read_to_string(full.join("metrics.csv")).unwrap();
    assert!(csv.starts_with("epoch,update,lr,loss"), "{csv}");
    assert!(csv.lines().count() >= 5, "{csv}");
    let labels = std::fs::read_to_string(full.join("labels.txt")).unwrap();
    assert!(
        labels.lines().filter(|l| !l.starts_with('#')).count() == 12,
        "{labels}"
    );
    assert!(
        std::fs::read_to_string(full.join("MODEL_CARD.md"))
            .unwrap()
            .contains("AP@[.5:.95]")
    );
    assert!(
        std::fs::read_to_string(full.join("curves.svg"))
            .unwrap()
            .starts_with("<svg")
    );

    // Interrupted after 2 updates, then resumed to the end.
    let part = dir.path().join("part");
    ok(&train(&ann, &part, &["--max-updates", "2"]));
    let ck = part.join("checkpoint.safetensors");
    let resumed = dir.path().join("resumed");
    ok(&train(&ann, &resumed, &["--resume", ck.to_str().unwrap()]));
    let a = load_tensors(full.join("model.safetensors")).unwrap();
    let b = load_tensors(resumed.join("model.safetensors")).unwrap();
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        assert_eq!(t, &b[k], "{k} differs after resume");
    }

    // The trained weights load into the detector with no extra settings: 12 classes from the
    // predictor's shape, names and input size from the file's metadata.
    let o = Command::new(env!("CARGO_BIN_EXE_effdet"))
        .arg("detect")
        .arg("--weights")
        .arg(full.join("model.safetensors"))
        .arg("--image")
        .arg(imgs.join("img0.png"))
        .args(["--json", "--score-threshold", "0"])
        .output()
        .unwrap();
    ok(&o);
    let dets: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = labels
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' ').map(|(_, n)| n))
        .collect();
    let dets = dets.as_array().unwrap();
    assert_eq!(dets.len(), 100);
    for d in dets {
        assert!(d["class_id"].as_u64().unwrap() <= 12);
        assert!(names.contains(&d["label"].as_str().unwrap()), "{d}");
    }
    let store = effdet::model::WeightStore::open(full.join("model.safetensors")).unwrap();
    assert_eq!(store.metadata()["effdet.image_size"], "128");
    // Tools run a model at its trained size unless told another one, 512 included.
    let d0 = effdet::model::EfficientDetConfig::d0;
    let size = |s| effdet::detector::config_for_weights(&store, d0(), s).map(|c| c.image_size);
    assert_eq!(size(None).unwrap(), (128, 128));
    assert_eq!(size(Some(512)).unwrap(), (512, 512));
    let err = size(Some(100)).unwrap_err().to_string();
    assert!(
        err.contains("input size 100 is not a positive multiple of 128"),
        "{err}"
    );
    let detect = |size: &str| {
        Command::new(env!("CARGO_BIN_EXE_effdet"))
            .arg("detect")
            .arg("--weights")
            .arg(full.join("model.safetensors"))
            .arg("--image")
            .arg(imgs.join("img0.png"))
            .args(["--json", "--score-threshold", "0", "--size", size])
            .output()
            .unwrap()
    };
    let o = detect("256");
    ok(&o);
    let at_256: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(at_256.as_array().unwrap().len(), 100);
    assert_ne!(
        at_256.as_array().unwrap(),
        dets,
        "--size 256 must change the network's input"
    );
    let o = detect("100");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("multiple of 128"));

    // Incompatible checkpoints are refused, naming the mismatch.
    let other = dataset(dir.path(), Some(1));
    let o = train(
        &other,
        &dir.path().join("x"),
        &["--resume", ck.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("12 classes") && err.contains("this run 11"),
        "{err}"
    );
    let o = train(
        &ann,
        &dir.path().join("y"),
        &["--resume", ck.to_str().unwrap(), "--size", "256"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("input size 128"),
        "{err}"
    );
    let o = train(
        &ann,
        &dir.path().join("w"),
        &["--resume", ck.to_str().unwrap(), "--optimizer", "adamw"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("trained with sgd, this run uses adamw"),
        "{err}"
    );
    let o = train(&ann, &dir.path().join("z"), &["--resume", ann_s]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("safetensors"));
}

/// `--optimizer adamw`: the checkpoint carries Adam's moments and step counts, and an
/// interrupted run resumes bit-identically, as with SGD.
#[test]
fn training_with_adamw_keeps_its_state_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ann = dataset(dir.path(), None);
    let adamw = [
        "--optimizer",
        "adamw",
        "--lr",
        "0.001",
        "--weight-decay",
        "0.01",
    ];
    let full = dir.path().join("full");
    ok(&train(&ann, &full, &adamw));
    let part = dir.path().join("part");
    ok(&train(
        &ann,
        &part,
        &[&adamw[..], &["--max-updates", "2"]].concat(),
    ));
    let ck = part.join("checkpoint.safetensors");
    let state = load_tensors(&ck).unwrap();
    for suffix in [".exp_avg", ".exp_avg_sq", ".step"] {
        assert!(
            state
                .keys()
                .any(|k| k.starts_with("optim.") && k.ends_with(suffix)),
            "no optim.*{suffix} in the checkpoint"
        );
    }
    assert!(!state.keys().any(|k| k.ends_with(".momentum_buffer")));
    let resumed = dir.path().join("resumed");
    ok(&train(
        &ann,
        &resumed,
        &[&adamw[..], &["--resume", ck.to_str().unwrap()]].concat(),
    ));
    let a = load_tensors(full.join("model.safetensors")).unwrap();
    let b = load_tensors(resumed.join("model.safetensors")).unwrap();
    for (k, t) in &a {
        assert_eq!(t, &b[k], "{k} differs after resume");
    }
    // The weights moved: AdamW really stepped.
    let init = load_tensors(part.join("model.safetensors")).unwrap();
    assert!(a.iter().any(|(k, t)| t != &init[k]));
}

#[test]
fn training_refuses_bad_data_and_settings_clearly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.json"), "{ nope").unwrap();
    let o = train(&dir.path().join("bad.json"), &dir.path().join("o"), &[]);
    assert_eq!(o.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not COCO JSON"));
    let ann = dataset(dir.path(), None);
    let o = train(&ann, &dir.path().join("o"), &["--size", "100"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("multiple of 128"));
    let o = train(&ann, &dir.path().join("o"), &["--optimizer", "lamb"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown optimizer `lamb`"));
    let o = train(&ann, &dir.path().join("o"), &["--batch", "3"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot fill one batch"));
}

/// `--freeze-bn`: the batch norms train with their running statistics (inference mode), so
/// the statistics come out as they went in while the weights move.
#[test]
fn training_with_frozen_bn_keeps_the_running_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let ann = dataset(dir.path(), None);
    let init = root().join("tests/fixtures/golden/weights_f16.safetensors");
    let out = dir.path().join("frozen");
    ok(&train(
        &ann,
        &out,
        &[
            "--weights",
            init.to_str().unwrap(),
            "--freeze-bn",
            "--max-updates",
            "2",
            "--optimizer",
            "adamw",
            "--lr",
            "0.001",
        ],
    ));
    let init = effdet::model::WeightStore::open(&init).unwrap();
    let after = load_tensors(out.join("model.safetensors")).unwrap();
    let before = |k: &str, t: &effdet::compute::Tensor| init.take(k, t.shape()).ok();
    let mut stats = 0;
    for (k, t) in &after {
        if k.ends_with(".running_mean") || k.ends_with(".running_var") {
            stats += 1;
            let b = before(k, t).unwrap_or_else(|| panic!("{k} is not in the initial weights"));
            // The EMA of a constant is that constant up to f32 rounding of `d x + (1 - d) x`.
            for (a, b) in t.data().iter().zip(b.data()) {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{k}: {a} vs {b}");
            }
        }
    }
    assert_eq!(
        stats,
        2 * 108,
        "every batch norm's statistics are in the weights"
    );
    assert!(
        after
            .iter()
            .any(|(k, t)| k.ends_with(".weight") && before(k, t).is_some_and(|b| &b != t)),
        "the weights must move"
    );
}

/// `effdet loss` takes the class count and input size from the weights (the bundled 6-class,
/// 256x256 shapes model), and `--freeze-bn` gives the loss of what inference computes.
#[test]
fn effdet_loss_reads_the_model_shape_from_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_effdet");
    let synth = Command::new(bin)
        .args([
            "synth",
            "--train",
            "2",
            "--val",
            "0",
            "--size",
            "256",
            "--video-frames",
            "0",
        ])
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        synth.status.success(),
        "{}",
        String::from_utf8_lossy(&synth.stderr)
    );
    let images = dir.path().join("train/images");
    let loss = |extra: &[&str]| {
        let o = Command::new(bin)
            .arg("loss")
            .arg("--weights")
            .arg(root().join("models/effdet-d0-shapes256.safetensors"))
            .arg("--images")
            .arg(images.join("000000.png"))
            .arg("--annotations")
            .arg(dir.path().join("train/annotations.json"))
            .args(["--json", "--threads", "2"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let (batch_stats, frozen) = (loss(&[]), loss(&["--freeze-bn"]));
    assert!(batch_stats.is_finite() && frozen.is_finite() && frozen > 0.0);
    assert_ne!(
        batch_stats, frozen,
        "the two BN modes must differ on one image"
    );
}
