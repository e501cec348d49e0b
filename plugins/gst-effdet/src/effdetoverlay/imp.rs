//! Implementation of the `effdetoverlay` element. See `mod.rs` for the user-facing description.
//!
//! Locking: `settings` is held only to copy it at the start of each frame; drawing runs with no
//! lock held, so property changes never wait for a frame.

use std::sync::{LazyLock, Mutex};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::subclass::prelude::*;
use gst_video::prelude::*;
use gst_video::subclass::prelude::*;

use super::draw::{self, Canvas, Chroma, Rect};
use super::font;
use crate::formats::FORMATS;
use crate::meta::{self, MetaDetection};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "effdetoverlay",
        gst::DebugColorFlags::empty(),
        Some("Detection box overlay"),
    )
});

const DEFAULT_LINE_WIDTH: u32 = 3;
const DEFAULT_TEXT_SCALE: u32 = 2;
const DEFAULT_SHOW_CONFIDENCE: bool = true;
const DEFAULT_SHOW_LABELS: bool = true;

const MAX_LINE_WIDTH: u32 = 64;
const MAX_TEXT_SCALE: u32 = 16;

/// Labels longer than this many characters are cut; a bar that long is wider than any frame at
/// the smallest scale anyway.
const MAX_LABEL_CHARS: usize = 256;

#[derive(Debug, Clone, Copy)]
struct Settings {
    line_width: u32,
    text_scale: u32,
    show_confidence: bool,
    show_labels: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            line_width: DEFAULT_LINE_WIDTH,
            text_scale: DEFAULT_TEXT_SCALE,
            show_confidence: DEFAULT_SHOW_CONFIDENCE,
            show_labels: DEFAULT_SHOW_LABELS,
        }
    }
}

#[derive(Default)]
pub struct EffdetOverlay {
    settings: Mutex<Settings>,
}

/// One region to draw: its pixel box (unclipped), colour and label text.
struct Region {
    rect: Rect,
    colour: [u8; 3],
    text: String,
}

impl Region {
    fn new(d: &MetaDetection, settings: &Settings) -> Option<Region> {
        let rect = Rect::from_box(d.x1, d.y1, d.x2, d.y2)?;
        let colour = if d.class_id > 0 {
            effdet::image_io::class_colour(d.class_id)
        } else {
            draw::label_colour(&d.label)
        };
        let text = if settings.show_labels {
            label_text(d, settings.show_confidence)
        } else {
            String::new()
        };
        Some(Region { rect, colour, text })
    }
}

/// `label 0.87`: the label and, when wanted and known, the confidence with two decimals.
fn label_text(d: &MetaDetection, show_confidence: bool) -> String {
    let label: String = d.label.chars().take(MAX_LABEL_CHARS).collect();
    match d.score.filter(|s| show_confidence && s.is_finite()) {
        Some(score) if label.is_empty() => format!("{score:.2}"),
        Some(score) => format!("{label} {score:.2}"),
        None => label,
    }
}

impl EffdetOverlay {
    /// Draws `regions` on `canvas`: every outline first, then every label, so that no outline
    /// crosses a label.
    fn draw(&self, canvas: &mut Canvas, regions: &[Region], settings: &Settings) {
        let line_width = settings.line_width as i64;
        for r in regions {
            for side in draw::outline(r.rect, line_width) {
                canvas.fill(side, r.colour, Chroma::Touched);
            }
        }

        let scale = settings.text_scale as i64;
        for r in regions.iter().filter(|r| !r.text.is_empty()) {
            // One font pixel of padding around the text.
            let bar_w = (font::text_width(&r.text) as i64 + 2) * scale;
            let bar_h = (font::GLYPH_HEIGHT as i64 + 2) * scale;
            let bar = draw::label_bar(r.rect, bar_w, bar_h, canvas.width(), canvas.height());
            canvas.fill(bar, r.colour, Chroma::Touched);
            canvas.text(
                bar.x0 + scale,
                bar.y0 + scale,
                &r.text,
                scale,
                draw::text_colour(r.colour),
            );
        }
    }
}

#[glib::object_subclass]
impl ObjectSubclass for EffdetOverlay {
    const NAME: &'static str = "GstEffdetOverlay";
    type Type = super::EffdetOverlay;
    type ParentType = gst_video::VideoFilter;
}

