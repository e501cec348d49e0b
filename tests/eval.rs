//! COCO bbox evaluation against pycocotools' COCOeval (`tools/make_eval_fixtures.py`): the
//! library's 12 stats, the `effdet eval` command's JSON and text output, and its bad inputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use effdet::Error;
use effdet::eval::{
    CocoDetection, CocoStats, Detections, evaluate, iou_thresholds, recall_thresholds,
};
use effdet::train::coco::CocoAnnotations;
use serde_json::Value;

const CASES: [&str; 6] = ["mixed", "perfect", "crowd", "many", "edge", "no_detections"];

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/eval")
        .join(rel)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// pycocotools' stats and printed summary lines for a case.
fn expected(case: &str) -> ([f64; 12], Vec<String>) {
    let e = read_json(&fixture(&format!("{case}/expected.json")));
    let names: Vec<&str> = e["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(names, CocoStats::NAMES);
    let stats: Vec<f64> = e["stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let summary = e["summary"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    (stats.try_into().unwrap(), summary)
}

fn evaluate_case(case: &str) -> CocoStats {
    let gt = CocoAnnotations::open(fixture(&format!("{case}/gt.json"))).unwrap();
    let dets = Detections::open(fixture(&format!("{case}/dets.json"))).unwrap();
    evaluate(&gt, &dets).unwrap()
}

#[test]
fn stats_match_pycocotools_on_every_case() {
    let mut max_diff = 0.0f64;
    for case in CASES {
        let got = evaluate_case(case).to_array();
        let (want, _) = expected(case);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let diff = (g - w).abs();
            assert!(
                diff <= 1e-9,
                "{case} {}: got {g}, pycocotools {w}",
                CocoStats::NAMES[i]
            );
            max_diff = max_diff.max(diff);
        }
    }
    // Measured: 0 (bit-identical) on all 72 values.
    eprintln!("max |effdet - pycocotools| over all cases and stats: {max_diff:e}");
}

#[test]
fn thresholds_are_bitwise_numpy_linspace() {
    let meta = read_json(&fixture("meta.json"));
    let as_vec = |k: &str| -> Vec<f64> {
        meta[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    assert_eq!(iou_thresholds().to_vec(), as_vec("iou_thrs"));
    assert_eq!(recall_thresholds().to_vec(), as_vec("rec_thrs"));
}

#[test]
fn the_perfect_case_scores_one() {
    let s = evaluate_case("perfect");
    assert_eq!(s.ap, 1.0);
    assert_eq!(s.ap50, 1.0);
    assert_eq!(s.ap_medium, -1.0, "no medium ground truth");
}

#[test]
fn detections_in_memory_and_from_the_detector() {
    let gt = CocoAnnotations::open(fixture("perfect/gt.json")).unwrap();
    let empty = Detections::new("model output", Vec::new()).unwrap();
    assert_eq!(
        evaluate(&gt, &empty).unwrap().to_array(),
        expected("no_detections").0
    );

    let bad = CocoDetection {
        image_id: 1,
        category_id: 1,
        bbox: [0.0, 0.0, 10.0, 10.0],
        score: f64::NAN,
    };
    let err = Detections::new("model output", vec![bad]).unwrap_err();
    assert!(
        matches!(&err, Error::Annotations { path, reason }
            if path == Path::new("model output") && reason.contains("non-finite score")),
        "{err}"
    );

    let d = effdet::Detection {
        x1: 10.5,
        y1: 20.0,
        x2: 30.25,
        y2: 60.0,
        score: 0.75,
        class_id: 3,
        label: "car".into(),
    };
    assert_eq!(
        CocoDetection::from_detection(7, &d),
        CocoDetection {
            image_id: 7,
            category_id: 3,
            bbox: [10.5, 20.0, 19.75, 40.0],
            score: 0.75
        }
    );
}

/// COCO val2017 scale: 5,000 images, 80 categories, 100 detections per image.
#[test]
fn evaluates_five_thousand_images_quickly() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut images = Vec::new();
    let mut annotations = Vec::new();
    let mut dets = Vec::new();
    for im in 1..=5000u64 {
        images.push(serde_json::json!({"id": im, "file_name": format!("{im}.jpg")}));
        let mut boxes = Vec::new();
        for _ in 0..7 {
            let (w, h) = (5.0 + 300.0 * next(), 5.0 + 300.0 * next());
            let b = [300.0 * next(), 200.0 * next(), w, h];
            let cat = 1 + (next() * 80.0) as u64;
            annotations.push(serde_json::json!({
                "id": annotations.len() + 1, "image_id": im, "category_id": cat,
                "bbox": b, "area": w * h * 0.8, "iscrowd": u8::from(next() < 0.01),
            }));
            boxes.push((b, cat));
        }
        for i in 0..100 {
            let (b, cat) = if i < 14 {
                let (b, cat) = boxes[i % 7];
                let mut j = |v: f64, s: f64| v + s * 0.1 * (next() - 0.5);
                ([j(b[0], b[2]), j(b[1], b[3]), b[2], b[3]], cat)
            } else {
                let b = [
                    400.0 * next(),
                    300.0 * next(),
                    200.0 * next(),
                    200.0 * next(),
                ];
                (b, 1 + (next() * 80.0) as u64)
            };
            dets.push(CocoDetection {
                image_id: im,
                category_id: cat,
                bbox: b,
                score: next(),
            });
        }
    }
    let categories: Vec<Value> = (1..=80)
        .map(|c| serde_json::json!({"id": c, "name": format!("c{c}")}))
        .collect();
    let text = serde_json::json!({
        "images": images, "annotations": annotations, "categories": categories,
    })
    .to_string();
    let gt = CocoAnnotations::from_json("synthetic", &text).unwrap();
    let dets = Detections::new("synthetic detections", dets).unwrap();
    let t = Instant::now();
    let s = evaluate(&gt, &dets).unwrap();
    let secs = t.elapsed().as_secs_f64();
    eprintln!("5000 images x 100 detections: {secs:.2} s, AP {:.4}", s.ap);
    assert!(s.ap > 0.0 && s.ap < 1.0);
    // Generous: a few seconds on two busy cores.
    assert!(secs < 20.0, "evaluation took {secs:.1} s");
}

fn effdet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_effdet"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the effdet binary runs")
}

