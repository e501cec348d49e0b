//! The `effdet` element: metas equal the library's `Detector` output for every format, size and
//! stride layout; properties; bad input reaching the bus as errors; state changes, flushing
//! seeks, renegotiation, QoS and a soak test.

use std::path::{Path, PathBuf};
use std::sync::{Once, OnceLock};
use std::time::Duration;

use effdet::image_io::load_image;
use effdet::postprocess::PostprocessConfig;
use effdet::{Detection, Detector, DetectorOptions, Frame, PixelFormat, YuvMatrix, YuvRange};
use gst::prelude::*;
use gst_check::Harness;
use gsteffdet::meta::{self, MetaDetection};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn weights() -> String {
    repo()
        .join("tests/fixtures/golden/weights_f16.safetensors")
        .display()
        .to_string()
}

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().expect("GStreamer initialises");
        gsteffdet::plugin_register_static().expect("plugin registers");
    });
}

/// The library detector with the element's default thresholds, for reference results.
fn detector() -> &'static Detector {
    static D: OnceLock<Detector> = OnceLock::new();
    D.get_or_init(|| {
        let opts = DetectorOptions {
            postprocess: PostprocessConfig {
                score_threshold: 0.3,
                ..PostprocessConfig::default()
            },
            ..DetectorOptions::default()
        };
        Detector::new(weights(), opts).expect("fixture weights load")
    })
}

/// A test picture (the golden image, cropped or tiled to w x h) as RGB bytes.
fn picture(w: usize, h: usize) -> Vec<u8> {
    let img = load_image(repo().join("tests/fixtures/golden/img0.png")).expect("fixture image");
    let mut rgb = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let s = ((y % img.height) * img.width + (x % img.width)) * 3;
            rgb[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&img.rgb[s..s + 3]);
        }
    }
    rgb
}

/// A frame in `format` with the given per-plane strides, plus the offsets of its planes in the
/// buffer (planes packed one after another with 32 spare bytes between them).
struct Layout {
    data: Vec<u8>,
    strides: Vec<usize>,
    offsets: Vec<usize>,
}

fn layout(format: PixelFormat, w: usize, h: usize, pad: usize) -> Layout {
    let rgb = picture(w, h);
    let strides: Vec<usize> = format.packed_strides(w).iter().map(|s| s + pad).collect();
    let mut offsets = Vec::new();
    let mut at = 0;
    for (p, s) in strides.iter().enumerate() {
        offsets.push(at);
        at += s * format.plane_extent(p, w, h).1 + 32;
    }
    let mut data = vec![0x5Au8; at];
    let rgb_at = |x: usize, y: usize| {
        let i = (y.min(h - 1) * w + x.min(w - 1)) * 3;
        [rgb[i] as f32, rgb[i + 1] as f32, rgb[i + 2] as f32]
    };
    match format.bytes_per_pixel() {
        Some(bpp) => {
            let order: [usize; 3] = match format {
                PixelFormat::Bgrx | PixelFormat::Bgra => [2, 1, 0],
                _ => [0, 1, 2],
            };
            for y in 0..h {
                for x in 0..w {
                    let px = rgb_at(x, y);
                    for c in 0..3 {
                        data[offsets[0] + y * strides[0] + x * bpp + order[c]] = px[c] as u8;
                    }
                    if bpp == 4 {
                        data[offsets[0] + y * strides[0] + x * bpp + 3] = 255;
                    }
                }
            }
        }
        None => {
            for y in 0..h {
                for x in 0..w {
                    let [r, g, b] = rgb_at(x, y);
                    data[offsets[0] + y * strides[0] + x] =
                        (16.0 + 0.257 * r + 0.504 * g + 0.098 * b) as u8;
                }
            }
            for y in 0..h.div_ceil(2) {
                for x in 0..w.div_ceil(2) {
                    let [r, g, b] = rgb_at(2 * x, 2 * y);
                    let u = (128.0 - 0.148 * r - 0.291 * g + 0.439 * b) as u8;
                    let v = (128.0 + 0.439 * r - 0.368 * g - 0.071 * b) as u8;
                    if format == PixelFormat::Nv12 {
                        data[offsets[1] + y * strides[1] + 2 * x] = u;
                        data[offsets[1] + y * strides[1] + 2 * x + 1] = v;
                    } else {
                        data[offsets[1] + y * strides[1] + x] = u;
                        data[offsets[2] + y * strides[2] + x] = v;
                    }
                }
            }
        }
    }
    Layout {
        data,
        strides,
        offsets,
    }
}

