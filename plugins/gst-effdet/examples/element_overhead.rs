//! Benchmark: the `effdet` element's overhead over the bare library `Detector` on the same frames.
//!
//! Decodes FRAMES frames of VIDEO to NV12 in memory once, then times
//! (a) `Detector::detect` on each frame, and
//! (b) the same buffers pushed through `appsrc ! effdet ! fakesink`,
//! and prints one JSON object. Used by `bench/pipeline_cpu.sh`.
//!
//! ```sh
//! cargo run --release -p gst-effdet --example element_overhead -- VIDEO WEIGHTS [FRAMES] [THREADS]
//! ```

use std::time::Instant;

use effdet::{Detector, DetectorOptions, Frame, PixelFormat, YuvMatrix, YuvRange};
use gst::prelude::*;
use gst_app::{AppSink, AppSrc};
use gst_video::prelude::*;

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn decode(video: &str, frames: usize) -> AnyResult<(gst::Caps, Vec<gst::Buffer>)> {
    let pipeline = gst::parse::launch(&format!(
        "filesrc location=\"{video}\" ! decodebin ! videoconvert ! video/x-raw,format=NV12 ! appsink name=sink sync=false"
    ))?
    .downcast::<gst::Pipeline>()
    .map_err(|_| "not a pipeline")?;
    let sink = pipeline
        .by_name("sink")
        .and_then(|s| s.downcast::<AppSink>().ok())
        .ok_or("no appsink")?;
    pipeline.set_state(gst::State::Playing)?;
    let mut caps = None;
    let mut buffers = Vec::new();
    while buffers.len() < frames {
        let Ok(sample) = sink.pull_sample() else {
            break;
        };
        caps = caps.or_else(|| sample.caps_owned());
        if let Some(b) = sample.buffer_owned() {
            buffers.push(b);
        }
    }
    pipeline.set_state(gst::State::Null)?;
    Ok((caps.ok_or("no frames decoded")?, buffers))
}

fn main() -> AnyResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: element_overhead VIDEO WEIGHTS [FRAMES] [THREADS]");
        std::process::exit(2);
    }
    let frames: usize = args.get(2).map_or(Ok(30), |s| s.parse())?;
    let threads: u32 = args.get(3).map_or(Ok(0), |s| s.parse())?;
    gst::init()?;
    gsteffdet::plugin_register_static()?;
    let (caps, buffers) = decode(&args[0], frames)?;
    let info = gst_video::VideoInfo::from_caps(&caps)?;
    let matrix = if info.colorimetry().matrix() == gst_video::VideoColorMatrix::Bt709 {
        YuvMatrix::Bt709
    } else {
        YuvMatrix::Bt601
    };

    // (a) The bare detector, same settings as the element's defaults.
    let detector = Detector::new(
        &args[1],
        DetectorOptions {
            threads: threads as usize,
            postprocess: effdet::postprocess::PostprocessConfig {
                score_threshold: 0.3,
                ..Default::default()
            },
            ..DetectorOptions::default()
        },
    )?;
    let run_bare = |count: &mut usize| -> AnyResult<f64> {
        let t = Instant::now();
        for b in &buffers {
            let f = gst_video::VideoFrameRef::from_buffer_ref_readable(b.as_ref(), &info)?;
            let planes = [f.plane_data(0)?, f.plane_data(1)?];
            let strides = [f.plane_stride()[0] as usize, f.plane_stride()[1] as usize];
            let frame = Frame::from_planes(
                PixelFormat::Nv12,
                info.width() as usize,
                info.height() as usize,
                &planes,
                &strides,
            )?
            .with_colorimetry(matrix, YuvRange::Limited);
            *count += detector.detect(&frame)?.len();
        }
        Ok(t.elapsed().as_secs_f64())
    };

    // (b) The element.
    let run_element = || -> AnyResult<f64> {
        let pipeline = gst::parse::launch(&format!(
            "appsrc name=src format=time ! effdet model=\"{}\" threads={threads} ! fakesink sync=false",
            args[1]
        ))?
        .downcast::<gst::Pipeline>()
        .map_err(|_| "not a pipeline")?;
        let src = pipeline
            .by_name("src")
            .and_then(|s| s.downcast::<AppSrc>().ok())
            .ok_or("no appsrc")?;
        src.set_caps(Some(&caps));
        src.set_max_bytes(u64::MAX);
        // The model loads in effdet's start(), which runs inside this call: it is not timed.
        // (Waiting for PAUSED would wait forever: appsrc cannot preroll before data arrives.)
        pipeline.set_state(gst::State::Playing)?;
        let t = Instant::now();
        for b in &buffers {
            src.push_buffer(b.clone())?;
        }
        src.end_of_stream()?;
        let bus = pipeline.bus().ok_or("no bus")?;
        for msg in bus.iter_timed(gst::ClockTime::NONE) {
            match msg.view() {
                gst::MessageView::Eos(_) => break,
                gst::MessageView::Error(e) => return Err(format!("{}", e.error()).into()),
                _ => {}
            }
        }
        let secs = t.elapsed().as_secs_f64();
        pipeline.set_state(gst::State::Null)?;
        Ok(secs)
    };

    // Warm up both paths once, then alternate to spread machine noise evenly.
    let mut dets = 0usize;
    run_bare(&mut dets)?;
    run_element()?;
    let (mut bare, mut element) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        bare.push(run_bare(&mut dets)?);
        element.push(run_element()?);
    }
    bare.sort_by(f64::total_cmp);
    element.sort_by(f64::total_cmp);
    let n = buffers.len() as f64;
    let (b, e) = (bare[1] / n * 1e3, element[1] / n * 1e3);
    println!(
        "{}",
        serde_json::json!({
            "frames": buffers.len(),
            "width": info.width(),
            "height": info.height(),
            "format": "NV12",
            "threads": threads,
            "detector_ms_per_frame": b,
            "element_ms_per_frame": e,
            "overhead_percent": (e - b) / b * 100.0,
        })
    );
    Ok(())
}
