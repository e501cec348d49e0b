//! Reading PNG and JPEG images from disk into RGB frames, and writing annotated PNGs.

use std::path::Path;

use crate::detection::Detection;
use crate::error::{Error, Result};
use crate::frame::{Frame, PixelFormat};

/// A decoded image: tightly packed RGB8.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedImage {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl DecodedImage {
    /// A frame view of the pixels, for [`crate::Detector::detect`].
    pub fn frame(&self) -> Result<Frame<'_>> {
        Frame::packed(PixelFormat::Rgb, self.width, self.height, &self.rgb)
    }
}

/// Decodes a PNG or JPEG file (format from the content, not the extension).
pub fn load_image(path: impl AsRef<Path>) -> Result<DecodedImage> {
    let path = path.as_ref();
    let err = |reason: String| Error::Image {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let format = image::guess_format(&bytes)
        .map_err(|_| err("not a PNG or JPEG image (unrecognised content)".into()))?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(err(format!(
            "{format:?} images are not supported; use PNG or JPEG"
        )));
    }
    let img = image::load_from_memory_with_format(&bytes, format)
        .map_err(|e| err(format!("cannot decode: {e}")))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(err("image has zero size".into()));
    }
    let rgb = img.to_rgb8();
    Ok(DecodedImage {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        rgb: rgb.into_raw(),
    })
}

/// A stable, well-separated colour per class id (golden-angle hue steps).
pub fn class_colour(class_id: u32) -> [u8; 3] {
    let h = (class_id as f32 * 0.618_034).fract();
    hsv_to_rgb(f64::from(h), 0.85, 0.95).map(|c| (c * 255.0) as u8)
}

/// HSV (each in 0..=1) to RGB (each in 0..=1).
pub(crate) fn hsv_to_rgb(h: f64, s: f64, v: f64) -> [f64; 3] {
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - f * s), v * (1.0 - (1.0 - f) * s));
    match i as u32 % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// Draws each detection's box (in its class colour, `thickness` pixels) onto an RGB image.
pub fn draw_boxes(img: &mut DecodedImage, detections: &[Detection], thickness: usize) {
    let (w, h) = (img.width as i64, img.height as i64);
    for d in detections {
        let c = class_colour(d.class_id);
        let x1 = (d.x1.round() as i64).clamp(0, w - 1);
        let y1 = (d.y1.round() as i64).clamp(0, h - 1);
        let x2 = (d.x2.round() as i64).clamp(0, w - 1);
        let y2 = (d.y2.round() as i64).clamp(0, h - 1);
        for t in 0..thickness as i64 {
            for x in x1..=x2 {
                for y in [y1 + t, y2 - t] {
                    put(img, x, y, c);
                }
            }
            for y in y1..=y2 {
                for x in [x1 + t, x2 - t] {
                    put(img, x, y, c);
                }
            }
        }
    }
}

fn put(img: &mut DecodedImage, x: i64, y: i64, c: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as usize) < img.width && (y as usize) < img.height {
        let i = (y as usize * img.width + x as usize) * 3;
        img.rgb[i..i + 3].copy_from_slice(&c);
    }
}

/// Writes an RGB image as PNG.
pub fn save_png(img: &DecodedImage, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    image::save_buffer(
        path,
        &img.rgb,
        img.width as u32,
        img.height as u32,
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| Error::Image {
        path: path.to_path_buf(),
        reason: format!("cannot write PNG: {e}"),
    })
}