fn video_format(f: PixelFormat) -> gst_video::VideoFormat {
    gst_video::VideoFormat::from_string(f.name())
}

/// A buffer holding the layout, with a VideoMeta describing its strides and offsets.
fn buffer(l: &Layout, format: PixelFormat, w: usize, h: usize, pts_ms: u64) -> gst::Buffer {
    let mut buf = gst::Buffer::from_slice(l.data.clone());
    {
        let b = buf.get_mut().expect("new buffer is writable");
        b.set_pts(gst::ClockTime::from_mseconds(pts_ms));
        let strides: Vec<i32> = l.strides.iter().map(|&s| s as i32).collect();
        gst_video::VideoMeta::add_full(
            b,
            gst_video::VideoFrameFlags::empty(),
            video_format(format),
            w as u32,
            h as u32,
            &l.offsets,
            &strides,
        )
        .expect("video meta");
    }
    buf
}

/// A harness around an `effdet` element with the fixture weights and `props` ("k=v k=v").
/// YUV caps state BT.601 explicitly (GStreamer defaults HD sizes to BT.709).
fn harness(props: &str, format: PixelFormat, w: usize, h: usize) -> Harness {
    init();
    let el = gst::ElementFactory::make("effdet")
        .property("model", weights())
        .build()
        .expect("effdet element");
    for kv in props.split_whitespace() {
        let (k, v) = kv.split_once('=').expect("k=v");
        el.set_property_from_str(k, v);
    }
    let mut hs = Harness::with_element(&el, Some("sink"), Some("src"));
    let colorimetry = if format.is_yuv() {
        ",colorimetry=bt601"
    } else {
        ""
    };
    hs.set_src_caps_str(&format!(
        "video/x-raw,format={},width={w},height={h},framerate=30/1{colorimetry}",
        format.name()
    ));
    hs
}

fn as_meta(d: &Detection) -> MetaDetection {
    MetaDetection {
        x1: d.x1 as f64,
        y1: d.y1 as f64,
        x2: d.x2 as f64,
        y2: d.y2 as f64,
        score: Some(d.score as f64),
        class_id: d.class_id,
        label: d.label.clone(),
    }
}

fn reference(l: &Layout, format: PixelFormat, w: usize, h: usize) -> Vec<MetaDetection> {
    let f = Frame::new(format, w, h, &l.data, &l.strides, &l.offsets).expect("valid frame");
    detector()
        .detect(&f)
        .expect("detect")
        .iter()
        .map(as_meta)
        .collect()
}

#[test]
fn metas_equal_detector_output_for_every_format_and_stride() {
    for format in PixelFormat::ALL {
        for &(w, h, pad) in &[(320usize, 240usize, 0usize), (333, 181, 24)] {
            let l = layout(format, w, h, pad);
            let mut hs = harness("", format, w, h);
            hs.push(buffer(&l, format, w, h, 0)).expect("push");
            let out = hs.pull().expect("pull");
            let got = meta::read(&out);
            let want = reference(&l, format, w, h);
            assert!(
                !want.is_empty(),
                "{format} {w}x{h}: reference found nothing"
            );
            assert_eq!(got, want, "{format} {w}x{h} pad {pad}");
            // The frame itself passes through unchanged.
            let map = out.map_readable().expect("map");
            assert_eq!(map.as_slice(), &l.data[..], "{format}: pixels changed");
        }
    }
}