fn run_eval(dets: &Path, gt: &Path, json: bool) -> Output {
    let mut args = vec![
        "eval",
        "--detections",
        dets.to_str().unwrap(),
        "--annotations",
        gt.to_str().unwrap(),
    ];
    if json {
        args.push("--json");
    }
    effdet(&args)
}

#[test]
fn cli_json_is_one_object_with_the_twelve_stats() {
    let o = run_eval(&fixture("mixed/dets.json"), &fixture("mixed/gt.json"), true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    assert_eq!(out.lines().count(), 1, "{out}");
    // Keys in COCOeval.stats order.
    let mut pos = 0;
    for name in CocoStats::NAMES {
        let at = out[pos..]
            .find(&format!("\"{name}\":"))
            .unwrap_or_else(|| panic!("{name} missing or out of order in {out}"));
        pos += at + name.len() + 3;
    }
    let v: Value = serde_json::from_str(&out).unwrap();
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 12);
    let (want, _) = expected("mixed");
    for (name, w) in CocoStats::NAMES.iter().zip(want) {
        let g = obj[*name].as_f64().unwrap();
        assert!((g - w).abs() <= 1e-9, "{name}: {g} vs {w}");
    }
}

#[test]
fn cli_text_prints_pycocotools_summary_lines() {
    for case in CASES {
        let o = run_eval(
            &fixture(&format!("{case}/dets.json")),
            &fixture(&format!("{case}/gt.json")),
            false,
        );
        assert!(
            o.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let out = String::from_utf8(o.stdout).unwrap();
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with(" Average")).collect();
        let (_, want) = expected(case);
        assert_eq!(lines, want, "{case}");
    }
    let o = run_eval(
        &fixture("mixed/dets.json"),
        &fixture("mixed/gt.json"),
        false,
    );
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(
        out.starts_with("88 detection(s) on 14 image(s), 5 categories")
            && out.contains("1 detection(s) of categories not in the ground truth left out"),
        "{out}"
    );
}

