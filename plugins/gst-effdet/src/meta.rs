//! How detections travel between elements: one `GstVideoRegionOfInterestMeta` per detection,
//! `roi_type` = the label, rectangle in frame pixels, and a parameter structure named
//! `detection`:
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `label` | string | class name |
//! | `class-id` | uint | 1-based class id (COCO ids for COCO models) |
//! | `confidence` | double | score in [0, 1] |
//! | `x1`, `y1`, `x2`, `y2` | double | the exact box in frame pixels (the ROI rectangle is rounded) |
//!
//! Any C, Python or Rust application can read these with the standard GstVideo API
//! (`gst_buffer_iterate_meta_filtered(buf, GST_VIDEO_REGION_OF_INTEREST_META_API_TYPE)`, then
//! `gst_video_region_of_interest_meta_get_param(meta, "detection")`).

use gst_video::VideoRegionOfInterestMeta;

/// Name of the parameter structure `effdet` attaches to each ROI meta.
pub const DETECTION_PARAM: &str = "detection";

/// A detection as carried by a buffer's metadata.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct MetaDetection {
    pub x1: f64,
    pub y1: f64,
    pub x2: f64,
    pub y2: f64,
    /// The confidence; ROI metas from other elements may have none (serialised as `null`).
    pub score: Option<f64>,
    /// 0 when the meta carries no class id.
    pub class_id: u32,
    pub label: String,
}

/// Attaches `d` (in frame pixels) to `buffer` as a ROI meta with its `detection` parameters.
/// The integer rectangle is the box rounded outwards and clipped to the `width` x `height` frame.
pub fn attach(buffer: &mut gst::BufferRef, d: &effdet::Detection, width: u32, height: u32) {
    let x1 = d.x1.max(0.0).floor().min(width as f32) as u32;
    let y1 = d.y1.max(0.0).floor().min(height as f32) as u32;
    let x2 = d.x2.max(0.0).ceil().min(width as f32) as u32;
    let y2 = d.y2.max(0.0).ceil().min(height as f32) as u32;
    let mut meta = VideoRegionOfInterestMeta::add(
        buffer,
        &d.label,
        (x1, y1, x2.saturating_sub(x1), y2.saturating_sub(y1)),
    );
    meta.add_param(detection_structure(d));
}

/// The `detection` structure for `d` (label, class-id, confidence, x1..y2): the ROI meta's
/// parameter, and also what `effdet`'s bus messages list per detection.
pub fn detection_structure(d: &effdet::Detection) -> gst::Structure {
    gst::Structure::builder(DETECTION_PARAM)
        .field("label", &d.label)
        .field("class-id", d.class_id)
        .field("confidence", d.score as f64)
        .field("x1", d.x1 as f64)
        .field("y1", d.y1 as f64)
        .field("x2", d.x2 as f64)
        .field("y2", d.y2 as f64)
        .build()
}

/// With the `analytics` feature (GStreamer >= 1.24): also describes the detections with
/// GstAnalytics, one `GstAnalyticsRelationMeta` holding one object-detection entry per detection
/// (type = the label as a quark, the rounded box, location confidence = the score).
#[cfg(feature = "analytics")]
pub fn attach_analytics(
    buffer: &mut gst::BufferRef,
    dets: &[effdet::Detection],
    width: u32,
    height: u32,
) -> Result<(), gst::glib::BoolError> {
    use gst_analytics::AnalyticsRelationMetaODExt;
    if dets.is_empty() {
        return Ok(());
    }
    let mut rel = gst_analytics::AnalyticsRelationMeta::add(buffer);
    for d in dets {
        let x1 = d.x1.clamp(0.0, width as f32).floor() as i32;
        let y1 = d.y1.clamp(0.0, height as f32).floor() as i32;
        let x2 = d.x2.clamp(0.0, width as f32).ceil() as i32;
        let y2 = d.y2.clamp(0.0, height as f32).ceil() as i32;
        rel.add_od_mtd(
            gst::glib::Quark::from_str(d.label.as_str()),
            x1,
            y1,
            x2 - x1,
            y2 - y1,
            d.score,
        )?;
    }
    Ok(())
}

/// Reads every ROI meta on `buffer`, ours or another element's, in attachment order.
pub fn read(buffer: &gst::BufferRef) -> Vec<MetaDetection> {
    buffer
        .iter_meta::<VideoRegionOfInterestMeta>()
        .map(|m| {
            let (x, y, w, h) = m.rect();
            let mut d = MetaDetection {
                x1: x as f64,
                y1: y as f64,
                x2: (x + w) as f64,
                y2: (y + h) as f64,
                score: None,
                class_id: 0,
                label: m.roi_type().to_string(),
            };
            if let Some(p) = m.param(DETECTION_PARAM) {
                if let Ok(v) = p.get::<f64>("confidence") {
                    d.score = Some(v);
                }
                if let Ok(v) = p.get::<u32>("class-id") {
                    d.class_id = v;
                }
                if let Ok(v) = p.get::<String>("label") {
                    d.label = v;
                }
                if let (Ok(x1), Ok(y1), Ok(x2), Ok(y2)) = (
                    p.get::<f64>("x1"),
                    p.get::<f64>("y1"),
                    p.get::<f64>("x2"),
                    p.get::<f64>("y2"),
                ) {
                    (d.x1, d.y1, d.x2, d.y2) = (x1, y1, x2, y2);
                }
            }
            d
        })
        .collect()
}

/// Removes every ROI meta that carries a `detection` parameter (ours), leaving others intact.
pub fn remove_ours(buffer: &mut gst::BufferRef) {
    buffer.foreach_meta_mut(|mut meta| {
        let ours = meta
            .downcast_mut::<VideoRegionOfInterestMeta>()
            .is_some_and(|m| m.param(DETECTION_PARAM).is_some());
        if ours {
            std::ops::ControlFlow::Continue(gst::buffer::BufferMetaForeachAction::Remove)
        } else {
            std::ops::ControlFlow::Continue(gst::buffer::BufferMetaForeachAction::Keep)
        }
    });
}
