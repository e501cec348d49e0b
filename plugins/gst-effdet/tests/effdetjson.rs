//! `effdetjson`: one JSON line per buffer with the schema, numbering, timestamps and metas.

use std::path::Path;
use std::sync::Once;

use gst::prelude::*;
use gst_check::Harness;
use serde_json::Value;

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().expect("GStreamer initialises");
        gsteffdet::plugin_register_static().expect("effdet plugin registers");
    });
}

const CAPS: &str = "video/x-raw,format=RGB,width=64,height=48,framerate=30/1";

/// A harness around an `effdetjson` writing to `path`, already playing, caps set.
fn harness(path: &Path) -> Harness {
    let element = gst::ElementFactory::make("effdetjson")
        .property("location", path.to_str().expect("utf-8 temp path"))
        .build()
        .expect("effdetjson exists");
    let mut h = Harness::with_element(&element, Some("sink"), Some("src"));
    h.set_src_caps_str(CAPS);
    h
}

fn frame_buffer(pts: Option<gst::ClockTime>) -> gst::Buffer {
    let mut buffer = gst::Buffer::with_size(64 * 48 * 3).expect("buffer");
    buffer.get_mut().expect("writable").set_pts(pts);
    buffer
}

/// Parses every line of the output; also checks the order of the top-level keys in the text
/// (`Value` sorts keys, so the order is checked on the raw line).
fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("output file")
        .lines()
        .map(|l| {
            let at = |k: &str| l.find(&format!("\"{k}\":")).unwrap_or(usize::MAX);
            let order = ["frame", "pts", "width", "height", "detections"].map(at);
            assert!(
                order.is_sorted() && order[4] != usize::MAX,
                "key order in {l}"
            );
            serde_json::from_str(l).expect("every line is JSON")
        })
        .collect()
}

/// Checks the keys (and their order) of a frame line and of each detection.
fn check_schema(line: &Value) {
    let obj = line.as_object().expect("line is an object");
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    let mut sorted = vec!["frame", "pts", "width", "height", "detections"];
    sorted.sort();
    let mut got = keys.clone();
    got.sort();
    assert_eq!(got, sorted, "keys of {line}");
    assert!(line["frame"].is_u64());
    assert!(line["pts"].is_u64() || line["pts"].is_null());
    for d in line["detections"].as_array().expect("detections array") {
        let mut keys: Vec<&str> = d
            .as_object()
            .expect("detection object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            ["class_id", "label", "score", "x1", "x2", "y1", "y2"],
            "keys of {d}"
        );
    }
}

#[test]
fn lines_follow_schema_with_frame_numbers_pts_and_size() {
    init();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("out.jsonl");
    let mut h = harness(&path);
    for i in 0..5u64 {
        let pts = (i != 3).then(|| gst::ClockTime::from_mseconds(33 * i));
        let out = h.push_and_pull(frame_buffer(pts)).expect("buffer passes");
        assert_eq!(out.pts(), pts, "buffer forwarded unchanged");
    }
    assert!(h.push_event(gst::event::Eos::new()));

    let lines = lines(&path);
    assert_eq!(lines.len(), 5);
    for (i, line) in lines.iter().enumerate() {
        check_schema(line);
        assert_eq!(line["frame"], i as u64);
        assert_eq!(line["width"], 64);
        assert_eq!(line["height"], 48);
        assert_eq!(line["detections"], Value::Array(vec![]));
        if i == 3 {
            assert!(line["pts"].is_null());
        } else {
            assert_eq!(line["pts"], 33_000_000 * i as u64);
        }
    }
}

#[test]
fn detections_from_metas_keep_exact_values_and_cli_field_order() {
    init();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("out.jsonl");
    let mut h = harness(&path);

    let ours = [
        effdet::Detection {
            x1: 1.25,
            y1: 2.5,
            x2: 40.75,
            y2: 30.0,
            score: 0.875,
            class_id: 1,
            label: "person".into(),
        },
        effdet::Detection {
            // Not exactly representable: must come back as the same f32.
            x1: 0.1,
            y1: 3.3,
            x2: 63.9,
            y2: 47.7,
            score: 0.3,
            class_id: 18,
            label: "dog \"quoted\"".into(),
        },
    ];
    let mut buffer = frame_buffer(Some(gst::ClockTime::ZERO));
    {
        let b = buffer.get_mut().expect("writable");
        for d in &ours {
            gsteffdet::meta::attach(b, d, 64, 48);
        }
    }
    h.push_and_pull(buffer).expect("buffer passes");
    assert!(h.push_event(gst::event::Eos::new()));

    let text = std::fs::read_to_string(&path).expect("output file");
    let line: Value = serde_json::from_str(text.trim_end()).expect("JSON line");
    check_schema(&line);
    let dets = line["detections"].as_array().expect("array");
    assert_eq!(dets.len(), 2);
    for (d, want) in dets.iter().zip(&ours) {
        let f = |k: &str| d[k].as_f64().expect("number") as f32;
        assert_eq!(f("x1"), want.x1);
        assert_eq!(f("y1"), want.y1);
        assert_eq!(f("x2"), want.x2);
        assert_eq!(f("y2"), want.y2);
        assert_eq!(f("score"), want.score);
        assert_eq!(d["class_id"], want.class_id);
        assert_eq!(d["label"], want.label.as_str());
    }
    // Same text as `effdet detect --json` prints for the same detections (f32 shortest form,
    // same field order).
    let cli = serde_json::to_string(&ours).expect("serialise");
    assert!(
        text.contains(&cli[1..cli.len() - 1]),
        "{text} does not contain {cli}"
    );
}

