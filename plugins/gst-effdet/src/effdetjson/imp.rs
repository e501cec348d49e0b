//! The `effdetjson` implementation: settings, per-run state and the per-buffer JSON line.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::{LazyLock, Mutex, MutexGuard};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::prelude::*;
use serde::{Serialize, Serializer};

use crate::meta::{self, MetaDetection};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "effdetjson",
        gst::DebugColorFlags::empty(),
        Some("EfficientDet detections as JSON lines"),
    )
});

/// Default `location`: none, i.e. standard output.
const DEFAULT_LOCATION: Option<&str> = None;

#[derive(Debug, Clone)]
struct Settings {
    /// File to write; `None` writes to standard output.
    location: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            location: DEFAULT_LOCATION.map(String::from),
        }
    }
}

/// Where the lines go.
enum Output {
    /// Standard output; std's `Stdout` is line-buffered, so each frame appears at once.
    Stdout(std::io::Stdout),
    /// A file, block-buffered; flushed at EOS and in `stop()`.
    File(BufWriter<File>),
}

impl Output {
    /// Writes one complete line in a single call, so lines from several elements writing to
    /// standard output never interleave.
    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        match self {
            Output::Stdout(s) => s.lock().write_all(line),
            Output::File(f) => f.write_all(line),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Output::Stdout(s) => s.flush(),
            Output::File(f) => f.flush(),
        }
    }
}

/// Created in `start()`, dropped in `stop()`.
struct State {
    output: Output,
    /// The location as shown in error messages (`stdout` or the path).
    name: String,
    /// Index of the next buffer.
    frame: u64,
    /// From the negotiated caps.
    width: Option<i32>,
    height: Option<i32>,
    /// A write failed and was reported; later flushes are skipped (one error, not a cascade).
    failed: bool,
}

/// Serialises an `f64` in its shortest `f32` form when it is exactly an `f32` (as everything
/// `effdet` attaches is), else in full `f64` precision. Either way the text parses back to the
/// stored value.
struct Num(f64);

impl Serialize for Num {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let narrow = self.0 as f32;
        if f64::from(narrow) == self.0 {
            s.serialize_f32(narrow)
        } else {
            s.serialize_f64(self.0)
        }
    }
}

/// One detection, fields in the CLI's order.
#[derive(Serialize)]
struct JsonDetection<'a> {
    x1: Num,
    y1: Num,
    x2: Num,
    y2: Num,
    score: Option<Num>,
    class_id: u32,
    label: &'a str,
}

impl<'a> From<&'a MetaDetection> for JsonDetection<'a> {
    fn from(d: &'a MetaDetection) -> Self {
        JsonDetection {
            x1: Num(d.x1),
            y1: Num(d.y1),
            x2: Num(d.x2),
            y2: Num(d.y2),
            score: d.score.map(Num),
            class_id: d.class_id,
            label: &d.label,
        }
    }
}

/// One output line.
#[derive(Serialize)]
struct JsonFrame<'a> {
    frame: u64,
    pts: Option<u64>,
    width: Option<i32>,
    height: Option<i32>,
    detections: Vec<JsonDetection<'a>>,
}

#[derive(Default)]
pub struct EffdetJson {
    settings: Mutex<Settings>,
    state: Mutex<Option<State>>,
}

impl EffdetJson {
    fn settings(&self) -> MutexGuard<'_, Settings> {
        self.settings.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn state(&self) -> MutexGuard<'_, Option<State>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Flushes the output; a failure is returned once, as the error message to post (after
    /// a reported write failure later flushes are skipped: one error, not a cascade).
    fn flush(&self) -> Result<(), gst::ErrorMessage> {
        let mut state = self.state();
        let Some(state) = state.as_mut().filter(|s| !s.failed) else {
            return Ok(());
        };
        gst::debug!(
            CAT,
            imp = self,
            "flushing {} after {} frames",
            state.name,
            state.frame
        );
        state.output.flush().map_err(|err| {
            state.failed = true;
            gst::error_msg!(
                gst::ResourceError::Write,
                ("Could not write detections to {}", state.name),
                ["{err}"]
            )
        })
    }

    /// Writes the line for `buf` and advances the frame counter; a failure is posted as an
    /// element error (after the state lock is released) and stops the stream.
    fn write_frame(&self, buf: &gst::BufferRef) -> Result<gst::FlowSuccess, gst::FlowError> {
        let detections = meta::read(buf);
        let result = {
            let mut state = self.state();
            match state.as_mut() {
                Some(state) => self.write_line(state, buf, &detections),
                None => Err(gst::error_msg!(
                    gst::CoreError::Failed,
                    ["Buffer before start"]
                )),
            }
        };
        match result {
            Ok(()) => Ok(gst::FlowSuccess::Ok),
            Err(err) => {
                self.post_error_message(err);
                Err(gst::FlowError::Error)
            }
        }
    }

