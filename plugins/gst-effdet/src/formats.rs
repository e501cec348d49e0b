//! The raw video formats the `effdet` and `effdetoverlay` elements accept, and how they map to
//! the library's `PixelFormat`.

use effdet::PixelFormat;
use gst_video::VideoFormat;

/// Every format `effdet::PixelFormat` supports, in GStreamer's names.
pub(crate) const FORMATS: [VideoFormat; 7] = [
    VideoFormat::Rgb,
    VideoFormat::Rgba,
    VideoFormat::Rgbx,
    VideoFormat::Bgrx,
    VideoFormat::Bgra,
    VideoFormat::Nv12,
    VideoFormat::I420,
];

/// The library format for a GStreamer format, if it is one of [`FORMATS`].
pub(crate) fn pixel_format(f: VideoFormat) -> Option<PixelFormat> {
    Some(match f {
        VideoFormat::Rgb => PixelFormat::Rgb,
        VideoFormat::Rgba => PixelFormat::Rgba,
        VideoFormat::Rgbx => PixelFormat::Rgbx,
        VideoFormat::Bgrx => PixelFormat::Bgrx,
        VideoFormat::Bgra => PixelFormat::Bgra,
        VideoFormat::Nv12 => PixelFormat::Nv12,
        VideoFormat::I420 => PixelFormat::I420,
        _ => return None,
    })
}