#[test]
fn full_hd_odd_size_nv12_follows_the_caps_colorimetry() {
    let (w, h) = (1919, 1079);
    let l = layout(PixelFormat::Nv12, w, h, 0);
    let mut hs = harness("", PixelFormat::Nv12, w, h);
    // Caps without colorimetry: GStreamer assumes BT.709 for HD, and so must the element.
    hs.set_src_caps_str(&format!(
        "video/x-raw,format=NV12,width={w},height={h},framerate=30/1"
    ));
    hs.push(buffer(&l, PixelFormat::Nv12, w, h, 0))
        .expect("push");
    let got = meta::read(&hs.pull().expect("pull"));
    let f = Frame::new(PixelFormat::Nv12, w, h, &l.data, &l.strides, &l.offsets)
        .unwrap()
        .with_colorimetry(YuvMatrix::Bt709, YuvRange::Limited);
    let want: Vec<_> = detector().detect(&f).unwrap().iter().map(as_meta).collect();
    assert_eq!(got, want);
    assert_ne!(
        got,
        reference(&l, PixelFormat::Nv12, w, h),
        "BT.601 would give other detections"
    );
    for d in got {
        assert!(d.x2 <= w as f64 && d.y2 <= h as f64);
    }
}

#[test]
fn interval_reattaches_the_last_detections() {
    let (w, h) = (320, 240);
    let a = layout(PixelFormat::Rgb, w, h, 0);
    let mut hs = harness("interval=3", PixelFormat::Rgb, w, h);
    // Frame 0 is inferred; frames 1 and 2 (black) carry frame 0's detections; frame 3 is inferred.
    let black = Layout {
        data: vec![0; w * h * 3],
        strides: vec![w * 3],
        offsets: vec![0],
    };
    hs.push(buffer(&a, PixelFormat::Rgb, w, h, 0)).unwrap();
    let first = meta::read(&hs.pull().unwrap());
    for i in 1..=2 {
        hs.push(buffer(&black, PixelFormat::Rgb, w, h, i * 33))
            .unwrap();
        assert_eq!(meta::read(&hs.pull().unwrap()), first, "frame {i}");
    }
    hs.push(buffer(&black, PixelFormat::Rgb, w, h, 99)).unwrap();
    assert_eq!(
        meta::read(&hs.pull().unwrap()),
        reference(&black, PixelFormat::Rgb, w, h)
    );
}

#[test]
fn thresholds_and_classes_change_while_playing() {
    let (w, h) = (320, 240);
    let l = layout(PixelFormat::Rgb, w, h, 0);
    let mut hs = harness("score-threshold=0", PixelFormat::Rgb, w, h);
    hs.push(buffer(&l, PixelFormat::Rgb, w, h, 0)).unwrap();
    let all = meta::read(&hs.pull().unwrap());
    assert_eq!(all.len(), 100);
    let el = hs.element().expect("element");
    assert_eq!(el.factory().map(|f| f.name()), Some("effdet".into()));
    let cut = all[40].score.unwrap();
    el.set_property("score-threshold", cut);
    hs.push(buffer(&l, PixelFormat::Rgb, w, h, 33)).unwrap();
    let some = meta::read(&hs.pull().unwrap());
    assert!(some.len() < 100 && some.iter().all(|d| d.score.unwrap() >= cut));
    el.set_property("max-detections", 5u32);
    hs.push(buffer(&l, PixelFormat::Rgb, w, h, 66)).unwrap();
    assert_eq!(meta::read(&hs.pull().unwrap()).len(), 5);
    let keep = all[0].class_id;
    el.set_property("max-detections", 100u32);
    el.set_property("score-threshold", 0.0f64);
    el.set_property("classes", format!("{keep}"));
    assert_eq!(el.property::<String>("classes"), format!("{keep}"));
    hs.push(buffer(&l, PixelFormat::Rgb, w, h, 99)).unwrap();
    let only = meta::read(&hs.pull().unwrap());
    assert!(!only.is_empty() && only.iter().all(|d| d.class_id == keep));
    // Garbage is ignored (the previous value stays), never a crash.
    el.set_property("classes", "1,person");
    assert_eq!(el.property::<String>("classes"), format!("{keep}"));
}