impl ObjectImpl for EffdetOverlay {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecUInt::builder("line-width")
                    .nick("Line width")
                    .blurb("Thickness of the box outlines in pixels, drawn inside each box")
                    .minimum(1)
                    .maximum(MAX_LINE_WIDTH)
                    .default_value(DEFAULT_LINE_WIDTH)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("text-scale")
                    .nick("Text scale")
                    .blurb(
                        "Integer scale of the 5x8 bitmap font used for labels \
                         (1 = 8 pixels high text)",
                    )
                    .minimum(1)
                    .maximum(MAX_TEXT_SCALE)
                    .default_value(DEFAULT_TEXT_SCALE)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoolean::builder("show-confidence")
                    .nick("Show confidence")
                    .blurb(
                        "Append the detection confidence with two decimals to each label \
                         (when the region carries one)",
                    )
                    .default_value(DEFAULT_SHOW_CONFIDENCE)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoolean::builder("show-labels")
                    .nick("Show labels")
                    .blurb("Draw a label bar above each box; when false only the boxes are drawn")
                    .default_value(DEFAULT_SHOW_LABELS)
                    .mutable_playing()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut settings = self.settings.lock().unwrap_or_else(|e| e.into_inner());
        match pspec.name() {
            "line-width" => {
                let v = value.get().expect("type checked upstream");
                gst::info!(
                    CAT,
                    imp = self,
                    "line-width: {} -> {}",
                    settings.line_width,
                    v
                );
                settings.line_width = v;
            }
            "text-scale" => {
                let v = value.get().expect("type checked upstream");
                gst::info!(
                    CAT,
                    imp = self,
                    "text-scale: {} -> {}",
                    settings.text_scale,
                    v
                );
                settings.text_scale = v;
            }
            "show-confidence" => {
                let v = value.get().expect("type checked upstream");
                gst::info!(
                    CAT,
                    imp = self,
                    "show-confidence: {} -> {}",
                    settings.show_confidence,
                    v
                );
                settings.show_confidence = v;
            }
            "show-labels" => {
                let v = value.get().expect("type checked upstream");
                gst::info!(
                    CAT,
                    imp = self,
                    "show-labels: {} -> {}",
                    settings.show_labels,
                    v
                );
                settings.show_labels = v;
            }
            // GObject only passes the properties declared above; never panic regardless.
            other => gst::warning!(CAT, imp = self, "Unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let settings = self.settings.lock().unwrap_or_else(|e| e.into_inner());
        match pspec.name() {
            "line-width" => settings.line_width.to_value(),
            "text-scale" => settings.text_scale.to_value(),
            "show-confidence" => settings.show_confidence.to_value(),
            "show-labels" => settings.show_labels.to_value(),
            _ => glib::Value::from_type(pspec.value_type()),
        }
    }
}

impl GstObjectImpl for EffdetOverlay {}

impl ElementImpl for EffdetOverlay {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static ELEMENT_METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "EfficientDet detection overlay",
                "Filter/Effect/Video",
                "Draws region-of-interest metas (effdet detections or any other element's) \
                 as labelled boxes into the video",
                "effdet-rs developers",
            )
        });
        Some(&*ELEMENT_METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static PAD_TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let caps = gst_video::VideoCapsBuilder::new()
                .format_list(FORMATS)
                .build();
            vec![
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &caps,
                )
                .expect("valid src pad template"),
                gst::PadTemplate::new(
                    "sink",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Always,
                    &caps,
                )
                .expect("valid sink pad template"),
            ]
        });
        PAD_TEMPLATES.as_ref()
    }
}

impl BaseTransformImpl for EffdetOverlay {
    const MODE: gst_base::subclass::BaseTransformMode =
        gst_base::subclass::BaseTransformMode::AlwaysInPlace;
    const PASSTHROUGH_ON_SAME_CAPS: bool = false;
    const TRANSFORM_IP_ON_PASSTHROUGH: bool = false;
}

impl VideoFilterImpl for EffdetOverlay {
    fn set_info(
        &self,
        incaps: &gst::Caps,
        in_info: &gst_video::VideoInfo,
        outcaps: &gst::Caps,
        out_info: &gst_video::VideoInfo,
    ) -> Result<(), gst::LoggableError> {
        gst::debug!(
            CAT,
            imp = self,
            "configured for {} {}x{}",
            in_info.format(),
            in_info.width(),
            in_info.height()
        );
        self.parent_set_info(incaps, in_info, outcaps, out_info)
    }

    fn transform_frame_ip(
        &self,
        frame: &mut gst_video::VideoFrameRef<&mut gst::BufferRef>,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let settings = *self.settings.lock().unwrap_or_else(|e| e.into_inner());

        let detections = meta::read(frame.buffer());
        if detections.is_empty() {
            return Ok(gst::FlowSuccess::Ok);
        }
        let Some(mut canvas) = Canvas::new(frame) else {
            // The pad templates only admit formats Canvas handles.
            gst::warning!(
                CAT,
                imp = self,
                "cannot draw on this format; passing through"
            );
            return Ok(gst::FlowSuccess::Ok);
        };

        let bounds = canvas.bounds();
        let regions: Vec<Region> = detections
            .iter()
            .filter_map(|d| Region::new(d, &settings))
            .filter(|r| !r.rect.intersect(&bounds).is_empty())
            .collect();
        gst::trace!(
            CAT,
            imp = self,
            "{} regions, {} visible",
            detections.len(),
            regions.len()
        );
        self.draw(&mut canvas, &regions, &settings);
        Ok(gst::FlowSuccess::Ok)
    }
}
