//! GStreamer plugin `effdet`: EfficientDet object detection for video.
//!
//! - `effdet`: runs the detector on every frame (or every Nth) and attaches one
//!   `GstVideoRegionOfInterestMeta` per detection.
//! - `effdetoverlay`: draws region-of-interest metas (from `effdet` or any element) into frames.
//! - `effdetjson`: writes the detections of every frame as one JSON line.
//!
//! The metadata convention all three share lives in [`meta`].

use gst::glib;

mod effdet;
mod effdetjson;
mod effdetoverlay;
mod formats;
pub mod meta;

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    effdet::register(plugin)?;
    effdetoverlay::register(plugin)?;
    effdetjson::register(plugin)?;
    Ok(())
}

gst::plugin_define!(
    effdet,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "Apache-2.0",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    "effdet-rs",
    env!("BUILD_REL_DATE")
);