#[test]
fn renegotiation_to_a_new_size() {
    let mut hs = harness("", PixelFormat::Rgb, 320, 240);
    let a = layout(PixelFormat::Rgb, 320, 240, 0);
    hs.push(buffer(&a, PixelFormat::Rgb, 320, 240, 0)).unwrap();
    assert_eq!(
        meta::read(&hs.pull().unwrap()),
        reference(&a, PixelFormat::Rgb, 320, 240)
    );
    hs.set_src_caps_str("video/x-raw,format=I420,width=500,height=301,framerate=30/1");
    let b = layout(PixelFormat::I420, 500, 301, 0);
    hs.push(buffer(&b, PixelFormat::I420, 500, 301, 33))
        .unwrap();
    assert_eq!(
        meta::read(&hs.pull().unwrap()),
        reference(&b, PixelFormat::I420, 500, 301)
    );
}

#[test]
fn malformed_buffer_is_a_flow_error_not_a_panic() {
    let mut hs = harness("", PixelFormat::Rgb, 320, 240);
    let r = hs.push(gst::Buffer::from_slice(vec![0u8; 1000]));
    assert_eq!(r, Err(gst::FlowError::Error));
    let r = hs.push(gst::Buffer::new());
    assert_eq!(r, Err(gst::FlowError::Error));
}

/// Runs a launch line to EOS or error; returns the error text (if any) and element messages.
fn run(launch: &str, timeout: Duration) -> (Option<String>, Vec<gst::Structure>) {
    init();
    let pipeline = gst::parse::launch(launch).expect("pipeline parses");
    let bus = pipeline.bus().expect("bus");
    let _ = pipeline.set_state(gst::State::Playing);
    let mut error = None;
    let mut messages = Vec::new();
    for msg in bus.iter_timed(gst::ClockTime::from_mseconds(timeout.as_millis() as u64)) {
        match msg.view() {
            gst::MessageView::Eos(_) => break,
            gst::MessageView::Error(e) => {
                error = Some(format!("{} ({:?})", e.error(), e.debug()));
                break;
            }
            gst::MessageView::Element(e) => {
                if let Some(s) = e.structure() {
                    messages.push(s.to_owned());
                }
            }
            _ => {}
        }
    }
    pipeline.set_state(gst::State::Null).expect("to NULL");
    (error, messages)
}