/// Asserts a clean failure: the exit status, a message containing `needle`, no panic, no
/// stats on stdout.
fn assert_fails(o: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "expected {needle:?} in stderr: {err}");
    assert!(!err.contains("panicked"), "panic in stderr: {err}");
    assert!(
        o.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn cli_rejects_bad_detections_with_status_5() {
    let dir = tempfile::tempdir().unwrap();
    let gt = fixture("edge/gt.json");
    let cases: [(&str, &str); 8] = [
        ("this is not json", "not a COCO results file"),
        (r#"{"image_id": 1}"#, "not a COCO results file"),
        (
            r#"[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}]"#,
            "missing field `score`",
        ),
        (
            r#"[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5], "score": 0.5}]"#,
            "not a COCO results file",
        ),
        (
            r#"[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": NaN}]"#,
            "not a COCO results file",
        ),
        (
            r#"[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1e999, 5], "score": 0.5}]"#,
            "number out of range",
        ),
        (
            r#"[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5},
                {"image_id": 1, "category_id": 1, "bbox": [0, 0, -5, 5], "score": 0.5}]"#,
            "detection #1 (image 1) has an invalid bbox [0.0, 0.0, -5.0, 5.0]",
        ),
        (
            r#"[{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]"#,
            "detection #0 (0-based) refers to image id 999, which is not in the ground truth",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("dets{i}.json"));
        std::fs::write(&p, text).unwrap();
        let o = run_eval(&p, &gt, true);
        assert_fails(&o, 5, needle);
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(p.to_str().unwrap()),
            "the message names the detections file"
        );
    }
    let missing = dir.path().join("missing.json");
    assert_fails(&run_eval(&missing, &gt, false), 5, "cannot read");
}

#[test]
fn cli_rejects_bad_ground_truth_with_status_5() {
    let dir = tempfile::tempdir().unwrap();
    let dets = fixture("edge/dets.json");
    let image = r#"{"id": 1, "file_name": "a.jpg"}"#;
    let cat = r#"{"id": 1, "name": "person"}"#;
    let ann = |extra: &str| {
        format!(r#"{{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 0{extra}}}"#)
    };
    let gt_file = |anns: &[String]| {
        format!(
            r#"{{"images": [{image}], "annotations": [{}], "categories": [{cat}]}}"#,
            anns.join(",")
        )
    };
    let cases = [
        ("[1, 2, 3]".to_string(), "not COCO JSON"),
        (gt_file(&[ann("")]), "annotation #0 (0-based) has no `id`"),
        (
            gt_file(&[ann(r#", "id": 4"#), ann(r#", "id": 4"#)]),
            "annotation id 4 appears twice",
        ),
        (
            gt_file(&[ann(r#", "id": 4, "area": -3"#)]),
            "annotation 4 has an invalid area -3",
        ),
    ];
    // No detections, so that only the ground truth can be at fault.
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, "[]").unwrap();
    for (i, (text, needle)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("gt{i}.json"));
        std::fs::write(&p, text).unwrap();
        let o = run_eval(&empty, &p, false);
        assert_fails(&o, 5, needle);
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(p.to_str().unwrap()),
            "the message names the ground-truth file"
        );
    }
    let missing = dir.path().join("missing.json");
    assert_fails(&run_eval(&dets, &missing, false), 5, "cannot read");
}

#[test]
fn cli_needs_detections_or_weights() {
    let o = effdet(&[
        "eval",
        "--annotations",
        fixture("edge/gt.json").to_str().unwrap(),
    ]);
    assert_fails(&o, 2, "give --detections FILE");
    // --weights needs --images, and excludes --detections (clap: exit 2).
    let o = effdet(&[
        "eval",
        "--annotations",
        fixture("edge/gt.json").to_str().unwrap(),
        "--weights",
        "w.safetensors",
    ]);
    assert_eq!(o.status.code(), Some(2));
}
