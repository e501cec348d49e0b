//! Embedding the effdet GStreamer plugin in a Rust application.
//!
//! Registers the plugin statically (no `GST_PLUGIN_PATH` needed), builds
//!
//! ```text
//! videotestsrc num-buffers=N ! videoconvert ! effdet model=MODEL ! appsink
//! filesrc location=INPUT ! decodebin ! videoconvert ! effdet model=MODEL ! appsink   (with INPUT)
//! ```
//!
//! pulls every frame from the appsink and prints its detections, read twice from the buffer's
//! metadata: with the plugin's helper `gsteffdet::meta::read`, and with the plain GstVideo API
//! (`VideoRegionOfInterestMeta` and its `detection` parameter structure), which is what a C or
//! Python application would do. Errors from the pipeline (bad model file, undecodable input)
//! arrive on the bus; they are printed and the program exits with status 1.
//!
//! ```sh
//! cargo run --release -p effdet-appsink-example -- tests/fixtures/golden/weights_f16.safetensors
//! cargo run --release -p effdet-appsink-example -- MODEL.safetensors video.mp4 --frames 100
//! ```
//!
//! The golden-test weights in `tests/fixtures/golden/` are seeded random weights: the boxes are
//! real network output but not real objects.

use std::io::Write;
use std::process::ExitCode;

use gst::glib;
use gst::prelude::*;
use gst_video::VideoRegionOfInterestMeta;

const USAGE: &str = "usage: effdet-appsink-example MODEL.safetensors [INPUT_FILE] [--frames N]
  MODEL       effdet-named safetensors weights
  INPUT_FILE  a video file to decode (default: videotestsrc)
  --frames N  stop after N frames (default: 30 for videotestsrc, the whole file otherwise)";