fn assert_bus_error(launch: &str, needle: &str) {
    let (err, _) = run(launch, Duration::from_secs(30));
    let err = err.unwrap_or_else(|| panic!("expected an error for: {launch}"));
    assert!(err.contains(needle), "{needle:?} not in {err}");
    assert!(
        !err.contains("Panicked") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn bad_input_is_an_error_on_the_bus() {
    let src = "videotestsrc num-buffers=2 ! video/x-raw,format=RGB,width=64,height=48";
    assert_bus_error(
        &format!("{src} ! effdet model=/no/such/model.safetensors ! fakesink"),
        "not found",
    );
    assert_bus_error(
        &format!("{src} ! effdet model=\"\" ! fakesink"),
        "No model set",
    );
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, b"definitely not safetensors").unwrap();
    assert_bus_error(
        &format!("{src} ! effdet model={} ! fakesink", corrupt.display()),
        "not a valid safetensors",
    );
    assert_bus_error(
        &format!(
            "{src} ! effdet model={} labels=/no/labels.txt ! fakesink",
            weights()
        ),
        "/no/labels.txt",
    );
    assert_bus_error(
        &format!("{src} ! effdet model={} backend=cuda ! fakesink", weights()),
        "cuda",
    );
    assert_bus_error(
        &format!(
            "{src} ! effdet model={} input-size=100 ! fakesink",
            weights()
        ),
        "input size 100 is not a positive multiple of 128",
    );
}

#[test]
fn unsupported_caps_are_refused_clearly() {
    init();
    // At link time, gst-launch reports which caps effdet cannot handle.
    let err = gst::parse::launch(&format!(
        "videotestsrc num-buffers=2 ! video/x-raw,format=GRAY8 ! effdet model={} ! fakesink",
        weights()
    ))
    .expect_err("GRAY8 cannot link");
    let text = err.to_string();
    assert!(text.contains("effdet") && text.contains("GRAY8"), "{text}");
    // Renegotiating to an unsupported format mid-stream is a not-negotiated flow error.
    let mut hs = harness("", PixelFormat::Rgb, 64, 48);
    hs.push(gst::Buffer::from_slice(vec![0u8; 64 * 48 * 3]))
        .expect("RGB frame");
    hs.set_src_caps_str("video/x-raw,format=GRAY8,width=64,height=48,framerate=30/1");
    assert_eq!(
        hs.push(gst::Buffer::from_slice(vec![0u8; 64 * 48])),
        Err(gst::FlowError::NotNegotiated)
    );
}

#[test]
fn post_messages_carry_the_detections() {
    let launch = format!(
        "videotestsrc num-buffers=3 pattern=ball ! video/x-raw,format=NV12,width=160,height=120 ! \
         effdet model={} post-messages=true score-threshold=0 max-detections=7 ! fakesink",
        weights()
    );
    let (err, msgs) = run(&launch, Duration::from_secs(60));
    assert!(err.is_none(), "{err:?}");
    let ours: Vec<_> = msgs.iter().filter(|s| s.name() == "effdet").collect();
    assert_eq!(ours.len(), 3);
    for (i, s) in ours.iter().enumerate() {
        assert_eq!(s.get::<u64>("frame").unwrap(), i as u64);
        let list = s.get::<gst::List>("detections").unwrap();
        assert_eq!(list.len(), 7);
        let d = list.first().unwrap().get::<gst::Structure>().unwrap();
        assert!(d.get::<f64>("confidence").unwrap() > 0.0);
        assert!(!d.get::<String>("label").unwrap().is_empty());
    }
}

#[test]
fn repeated_state_changes_and_flushing_seeks() {
    init();
    let launch = format!(
        "videotestsrc pattern=ball ! video/x-raw,format=BGRx,width=128,height=96,framerate=30/1 ! \
         effdet model={} interval=5 ! fakesink sync=false",
        weights()
    );
    let pipeline = gst::parse::launch(&launch).unwrap();
    let bus = pipeline.bus().unwrap();
    for cycle in 0..3 {
        pipeline.set_state(gst::State::Playing).unwrap();
        let (res, state, _) = pipeline.state(gst::ClockTime::from_seconds(30));
        assert!(res.is_ok() && state == gst::State::Playing, "cycle {cycle}");
        std::thread::sleep(Duration::from_millis(300));
        pipeline
            .seek_simple(
                gst::SeekFlags::FLUSH | gst::SeekFlags::ACCURATE,
                gst::ClockTime::from_seconds(2),
            )
            .expect("flushing seek");
        std::thread::sleep(Duration::from_millis(300));
        if let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error]) {
            panic!("cycle {cycle}: {msg:?}");
        }
        pipeline.set_state(gst::State::Null).unwrap();
    }
}