#[test]
fn foreign_roi_metas_have_null_score_and_class_zero() {
    init();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("out.jsonl");
    let mut h = harness(&path);

    let mut buffer = frame_buffer(Some(gst::ClockTime::from_seconds(1)));
    gst_video::VideoRegionOfInterestMeta::add(
        buffer.get_mut().expect("writable"),
        "face",
        (4, 5, 10, 20),
    );
    h.push_and_pull(buffer).expect("buffer passes");
    assert!(h.push_event(gst::event::Eos::new()));

    let lines = lines(&path);
    assert_eq!(lines.len(), 1);
    check_schema(&lines[0]);
    assert_eq!(lines[0]["pts"], 1_000_000_000u64);
    assert_eq!(
        lines[0]["detections"],
        serde_json::json!([
            {"x1": 4.0, "y1": 5.0, "x2": 14.0, "y2": 25.0, "score": null, "class_id": 0, "label": "face"}
        ])
    );
}

#[test]
fn eos_flushes_the_file_before_stop() {
    init();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("out.jsonl");
    let mut h = harness(&path);
    for i in 0..3 {
        h.push_and_pull(frame_buffer(Some(gst::ClockTime::from_mseconds(i))))
            .expect("buffer passes");
    }
    // Block-buffered: nothing needs to be on disk yet, but after EOS everything is, while the
    // element is still playing (the harness is alive).
    assert!(h.push_event(gst::event::Eos::new()));
    assert_eq!(lines(&path).len(), 3);
    let eos = std::iter::from_fn(|| h.try_pull_event()).find(|e| e.type_() == gst::EventType::Eos);
    assert!(eos.is_some(), "EOS is forwarded");
}

#[test]
fn stop_flushes_without_eos() {
    init();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("out.jsonl");
    {
        let mut h = harness(&path);
        h.push_and_pull(frame_buffer(None)).expect("buffer passes");
        h.element()
            .expect("element")
            .set_state(gst::State::Null)
            .expect("stops");
    }
    assert_eq!(lines(&path).len(), 1);
}

#[test]
fn unwritable_location_is_a_bus_error_naming_the_path() {
    init();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("no-such-dir").join("out.jsonl");
    let location = path.to_str().expect("utf-8 temp path");
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc num-buffers=1 ! effdetjson location=\"{location}\" ! fakesink"
    ))
    .expect("pipeline parses");
    let bus = pipeline.bus().expect("bus");
    assert!(pipeline.set_state(gst::State::Playing).is_err());
    let msg = bus
        .timed_pop_filtered(gst::ClockTime::from_seconds(5), &[gst::MessageType::Error])
        .expect("an error message");
    let gst::MessageView::Error(err) = msg.view() else {
        unreachable!("filtered for errors");
    };
    assert!(
        err.error().matches(gst::ResourceError::OpenWrite),
        "{:?}",
        err.error()
    );
    assert!(err.error().message().contains(location), "{}", err.error());
    pipeline.set_state(gst::State::Null).expect("to NULL");
}

#[test]
fn location_is_fixed_while_running() {
    init();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("out.jsonl");
    let h = harness(&path);
    let element = h.element().expect("element");
    element.set_property("location", "/elsewhere.jsonl");
    assert_eq!(
        element.property::<Option<String>>("location").as_deref(),
        path.to_str()
    );
}

#[test]
fn real_pipeline_writes_one_line_per_frame() {
    init();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("out.jsonl");
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc num-buffers=7 ! video/x-raw,width=320,height=240 \
         ! effdetjson location=\"{}\" ! fakesink",
        path.display()
    ))
    .expect("pipeline parses");
    let bus = pipeline.bus().expect("bus");
    pipeline.set_state(gst::State::Playing).expect("plays");
    let msg = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(10),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("EOS or error");
    assert_eq!(msg.type_(), gst::MessageType::Eos, "{msg:?}");
    pipeline.set_state(gst::State::Null).expect("to NULL");
    let lines = lines(&path);
    assert_eq!(lines.len(), 7);
    for (i, l) in lines.iter().enumerate() {
        check_schema(l);
        assert_eq!(l["frame"], i as u64);
        assert_eq!(l["width"], 320);
        assert_eq!(l["height"], 240);
    }
}

#[test]
fn write_errors_become_element_errors() {
    init();
    // /dev/full accepts the open and fails every write with ENOSPC.
    if !Path::new("/dev/full").exists() {
        eprintln!("skipped: no /dev/full");
        return;
    }
    // 3 frames: the lines fit the write buffer and fail at the EOS flush; 300 frames overflow
    // it and fail while streaming.
    for frames in [3, 300] {
        let pipeline = gst::parse::launch(&format!(
            "videotestsrc num-buffers={frames} ! effdetjson location=/dev/full ! fakesink"
        ))
        .expect("pipeline parses");
        let bus = pipeline.bus().expect("bus");
        pipeline.set_state(gst::State::Playing).expect("plays");
        let msg = bus
            .timed_pop_filtered(
                gst::ClockTime::from_seconds(10),
                &[gst::MessageType::Eos, gst::MessageType::Error],
            )
            .expect("EOS or error");
        let gst::MessageView::Error(err) = msg.view() else {
            panic!("{frames} frames: expected a write error, got {msg:?}");
        };
        assert!(
            err.error().matches(gst::ResourceError::Write),
            "{:?}",
            err.error()
        );
        assert!(
            err.error().message().contains("/dev/full"),
            "{}",
            err.error()
        );
        pipeline
            .set_state(gst::State::Null)
            .expect("stops after the error");
    }
}