struct Args {
    model: String,
    input: Option<String>,
    frames: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut positional = Vec::new();
    let mut frames = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--frames" => {
                let n = args.next().ok_or("--frames needs a value")?;
                frames = Some(
                    n.parse::<u64>()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or(format!("--frames: '{n}' is not a positive integer"))?,
                );
            }
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            _ => positional.push(arg),
        }
    }
    let mut positional = positional.into_iter();
    let model = positional.next().ok_or("missing MODEL")?;
    let input = positional.next();
    if let Some(extra) = positional.next() {
        return Err(format!("unexpected argument {extra}"));
    }
    Ok(Args {
        model,
        input,
        frames,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) if msg.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("error: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn make(factory: &str) -> Result<gst::Element, String> {
    gst::ElementFactory::make(factory)
        .build()
        .map_err(|e| format!("cannot create element {factory}: {e}"))
}

/// Sets a string property, failing (instead of panicking) when the element lacks it.
fn set_str(element: &gst::Element, name: &str, value: &str) -> Result<(), String> {
    if element.find_property(name).is_none() {
        return Err(format!("element {} has no property {name}", element.name()));
    }
    element.set_property_from_str(name, value);
    Ok(())
}

/// Builds the pipeline; returns it with its appsink.
fn build(args: &Args) -> Result<(gst::Pipeline, gst_app::AppSink), String> {
    let pipeline = gst::Pipeline::new();
    let convert = make("videoconvert")?;
    let effdet = make("effdet")?;
    set_str(&effdet, "model", &args.model)?;
    let appsink = gst_app::AppSink::builder()
        // Pull as fast as detection runs, not at the stream's frame rate.
        .sync(false)
        .max_buffers(4)
        .build();

    pipeline
        .add_many([&convert, &effdet, appsink.upcast_ref()])
        .map_err(|e| e.to_string())?;
    gst::Element::link_many([&convert, &effdet, appsink.upcast_ref()])
        .map_err(|e| format!("cannot link videoconvert ! effdet ! appsink: {e}"))?;

    match &args.input {
        None => {
            let src = make("videotestsrc")?;
            set_str(&src, "num-buffers", &args.frames.unwrap_or(30).to_string())?;
            pipeline.add(&src).map_err(|e| e.to_string())?;
            src.link(&convert)
                .map_err(|e| format!("cannot link videotestsrc ! videoconvert: {e}"))?;
        }
        Some(path) => {
            let src = make("filesrc")?;
            set_str(&src, "location", path)?;
            let decode = make("decodebin")?;
            pipeline
                .add_many([&src, &decode])
                .map_err(|e| e.to_string())?;
            src.link(&decode)
                .map_err(|e| format!("cannot link filesrc ! decodebin: {e}"))?;
            // decodebin creates its pads once it knows the streams: link the first video one.
            let convert_weak = convert.downgrade();
            decode.connect_pad_added(move |decode, pad| {
                let Some(convert) = convert_weak.upgrade() else {
                    return;
                };
                let is_video = pad
                    .current_caps()
                    .and_then(|c| c.structure(0).map(|s| s.name().starts_with("video/")))
                    .unwrap_or(false);
                let Some(sink) = convert.static_pad("sink") else {
                    return;
                };
                if !is_video || sink.is_linked() {
                    return;
                }
                if let Err(e) = pad.link(&sink) {
                    gst::element_error!(
                        decode,
                        gst::CoreError::Negotiation,
                        ("Cannot link the decoded video to videoconvert: {e:?}")
                    );
                }
            });
        }
    }
    Ok((pipeline, appsink))
}

/// Detections printed per frame and per view (the rest are counted).
const PRINT_MAX: usize = 5;

/// Prints the detections of one frame, read both ways; returns how many there are.
fn print_frame(
    out: &mut impl Write,
    index: u64,
    buffer: &gst::BufferRef,
    size: Option<(i32, i32)>,
) -> std::io::Result<usize> {
    let pts = buffer
        .pts()
        .map_or_else(|| "none".to_string(), |t| t.to_string());
    let (w, h) = size.unwrap_or((0, 0));

    // 1. The plugin's helper: one MetaDetection per ROI meta, exact boxes in frame pixels.
    let detections = gsteffdet::meta::read(buffer);
    writeln!(
        out,
        "frame {index} pts {pts} ({w}x{h}): {} detection(s)",
        detections.len()
    )?;
    for d in detections.iter().take(PRINT_MAX) {
        // The metadata carries what the library's own Detection type does.
        let lib = effdet::Detection {
            x1: d.x1 as f32,
            y1: d.y1 as f32,
            x2: d.x2 as f32,
            y2: d.y2 as f32,
            score: d.score.unwrap_or(0.0) as f32,
            class_id: d.class_id,
            label: d.label.clone(),
        };
        // Another element's ROI meta has no score.
        let score = d
            .score
            .map_or_else(|| "  -  ".to_string(), |s| format!("{s:.3}"));
        writeln!(
            out,
            "  {:<14} {score}  [{:.1}, {:.1}, {:.1}, {:.1}]  {:.0}x{:.0} px",
            lib.label,
            lib.x1,
            lib.y1,
            lib.x2,
            lib.y2,
            lib.width(),
            lib.height()
        )?;
    }

    // 2. The raw GstVideo API, as C or Python would read it: the ROI's rounded rectangle and
    //    type, and the `detection` parameter structure with the exact values.
    for roi in buffer
        .iter_meta::<VideoRegionOfInterestMeta>()
        .take(PRINT_MAX)
    {
        let (x, y, rw, rh) = roi.rect();
        let mut line = format!("    raw: {} rect=({x}, {y}, {rw}, {rh})", roi.roi_type());
        match roi.param(gsteffdet::meta::DETECTION_PARAM) {
            Some(p) => {
                let label = p.get::<String>("label").unwrap_or_default();
                let class_id = p.get::<u32>("class-id").unwrap_or(0);
                let confidence = p.get::<f64>("confidence").unwrap_or(f64::NAN);
                let coords: Vec<String> = ["x1", "y1", "x2", "y2"]
                    .iter()
                    .map(|k| format!("{k}={:.2}", p.get::<f64>(*k).unwrap_or(f64::NAN)))
                    .collect();
                line += &format!(
                    " detection: label={label} class-id={class_id} confidence={confidence:.4} {}",
                    coords.join(" ")
                );
            }
            None => line += " (no detection parameters: another element's ROI)",
        }
        writeln!(out, "{line}")?;
    }
    if detections.len() > PRINT_MAX {
        writeln!(out, "  ... and {} more", detections.len() - PRINT_MAX)?;
    }
    Ok(detections.len())
}

/// Turns an error or warning message into text naming its source element.
fn describe(msg: &gst::MessageRef, error: &glib::Error, debug: Option<glib::GString>) -> String {
    let src = msg
        .src()
        .map_or_else(|| "pipeline".to_string(), |s| s.path_string().to_string());
    match debug {
        Some(d) => format!("{src}: {error} ({d})"),
        None => format!("{src}: {error}"),
    }
}

/// Returns the first error waiting on the bus (warnings are printed and skipped).
fn bus_error(bus: &gst::Bus) -> Option<String> {
    while let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error, gst::MessageType::Warning]) {
        match msg.view() {
            gst::MessageView::Error(e) => return Some(describe(&msg, &e.error(), e.debug())),
            gst::MessageView::Warning(w) => {
                eprintln!("warning: {}", describe(&msg, &w.error(), w.debug()));
            }
            _ => {}
        }
    }
    None
}