#[test]
fn live_source_is_not_delayed_without_bound() {
    // 60 fps live source, inference far slower than 16 ms on this machine: QoS must drop late
    // frames so the sink keeps up with the clock instead of falling further and further behind.
    let launch = format!(
        "videotestsrc is-live=true num-buffers=90 ! video/x-raw,format=RGB,width=160,height=120,framerate=60/1 ! \
         effdet model={} name=det ! fakesink sync=true qos=true",
        weights()
    );
    init();
    let pipeline = gst::parse::launch(&launch).unwrap();
    let bus = pipeline.bus().unwrap();
    let start = std::time::Instant::now();
    pipeline.set_state(gst::State::Playing).unwrap();
    let mut dropped_by_effdet = 0u64;
    for msg in bus.iter_timed(gst::ClockTime::from_seconds(60)) {
        match msg.view() {
            gst::MessageView::Eos(_) => break,
            gst::MessageView::Error(e) => panic!("{}", e.error()),
            gst::MessageView::Qos(q) if q.src().is_some_and(|s| s.name() == "det") => {
                dropped_by_effdet = dropped_by_effdet.max(q.stats().1.value().max(0) as u64);
            }
            _ => {}
        }
    }
    let elapsed = start.elapsed();
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(dropped_by_effdet > 0, "effdet never dropped a late frame");
    // 90 frames at 60 fps = 1.5 s of stream; without QoS it would take 90 inferences.
    assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

/// RSS is per process and the other tests of this binary run in parallel threads, so the soak
/// runs alone in a child process: this test re-executes the test binary for the ignored
/// `soak_memory_child` and checks that it passed.
#[test]
fn soak_memory_does_not_grow() {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "soak_memory_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "soak child failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "the soak child did not run: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
#[ignore = "run by soak_memory_does_not_grow in its own process"]
fn soak_memory_child() {
    // 3500 frames; inference every 100th keeps the run short while the per-frame path (mapping,
    // meta attachment, messages) runs every time.
    let (w, h) = (64, 48);
    let l = layout(PixelFormat::Rgb, w, h, 0);
    let mut hs = harness(
        "interval=100 post-messages=true score-threshold=0",
        PixelFormat::Rgb,
        w,
        h,
    );
    let mut run_frames = |n: u64, from: u64| {
        for i in from..from + n {
            hs.push(buffer(&l, PixelFormat::Rgb, w, h, i)).unwrap();
            let out = hs.pull().unwrap();
            assert_eq!(meta::read(&out).len(), 100);
        }
    };
    // A leak grows RSS in every window; the allocator can also take a one-off step (a rayon
    // thread's first large inference buffers opening a new glibc arena, seen once as +42 MiB),
    // which shows in one window only. So the smallest growth of three windows must be ~0.
    run_frames(500, 0);
    let mut rss = vec![rss_kib()];
    for k in 0..3 {
        run_frames(1000, 500 + k * 1000);
        rss.push(rss_kib());
    }
    let growth: Vec<u64> = rss.windows(2).map(|w| w[1].saturating_sub(w[0])).collect();
    assert!(
        growth.iter().min().is_some_and(|&g| g < 2 * 1024),
        "RSS grew in every 1000-frame window: {rss:?} KiB"
    );
}

/// Without a `model` property the element loads the model bundled in `models/` (trained here on
/// the synthetic shapes; 6 classes, 384x384 input, both from the file's metadata) and finds the
/// shapes of four held-out synthetic frames, named by the model's own labels: a ground-truth
/// object counts as found when a detection of its class (score 0.1 and up) overlaps it with IoU
/// of at least 0.5. Every frame must have at least two thirds of its objects found and the four
/// together at least five sixths (the bundled model finds 8/8, 10/12, 9/10 and 10/12 of them,
/// 37 of 42; its held-out AP is 0.71, see models/README.md; the stage 4 model, AP 0.56 at 256,
/// found 32). Frame 0 is one on which the stage 2 model fired everywhere (a batch-norm defect,
/// fixed by training with frozen BN); a 90-class post-processing config, as before an earlier
/// fix, failed every frame.
#[test]
fn default_model_is_the_bundled_shapes_detector() {
    init();
    let el = gst::ElementFactory::make("effdet")
        .property("score-threshold", 0.1f64)
        .build()
        .expect("effdet element");
    let model: Option<String> = el.property("model");
    let model = model.expect("a default model");
    assert!(
        model.ends_with("models/effdet-d0-shapes256.safetensors"),
        "{model}"
    );
    let mut hs = Harness::with_element(&el, Some("sink"), Some("src"));
    hs.set_src_caps_str("video/x-raw,format=RGB,width=320,height=320,framerate=30/1");
    let names = ["circle", "square", "triangle", "star", "hexagon", "cross"];
    let iou = |d: &MetaDetection, b: [u32; 4]| {
        let (bx1, by1) = (f64::from(b[0]), f64::from(b[1]));
        let (bx2, by2) = (bx1 + f64::from(b[2]), by1 + f64::from(b[3]));
        let iw = (d.x2.min(bx2) - d.x1.max(bx1)).max(0.0);
        let ih = (d.y2.min(by2) - d.y1.max(by1)).max(0.0);
        let inter = iw * ih;
        inter / ((d.x2 - d.x1) * (d.y2 - d.y1) + (bx2 - bx1) * (by2 - by1) - inter)
    };
    let (mut matched, mut total) = (0, 0);
    for i in 0..4 {
        let img = effdet::synth::render_dataset_image(12345, effdet::synth::Split::Val, i, 320);
        let l = Layout {
            data: img.rgb.clone(),
            strides: vec![320 * 3],
            offsets: vec![0],
        };
        hs.push(buffer(&l, PixelFormat::Rgb, 320, 320, i * 33))
            .expect("push");
        let dets = meta::read(&hs.pull().expect("pull"));
        assert!(
            dets.iter().all(|d| names.contains(&d.label.as_str())),
            "{dets:?}"
        );
        let found = img
            .objects
            .iter()
            .filter(|o| {
                dets.iter()
                    .any(|d| d.class_id == o.class_id() && iou(d, o.bbox) >= 0.5)
            })
            .count();
        eprintln!("frame {i}: {found} of {} objects found", img.objects.len());
        assert!(
            3 * found >= 2 * img.objects.len(),
            "frame {i}: only {found} of {} objects found",
            img.objects.len()
        );
        matched += found;
        total += img.objects.len();
    }
    assert!(
        6 * matched >= 5 * total,
        "only {matched} of {total} objects found in 4 frames"
    );
}

/// `input-size` runs the model at another network size (0, the default, is the size in its
/// metadata): the bundled model's detections on a frame differ at 256 and 384, and the default
/// gives those of the size in the file.
#[test]
fn input_size_property_changes_the_network_size() {
    init();
    let mut model = None;
    let mut detect = |size: u32| {
        let el = gst::ElementFactory::make("effdet")
            .property("score-threshold", 0.1f64)
            .property("input-size", size)
            .build()
            .expect("effdet element");
        assert_eq!(el.property::<u32>("input-size"), size);
        model = el.property::<Option<String>>("model");
        let mut hs = Harness::with_element(&el, Some("sink"), Some("src"));
        hs.set_src_caps_str("video/x-raw,format=RGB,width=320,height=320,framerate=30/1");
        let img = effdet::synth::render_dataset_image(12345, effdet::synth::Split::Val, 1, 320);
        let l = Layout {
            data: img.rgb,
            strides: vec![320 * 3],
            offsets: vec![0],
        };
        hs.push(buffer(&l, PixelFormat::Rgb, 320, 320, 0))
            .expect("push");
        format!("{:?}", meta::read(&hs.pull().expect("pull")))
    };
    let (at_256, at_384, native) = (detect(256), detect(384), detect(0));
    assert_ne!(at_256, at_384);
    let store = effdet::model::WeightStore::open(model.expect("a default model")).unwrap();
    let trained = &store.metadata()["effdet.image_size"];
    let expected = match trained.as_str() {
        "256" => at_256,
        "384" => at_384,
        other => panic!("this test knows models trained at 256 or 384, not {other}"),
    };
    assert_eq!(native, expected, "the default must be the trained size");
}