    fn write_line(
        &self,
        state: &mut State,
        buf: &gst::BufferRef,
        detections: &[MetaDetection],
    ) -> Result<(), gst::ErrorMessage> {
        let line = JsonFrame {
            frame: state.frame,
            pts: buf.pts().map(|t| t.nseconds()),
            width: state.width,
            height: state.height,
            detections: detections.iter().map(JsonDetection::from).collect(),
        };
        let mut bytes = serde_json::to_vec(&line).map_err(|err| {
            gst::error_msg!(
                gst::LibraryError::Encode,
                (
                    "Could not serialise the detections of frame {}",
                    state.frame
                ),
                ["{err}"]
            )
        })?;
        bytes.push(b'\n');
        gst::trace!(
            CAT,
            imp = self,
            "frame {}: {} detection(s)",
            state.frame,
            detections.len()
        );
        state.output.write_line(&bytes).map_err(|err| {
            state.failed = true;
            gst::error_msg!(
                gst::ResourceError::Write,
                ("Could not write detections to {}", state.name),
                ["{err}"]
            )
        })?;
        state.frame += 1;
        Ok(())
    }
}

#[glib::object_subclass]
impl ObjectSubclass for EffdetJson {
    const NAME: &'static str = "GstEffdetJson";
    type Type = super::EffdetJson;
    type ParentType = gst_base::BaseTransform;
}

impl ObjectImpl for EffdetJson {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("location")
                    .nick("Location")
                    .blurb("File to write the JSON lines to (default: standard output)")
                    .default_value(DEFAULT_LOCATION)
                    .mutable_ready()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        match pspec.name() {
            "location" => {
                if self.state().is_some() {
                    gst::warning!(
                        CAT,
                        imp = self,
                        "location can only be changed in the NULL or READY state"
                    );
                    return;
                }
                let location = value
                    .get::<Option<String>>()
                    .expect("type checked upstream");
                gst::info!(CAT, imp = self, "location: {:?}", location);
                self.settings().location = location;
            }
            // GObject only passes the properties declared above; never panic regardless.
            other => gst::warning!(CAT, imp = self, "Unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        match pspec.name() {
            "location" => self.settings().location.to_value(),
            _ => glib::Value::from_type(pspec.value_type()),
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        obj.set_passthrough(true);
        obj.set_in_place(true);
    }
}

impl GstObjectImpl for EffdetJson {}

impl ElementImpl for EffdetJson {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "EfficientDet JSON writer",
                "Filter/Analyzer/Video",
                "Writes the region-of-interest detections of every frame as one JSON line",
                "effdet-rs developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static PAD_TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            // Any raw video, in any memory: the element only reads metas and the caps' size.
            let caps = gst::Caps::builder("video/x-raw").any_features().build();
            let src = gst::PadTemplate::new(
                "src",
                gst::PadDirection::Src,
                gst::PadPresence::Always,
                &caps,
            )
            .expect("valid src pad template");
            let sink = gst::PadTemplate::new(
                "sink",
                gst::PadDirection::Sink,
                gst::PadPresence::Always,
                &caps,
            )
            .expect("valid sink pad template");
            vec![src, sink]
        });
        PAD_TEMPLATES.as_ref()
    }
}

impl BaseTransformImpl for EffdetJson {
    const MODE: gst_base::subclass::BaseTransformMode =
        gst_base::subclass::BaseTransformMode::AlwaysInPlace;
    const PASSTHROUGH_ON_SAME_CAPS: bool = true;
    const TRANSFORM_IP_ON_PASSTHROUGH: bool = true;

    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let location = self.settings().location.clone();
        let (output, name) = match location {
            None => (Output::Stdout(std::io::stdout()), "stdout".to_string()),
            Some(path) => {
                let file = File::create(&path).map_err(|err| {
                    gst::error_msg!(
                        gst::ResourceError::OpenWrite,
                        ("Could not open {} for writing", path),
                        ["{err}"]
                    )
                })?;
                (Output::File(BufWriter::new(file)), path)
            }
        };
        gst::debug!(CAT, imp = self, "writing to {}", name);
        *self.state() = Some(State {
            output,
            name,
            frame: 0,
            width: None,
            height: None,
            failed: false,
        });
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        // Like filesink: a failure to write the tail is reported, but the element still stops.
        if let Err(err) = self.flush() {
            self.post_error_message(err);
        }
        *self.state() = None;
        Ok(())
    }

    fn set_caps(&self, incaps: &gst::Caps, outcaps: &gst::Caps) -> Result<(), gst::LoggableError> {
        let s = incaps
            .structure(0)
            .ok_or_else(|| gst::loggable_error!(CAT, "empty caps {incaps}"))?;
        let (width, height) = (s.get::<i32>("width").ok(), s.get::<i32>("height").ok());
        gst::debug!(CAT, imp = self, "caps {incaps}: {width:?}x{height:?}");
        if let Some(state) = self.state().as_mut() {
            state.width = width;
            state.height = height;
        }
        self.parent_set_caps(incaps, outcaps)
    }

    fn sink_event(&self, event: gst::Event) -> bool {
        if let gst::EventView::Eos(_) = event.view()
            && let Err(err) = self.flush()
        {
            self.post_error_message(err);
        }
        self.parent_sink_event(event)
    }

    fn transform_ip_passthrough(
        &self,
        buf: &gst::Buffer,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        self.write_frame(buf)
    }

    fn transform_ip(&self, buf: &mut gst::BufferRef) -> Result<gst::FlowSuccess, gst::FlowError> {
        // Only reached if passthrough were switched off; the work is the same and read-only.
        self.write_frame(buf)
    }
}
