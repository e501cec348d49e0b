//! The `effdet` binary as a user runs it: output formats, and every bad input with its message
//! and exit status (never a panic).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::{Dtype, TensorView};

const WEIGHTS: &str = "tests/fixtures/golden/weights_f16.safetensors";
const IMAGE: &str = "tests/fixtures/golden/img0.png";

fn effdet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_effdet"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the effdet binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean failure: the exit status, a message containing `needle`, and no panic.
fn assert_fails(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "expected {needle:?} in stderr: {err}");
    assert!(!err.contains("panicked"), "panic in stderr: {err}");
    assert!(o.stdout.is_empty() || !String::from_utf8_lossy(&o.stdout).contains('['));
}

fn detect_with_weights(weights: &Path) -> Output {
    effdet(&[
        "detect",
        "--weights",
        weights.to_str().unwrap(),
        "--image",
        IMAGE,
        "--json",
    ])
}

/// Writes a safetensors file with the given (name, dtype, shape, bytes) tensors.
fn write_safetensors(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: HashMap<String, TensorView<'_>> = tensors
        .iter()
        .map(|(k, dt, shape, data)| {
            (
                k.clone(),
                TensorView::new(*dt, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// The fixture weights as owned (name, dtype, shape, bytes) tuples.
fn fixture_tensors() -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(WEIGHTS)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect()
}

fn tmp(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    (dir, p)
}

#[test]
fn json_output_is_one_array_of_detections_best_first() {
    let o = effdet(&[
        "detect",
        "--weights",
        WEIGHTS,
        "--image",
        IMAGE,
        "--json",
        "--score-threshold",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("stdout is exactly one JSON value");
    let arr = v.as_array().expect("a JSON array");
    assert_eq!(
        arr.len(),
        100,
        "--score-threshold 0 keeps effdet's 100 detections"
    );
    let mut last = f64::INFINITY;
    for d in arr {
        let obj = d.as_object().unwrap();
        let keys: Vec<_> = obj.keys().map(String::as_str).collect();
        for k in ["x1", "y1", "x2", "y2", "score", "class_id", "label"] {
            assert!(keys.contains(&k), "missing {k} in {d}");
        }
        let s = obj["score"].as_f64().unwrap();
        assert!(s <= last, "scores must be sorted best first");
        last = s;
        let id = obj["class_id"].as_u64().unwrap();
        assert!((1..=90).contains(&id));
        // Boxes are in original-image pixels (img0 is 640x480) and clipped to it.
        assert!(obj["x2"].as_f64().unwrap() <= 640.01 && obj["y2"].as_f64().unwrap() <= 480.01);
        assert!(obj["x1"].as_f64().unwrap() >= 0.0 && obj["y1"].as_f64().unwrap() >= 0.0);
    }
}

#[test]
fn score_threshold_filters_and_table_output_lists_labels() {
    let o = effdet(&[
        "detect",
        "--weights",
        WEIGHTS,
        "--image",
        IMAGE,
        "--json",
        "--score-threshold",
        "0.96",
    ]);
    assert!(o.status.success());
    let arr: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(arr.iter().all(|d| d["score"].as_f64().unwrap() >= 0.96));
    // The fixture's top-100 scores span 0.93-0.99, so 0.96 keeps some and drops some.
    assert!(!arr.is_empty() && arr.len() < 100, "{} kept", arr.len());

    let (_d, out) = tmp("annotated.png");
    let o = effdet(&[
        "detect",
        "--weights",
        WEIGHTS,
        "--image",
        IMAGE,
        "--score-threshold",
        "0",
        "--max-detections",
        "5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("5 detection(s)"), "{text}");
    let img = image::open(&out).expect("annotated PNG written").to_rgb8();
    assert_eq!((img.width(), img.height()), (640, 480));
}

#[test]
fn bench_json_has_the_documented_fields() {
    let o = effdet(&[
        "bench",
        "--weights",
        WEIGHTS,
        "--backend",
        "cpu",
        "--threads",
        "1",
        "--batch",
        "1,2",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // One JSON line per batch size, in the order given.
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (v, batch) in lines.iter().zip([1, 2]) {
        assert_eq!(v["backend"], "cpu");
        assert_eq!(v["batch"], batch);
        assert_eq!(v["threads"], 1);
        for k in [
            "network_ms_median",
            "network_ms_p90",
            "network_images_per_s",
            "end_to_end_ms_median",
            "end_to_end_ms_p90",
            "end_to_end_images_per_s",
        ] {
            assert!(v[k].as_f64().unwrap() > 0.0, "{k}");
        }
        let per_s = 1000.0 / v["network_ms_median"].as_f64().unwrap();
        assert!((v["network_images_per_s"].as_f64().unwrap() - per_s).abs() < 1e-6 * per_s);
        // The CPU engine has no device memory to report.
        assert!(v["device_memory_bytes"].is_null());
    }
}

/// `effdet bench-train` on a model of another shape (the bundled 6-class shapes model) takes its
/// class count and trained input size from the weights; `--size` overrides the size.
#[test]
fn bench_train_takes_the_models_shape_from_the_weights() {
    let run = |extra: &[&str]| {
        let mut args = vec![
            "bench-train",
            "--weights",
            "models/effdet-d0-shapes256.safetensors",
            "--batch",
            "1",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--threads",
            "2",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = effdet(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v
    };
    let trained = effdet::model::WeightStore::open(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/effdet-d0-shapes256.safetensors"),
    )
    .unwrap()
    .metadata()["effdet.image_size"]
        .parse::<u64>()
        .unwrap();
    assert_eq!(run(&[])["size"], trained);
    let v = run(&["--size", "128"]);
    assert_eq!(v["size"], 128);
    assert!(v["step_ms_per_image_median"].as_f64().unwrap() > 0.0);
    assert_fails(
        &effdet(&["bench-train", "--weights", WEIGHTS, "--size", "200"]),
        2,
        "multiple of 128",
    );
}

#[test]
fn help_documents_every_option() {
    let o = effdet(&["detect", "--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for opt in [
        "--weights",
        "--image",
        "--score-threshold",
        "--iou-threshold",
        "--max-detections",
        "--json",
        "--out",
        "--soft-nms",
        "--labels",
        "--threads",
        "--backend",
    ] {
        assert!(text.contains(opt), "detect --help lacks {opt}");
    }
    let o = effdet(&["bench", "--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for opt in [
        "--weights",
        "--backend",
        "--batch",
        "--threads",
        "--iters",
        "--json",
    ] {
        assert!(text.contains(opt), "bench --help lacks {opt}");
    }
}

#[test]
fn missing_weights_file() {
    let o = detect_with_weights(Path::new("no/such/weights.safetensors"));
    assert_fails(&o, 3, "no/such/weights.safetensors");
}

#[test]
fn unreadable_weights_path() {
    // A directory cannot be read as a file, even by root.
    let dir = tempfile::tempdir().unwrap();
    let o = detect_with_weights(dir.path());
    assert_fails(&o, 3, "cannot read");
}

#[test]
fn truncated_weights_file() {
    let bytes = std::fs::read(WEIGHTS).unwrap();
    let (_d, p) = tmp("truncated.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&detect_with_weights(&p), 3, "not a valid safetensors");
}

#[test]
fn non_safetensors_file() {
    assert_fails(
        &detect_with_weights(Path::new(IMAGE)),
        3,
        "not a valid safetensors",
    );
}

#[test]
fn tensor_with_wrong_shape_names_key_and_both_shapes() {
    let mut t = fixture_tensors();
    let stem = t
        .iter_mut()
        .find(|x| x.0 == "backbone.conv_stem.weight")
        .unwrap();
    stem.2 = vec![32, 3, 9, 1];
    let (_d, p) = tmp("bad_shape.safetensors");
    write_safetensors(&p, &t);
    let o = detect_with_weights(&p);
    assert_fails(&o, 3, "backbone.conv_stem.weight");
    let err = stderr(&o);
    assert!(
        err.contains("[32, 3, 9, 1]") && err.contains("[32, 3, 3, 3]"),
        "{err}"
    );
}

#[test]
fn tensor_with_wrong_dtype() {
    let mut t = fixture_tensors();
    let stem = t
        .iter_mut()
        .find(|x| x.0 == "backbone.conv_stem.weight")
        .unwrap();
    stem.1 = Dtype::I16; // same byte size as f16, wrong type
    let (_d, p) = tmp("bad_dtype.safetensors");
    write_safetensors(&p, &t);
    let o = detect_with_weights(&p);
    assert_fails(&o, 3, "backbone.conv_stem.weight");
    assert!(stderr(&o).contains("dtype"));
}

#[test]
fn missing_tensor() {
    let t: Vec<_> = fixture_tensors()
        .into_iter()
        .filter(|x| x.0 != "fpn.cell.1.fnode.4.combine.edge_weights")
        .collect();
    let (_d, p) = tmp("missing.safetensors");
    write_safetensors(&p, &t);
    assert_fails(
        &detect_with_weights(&p),
        3,
        "missing tensor `fpn.cell.1.fnode.4.combine.edge_weights`",
    );
}

#[test]
fn unexpected_tensor() {
    let mut t = fixture_tensors();
    t.push((
        "class_net.extra.weight".into(),
        Dtype::F32,
        vec![2],
        vec![0; 8],
    ));
    let (_d, p) = tmp("extra.safetensors");
    write_safetensors(&p, &t);
    assert_fails(&detect_with_weights(&p), 3, "class_net.extra.weight");
}

#[test]
fn missing_image() {
    let o = effdet(&[
        "detect",
        "--weights",
        WEIGHTS,
        "--image",
        "no/such/image.png",
    ]);
    assert_fails(&o, 4, "no/such/image.png");
}

#[test]
fn unsupported_image_format() {
    let (_d, p) = tmp("image.bmp");
    // A valid 1x1 BMP: recognisable, but not PNG or JPEG.
    let mut bmp = b"BM".to_vec();
    bmp.extend_from_slice(&[
        58, 0, 0, 0, 0, 0, 0, 0, 54, 0, 0, 0, 40, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 24, 0,
    ]);
    bmp.extend_from_slice(&[0; 24]);
    bmp.extend_from_slice(&[255, 0, 0, 0]);
    std::fs::write(&p, bmp).unwrap();
    let o = effdet(&[
        "detect",
        "--weights",
        WEIGHTS,
        "--image",
        p.to_str().unwrap(),
    ]);
    assert_fails(&o, 4, "not supported");

    std::fs::write(&p, b"just some text, not an image").unwrap();
    let o = effdet(&[
        "detect",
        "--weights",
        WEIGHTS,
        "--image",
        p.to_str().unwrap(),
    ]);
    assert_fails(&o, 4, "not a PNG or JPEG");
}

#[test]
fn truncated_image() {
    let bytes = std::fs::read(IMAGE).unwrap();
    let (_d, p) = tmp("cut.png");
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    let o = effdet(&[
        "detect",
        "--weights",
        WEIGHTS,
        "--image",
        p.to_str().unwrap(),
    ]);
    assert_fails(&o, 4, "cannot decode");
}

/// CRC-32 (PNG chunk checksums), to build a PNG whose header declares zero width.
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn zero_size_image() {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&0u32.to_be_bytes()); // width 0
    ihdr.extend_from_slice(&1u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    png.extend_from_slice(&[0, 0, 0, 0]);
    png.extend_from_slice(b"IEND");
    png.extend_from_slice(&crc32(b"IEND").to_be_bytes());
    let (_d, p) = tmp("zero.png");
    std::fs::write(&p, png).unwrap();
    let o = effdet(&[
        "detect",
        "--weights",
        WEIGHTS,
        "--image",
        p.to_str().unwrap(),
    ]);
    assert_fails(&o, 4, "zero.png");
}

#[test]
fn out_of_range_arguments() {
    let o = effdet(&[
        "detect",
        "--weights",
        WEIGHTS,
        "--image",
        IMAGE,
        "--score-threshold",
        "1.5",
    ]);
    assert_fails(&o, 2, "--score-threshold");
    let o = effdet(&["bench", "--weights", WEIGHTS, "--batch", "0"]);
    assert_fails(&o, 2, "--batch");
    let o = effdet(&[
        "detect",
        "--weights",
        WEIGHTS,
        "--image",
        IMAGE,
        "--backend",
        "cuda",
    ]);
    assert_fails(&o, 1, "cuda");
    let o = effdet(&[
        "detect",
        "--weights",
        WEIGHTS,
        "--image",
        IMAGE,
        "--labels",
        "no/labels.txt",
    ]);
    assert_fails(&o, 1, "no/labels.txt");
}

/// Every flag of every subcommand has a help line (and says its default once: clap's
/// `[default: ...]` where the flag has one, the text where a config or the weights decide).
#[test]
fn every_flag_of_every_subcommand_has_help() {
    for sub in [
        "detect",
        "bench",
        "loss",
        "train",
        "bench-data",
        "bench-train",
        "synth",
        "eval",
        "export",
    ] {
        let out = effdet(&[sub, "--help"]);
        assert!(out.status.success(), "{sub} --help");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut flags = 0;
        for line in text.lines().filter(|l| l.trim_start().starts_with('-')) {
            flags += 1;
            let help = line
                .trim()
                .split("  ")
                .filter(|p| !p.trim().is_empty())
                .nth(1);
            assert!(
                help.is_some_and(|h| !h.trim().is_empty()),
                "{sub}: `{}` has no help text",
                line.trim()
            );
            assert!(
                line.matches("[default:").count() <= 1,
                "{sub}: `{}` states its default twice",
                line.trim()
            );
        }
        assert!(flags >= 3, "{sub}: {flags} flags found in:\n{text}");
    }
}

/// `effdet bench --profile`: the CPU engine's time per op kind, section and layer, whose shares
/// add up, with every part of the network named.
#[test]
fn bench_profile_names_every_section_and_op_kind() {
    let weights = "tests/fixtures/golden/weights_f16.safetensors";
    let out = effdet(&[
        "bench",
        "--weights",
        weights,
        "--backend",
        "cpu",
        "--threads",
        "1",
        "--size",
        "128",
        "--batch",
        "1,2",
        "--iters",
        "2",
        "--warmup",
        "0",
        "--profile",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let profiles: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("profile").cloned())
        .collect();
    assert_eq!(profiles.len(), 2, "one profile per batch size:\n{text}");
    for (p, batch) in profiles.iter().zip([1, 2]) {
        assert_eq!(p["batch"], batch);
        assert_eq!(p["passes"], 2);
        let total = p["ms_per_pass"].as_f64().unwrap();
        for group in ["by_kind", "by_section", "by_layer"] {
            let sum: f64 = p[group]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["ms_per_pass"].as_f64().unwrap())
                .sum();
            assert!(
                (sum - total).abs() <= 1e-6 * total.max(1.0),
                "{group}: {sum} vs {total}"
            );
        }
        let names = |group: &str| -> Vec<String> {
            p[group]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["name"].as_str().unwrap().to_string())
                .collect()
        };
        let sections = names("by_section");
        for s in [
            "stem",
            "stage1",
            "stage7",
            "bifpn.p6p7",
            "bifpn.cell3.node8",
            "class_head",
            "box_head",
        ] {
            assert!(
                sections.iter().any(|n| n == s),
                "section {s} missing: {sections:?}"
            );
        }
        let kinds = names("by_kind");
        for k in [
            "pointwise",
            "depthwise 5x5 s2 + swish",
            "SE pool",
            "conv 3x3 s2 + swish",
        ] {
            assert!(kinds.iter().any(|n| n == k), "kind {k} missing: {kinds:?}");
        }
    }
    // The CUDA engine's kernels are profiled by ncu, not by this.
    let out = effdet(&[
        "bench",
        "--weights",
        weights,
        "--backend",
        "cuda",
        "--profile",
    ]);
    assert_eq!(out.status.code(), Some(2));
}