fn run(args: &Args) -> Result<(), String> {
    gst::init().map_err(|e| format!("cannot initialise GStreamer: {e}"))?;
    gsteffdet::plugin_register_static()
        .map_err(|e| format!("cannot register the effdet plugin: {e}"))?;

    let (pipeline, appsink) = build(args)?;
    let bus = pipeline.bus().ok_or("pipeline has no bus")?;
    let result = pull_all(&pipeline, &appsink, &bus, args.frames);
    // Always shut down, also after an error.
    let _ = pipeline.set_state(gst::State::Null);
    result
}

fn pull_all(
    pipeline: &gst::Pipeline,
    appsink: &gst_app::AppSink,
    bus: &gst::Bus,
    max_frames: Option<u64>,
) -> Result<(), String> {
    if pipeline.set_state(gst::State::Playing).is_err() {
        // The element that failed (e.g. effdet with a missing model) said why on the bus.
        return Err(bus_error(bus)
            .unwrap_or_else(|| "the pipeline failed to start (no error message)".into()));
    }

    let mut out = std::io::stdout().lock();
    let mut frames = 0u64;
    let mut total = 0usize;
    loop {
        if let Some(err) = bus_error(bus) {
            return Err(err);
        }
        if max_frames.is_some_and(|n| frames >= n) {
            break;
        }
        match appsink.try_pull_sample(gst::ClockTime::from_mseconds(100)) {
            Some(sample) => {
                let size = sample.caps().and_then(|c| {
                    let s = c.structure(0)?;
                    Some((s.get::<i32>("width").ok()?, s.get::<i32>("height").ok()?))
                });
                let Some(buffer) = sample.buffer() else {
                    continue;
                };
                match print_frame(&mut out, frames, buffer, size) {
                    Ok(n) => total += n,
                    // The reader went away (e.g. `| head`): stop quietly.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                    Err(e) => return Err(format!("cannot write to stdout: {e}")),
                }
                frames += 1;
            }
            None if appsink.is_eos() => break,
            None => {}
        }
    }
    // A last look: an error may have been posted together with the end of the stream.
    if let Some(err) = bus_error(bus) {
        return Err(err);
    }
    match writeln!(out, "{frames} frame(s), {total} detection(s)") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(format!("cannot write to stdout: {e}"))
        }
        _ => Ok(()),
    }
}
