//! Pixel-level drawing for `effdetoverlay`: clipped rectangle fills on a mapped video frame,
//! colour conversion, box and label geometry, and bitmap text.
//!
//! Everything works in `i64` frame coordinates with half-open rectangles and clips before
//! touching memory, so boxes at, beyond or far beyond the frame edges, empty boxes and tiny
//! frames draw what is visible and nothing else. Every byte is written through a bounds-checked
//! index into the mapped plane, so a frame whose planes are smaller than its strides claim
//! cannot make the element panic either.

use gst_video::prelude::*;

use super::font;

/// Coordinates are clamped to +-2^40 before any arithmetic: far outside any frame, far from
/// overflowing `i64` in the sums the layout does.
const COORD_LIMIT: f64 = (1u64 << 40) as f64;

/// A half-open pixel rectangle: columns `x0..x1`, rows `y0..y1`. Empty when `x0 >= x1` or
/// `y0 >= y1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Rect {
    pub x0: i64,
    pub y0: i64,
    pub x1: i64,
    pub y1: i64,
}

impl Rect {
    pub fn new(x0: i64, y0: i64, x1: i64, y1: i64) -> Self {
        Rect { x0, y0, x1, y1 }
    }

    pub fn is_empty(&self) -> bool {
        self.x0 >= self.x1 || self.y0 >= self.y1
    }

    pub fn intersect(&self, other: &Rect) -> Rect {
        Rect {
            x0: self.x0.max(other.x0),
            y0: self.y0.max(other.y0),
            x1: self.x1.min(other.x1),
            y1: self.y1.min(other.y1),
        }
    }

    /// The pixels a box with corners (`x1`, `y1`) and (`x2`, `y2`) in frame pixels touches:
    /// rounded outwards like [`crate::meta::attach`] rounds the ROI rectangle, corners in either
    /// order. `None` for non-finite coordinates.
    pub fn from_box(x1: f64, y1: f64, x2: f64, y2: f64) -> Option<Rect> {
        if ![x1, y1, x2, y2].iter().all(|v| v.is_finite()) {
            return None;
        }
        let px = |v: f64| v.clamp(-COORD_LIMIT, COORD_LIMIT) as i64;
        Some(Rect {
            x0: px(x1.min(x2).floor()),
            y0: px(y1.min(y2).floor()),
            x1: px(x1.max(x2).ceil()),
            y1: px(y1.max(y2).ceil()),
        })
    }
}

/// The four sides of the outline of `b`, each `line_width` pixels thick, drawn inside `b` (a box
/// narrower or shorter than two lines comes out filled).
pub(super) fn outline(b: Rect, line_width: i64) -> [Rect; 4] {
    let top = Rect::new(b.x0, b.y0, b.x1, (b.y0 + line_width).min(b.y1));
    let bottom = Rect::new(b.x0, (b.y1 - line_width).max(b.y0), b.x1, b.y1);
    let left = Rect::new(b.x0, b.y0, (b.x0 + line_width).min(b.x1), b.y1);
    let right = Rect::new((b.x1 - line_width).max(b.x0), b.y0, b.x1, b.y1);
    [top, bottom, left, right]
}

/// Where a `bar_w` x `bar_h` label bar for box `b` goes in a `frame_w` x `frame_h` frame: on top
/// of the box, left edges aligned; inside the box's top edge when there is no room above; always
/// shifted to lie inside the frame (a bar larger than the frame starts at its top-left corner and
/// is clipped when drawn).
pub(super) fn label_bar(b: Rect, bar_w: i64, bar_h: i64, frame_w: i64, frame_h: i64) -> Rect {
    let x = b.x0.min(frame_w - bar_w).max(0);
    let y = if b.y0 - bar_h >= 0 {
        b.y0 - bar_h
    } else {
        b.y0.max(0)
    };
    let y = y.min(frame_h - bar_h).max(0);
    Rect::new(x, y, x + bar_w, y + bar_h)
}

/// The RGB colour as BT.601 limited-range ("studio swing") Y'CbCr, the matrix and range of SD
/// video and what `videoconvert` assumes for untagged NV12/I420 below HD sizes:
///
/// ```text
/// Y = ((  66 R + 129 G +  25 B + 128) >> 8) +  16    in 16..=235
/// U = (( -38 R -  74 G + 112 B + 128) >> 8) + 128    in 16..=240
/// V = (( 112 R -  94 G -  18 B + 128) >> 8) + 128    in 16..=240
/// ```
///
/// (the usual 8-bit integer form of the BT.601 equations, rounding to nearest). The overlay
/// does not follow the caps' colorimetry: label colours only need to be recognisable, and one
/// fixed conversion keeps them identical across resolutions.
pub(super) fn rgb_to_yuv_bt601_limited([r, g, b]: [u8; 3]) -> [u8; 3] {
    let (r, g, b) = (r as i32, g as i32, b as i32);
    let y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16;
    let u = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128;
    let v = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128;
    [
        y.clamp(0, 255) as u8,
        u.clamp(0, 255) as u8,
        v.clamp(0, 255) as u8,
    ]
}

/// Black or white, whichever has the higher WCAG contrast ratio against `bg`.
pub(super) fn text_colour(bg: [u8; 3]) -> [u8; 3] {
    let linear = |c: u8| {
        let c = c as f64 / 255.0;
        if c <= 0.040_45 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    let l = 0.2126 * linear(bg[0]) + 0.7152 * linear(bg[1]) + 0.0722 * linear(bg[2]);
    let against_black = (l + 0.05) / 0.05;
    let against_white = 1.05 / (l + 0.05);
    if against_black >= against_white {
        [0, 0, 0]
    } else {
        [255, 255, 255]
    }
}

/// A stable colour for a label that has no class id: an FNV-1a hash of the label picks one of
/// the first 1009 class colours.
pub(super) fn label_colour(label: &str) -> [u8; 3] {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in label.bytes() {
        hash ^= byte as u32;
        hash = hash.wrapping_mul(0x0100_0193);
    }
    effdet::image_io::class_colour(1 + hash % 1009)
}

/// How a fill treats chroma samples shared with pixels outside the filled rectangle (formats
/// with subsampled chroma only; for RGB both are the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Chroma {
    /// Every chroma sample that covers at least one filled pixel takes the colour: lines keep
    /// their colour even when one pixel wide on an odd column.
    Touched,
    /// Only chroma samples whose pixels are all filled take the colour (frame edges count as
    /// covered): black or white text on a label bar does not smear the bar's colour.
    Covered,
}

/// A mapped 8-bit RGB or YUV frame to draw on.
pub(super) struct Canvas<'a, 'b> {
    frame: &'a mut gst_video::VideoFrameRef<&'b mut gst::BufferRef>,
    width: i64,
    height: i64,
    yuv: bool,
    alpha: bool,
}

impl<'a, 'b> Canvas<'a, 'b> {
    /// `None` when the frame is not an 8-bit RGB or YUV format.
    pub fn new(frame: &'a mut gst_video::VideoFrameRef<&'b mut gst::BufferRef>) -> Option<Self> {
        let info = frame.format_info();
        let eight_bit = (0..frame.n_components()).all(|c| frame.comp_depth(c) == 8);
        if !eight_bit || !(info.is_rgb() || info.is_yuv()) || frame.n_components() < 3 {
            return None;
        }
        Some(Canvas {
            width: frame.width() as i64,
            height: frame.height() as i64,
            yuv: info.is_yuv(),
            alpha: info.has_alpha() && frame.n_components() >= 4,
            frame,
        })
    }

    pub fn width(&self) -> i64 {
        self.width
    }

    pub fn height(&self) -> i64 {
        self.height
    }

    pub fn bounds(&self) -> Rect {
        Rect::new(0, 0, self.width, self.height)
    }

    /// Fills `rect` (clipped to the frame) with the RGB colour `rgb`; alpha, where the format has
    /// it, becomes opaque.
    pub fn fill(&mut self, rect: Rect, rgb: [u8; 3], chroma: Chroma) {
        let r = rect.intersect(&self.bounds());
        if r.is_empty() {
            return;
        }
        let values = if self.yuv {
            rgb_to_yuv_bt601_limited(rgb)
        } else {
            rgb
        };
        let n = if self.alpha { 4 } else { 3 };
        for comp in 0..n {
            let value = values.get(comp as usize).copied().unwrap_or(255);
            let info = self.frame.format_info();
            let (w_sub, h_sub) = (info.w_sub()[comp as usize], info.h_sub()[comp as usize]);
            let comp_w = self.frame.comp_width(comp) as i64;
            let comp_h = self.frame.comp_height(comp) as i64;
            let (cx0, cx1) = sub_range(r.x0, r.x1, w_sub, self.width, comp_w, chroma);
            let (cy0, cy1) = sub_range(r.y0, r.y1, h_sub, self.height, comp_h, chroma);
            self.fill_component(comp, value, cx0, cx1, cy0, cy1);
        }
    }

    /// Sets component `comp` to `value` for samples `x0..x1` x `y0..y1` (component coordinates,
    /// already clipped).
    fn fill_component(&mut self, comp: u32, value: u8, x0: i64, x1: i64, y0: i64, y1: i64) {
        if x0 >= x1 || y0 >= y1 || x0 < 0 || y0 < 0 {
            return;
        }
        let (Ok(stride), Ok(pstride)) = (
            usize::try_from(self.frame.comp_stride(comp)),
            usize::try_from(self.frame.comp_pstride(comp)),
        ) else {
            return;
        };
        if pstride == 0 {
            return;
        }
        let poffset = self.frame.comp_poffset(comp) as usize;
        let plane = self.frame.comp_plane(comp);
        let Ok(data) = self.frame.plane_data_mut(plane) else {
            return;
        };
        for y in y0 as usize..y1 as usize {
            let row = y * stride + poffset;
            for x in x0 as usize..x1 as usize {
                match data.get_mut(row + x * pstride) {
                    Some(byte) => *byte = value,
                    None => return,
                }
            }
        }
    }

    /// Writes `text` with its top-left font pixel at (`x`, `y`), each font pixel a `scale` x
    /// `scale` square, in `rgb`; only set glyph pixels are written.
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, rgb: [u8; 3]) {
        let advance = font::ADVANCE as i64 * scale;
        for (i, c) in text.chars().enumerate() {
            let gx = x + i as i64 * advance;
            if gx >= self.width {
                break;
            }
            let glyph = font::glyph(c);
            for row in 0..font::GLYPH_HEIGHT {
                let py = y + row as i64 * scale;
                // Runs of set pixels in this row, filled as one rectangle each.
                let mut col = 0;
                while col < font::GLYPH_WIDTH {
                    if !font::is_set(glyph, col, row) {
                        col += 1;
                        continue;
                    }
                    let start = col;
                    while col < font::GLYPH_WIDTH && font::is_set(glyph, col, row) {
                        col += 1;
                    }
                    let run = Rect::new(
                        gx + start as i64 * scale,
                        py,
                        gx + col as i64 * scale,
                        py + scale,
                    );
                    self.fill(run, rgb, Chroma::Covered);
                }
            }
        }
    }
}

/// The component-space range `lo..hi` (pixel range, clipped to `0..full`, non-empty) maps to at
/// subsampling shift `sub`, clipped to `0..comp_len`.
fn sub_range(lo: i64, hi: i64, sub: u32, full: i64, comp_len: i64, chroma: Chroma) -> (i64, i64) {
    let (a, b) = match chroma {
        Chroma::Touched => (lo >> sub, ((hi - 1) >> sub) + 1),
        Chroma::Covered => {
            let a = (lo + (1 << sub) - 1) >> sub;
            let b = if hi >= full { comp_len } else { hi >> sub };
            (a, b)
        }
    };
    (a.clamp(0, comp_len), b.clamp(0, comp_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuv_conversion_hits_the_limited_range_corners() {
        assert_eq!(rgb_to_yuv_bt601_limited([0, 0, 0]), [16, 128, 128]);
        assert_eq!(rgb_to_yuv_bt601_limited([255, 255, 255]), [235, 128, 128]);
        assert_eq!(rgb_to_yuv_bt601_limited([255, 0, 0]), [82, 90, 240]);
        assert_eq!(rgb_to_yuv_bt601_limited([0, 0, 255]), [41, 240, 110]);
    }

    #[test]
    fn text_is_black_on_light_and_white_on_dark() {
        assert_eq!(text_colour([255, 255, 0]), [0, 0, 0]);
        assert_eq!(text_colour([240, 240, 240]), [0, 0, 0]);
        assert_eq!(text_colour([0, 0, 128]), [255, 255, 255]);
        assert_eq!(text_colour([20, 20, 20]), [255, 255, 255]);
    }

    #[test]
    fn boxes_round_outwards_and_reject_non_finite() {
        assert_eq!(
            Rect::from_box(1.5, 2.0, 10.2, 20.0),
            Some(Rect::new(1, 2, 11, 20))
        );
        assert_eq!(
            Rect::from_box(10.0, 20.0, 1.0, 2.0),
            Some(Rect::new(1, 2, 10, 20))
        );
        assert_eq!(Rect::from_box(f64::NAN, 0.0, 1.0, 1.0), None);
        assert_eq!(Rect::from_box(0.0, 0.0, f64::INFINITY, 1.0), None);
        let huge = Rect::from_box(-1e300, -1e300, 1e300, 1e300).unwrap();
        assert!(huge.x0 < -1_000_000_000 && huge.x1 > 1_000_000_000);
    }

    #[test]
    fn outline_of_a_thin_box_stays_inside_it() {
        let b = Rect::new(10, 10, 12, 30);
        for side in outline(b, 3) {
            assert_eq!(side.intersect(&b), side);
        }
    }

    #[test]
    fn label_bar_goes_above_then_inside_and_stays_in_frame() {
        // Room above.
        assert_eq!(
            label_bar(Rect::new(10, 30, 50, 60), 20, 10, 100, 100),
            Rect::new(10, 20, 30, 30)
        );
        // No room above: inside the box.
        assert_eq!(
            label_bar(Rect::new(10, 5, 50, 60), 20, 10, 100, 100),
            Rect::new(10, 5, 30, 15)
        );
        // Box starting above and left of the frame.
        assert_eq!(
            label_bar(Rect::new(-40, -40, 50, 60), 20, 10, 100, 100),
            Rect::new(0, 0, 20, 10)
        );
        // Near the right edge: shifted left.
        assert_eq!(
            label_bar(Rect::new(95, 50, 99, 60), 20, 10, 100, 100),
            Rect::new(80, 40, 100, 50)
        );
        // Bar larger than the frame.
        assert_eq!(
            label_bar(Rect::new(0, 0, 1, 1), 20, 10, 1, 1),
            Rect::new(0, 0, 20, 10)
        );
    }

    #[test]
    fn chroma_ranges_for_touched_and_covered() {
        // Pixels 3..5 at 2:1: samples 1 and 2 are touched, none fully covered.
        assert_eq!(sub_range(3, 5, 1, 100, 50, Chroma::Touched), (1, 3));
        assert_eq!(sub_range(3, 5, 1, 100, 50, Chroma::Covered), (2, 2));
        assert_eq!(sub_range(2, 6, 1, 100, 50, Chroma::Covered), (1, 3));
        // Odd frame width 5 (3 chroma samples): the last pixel alone covers the last sample.
        assert_eq!(sub_range(4, 5, 1, 5, 3, Chroma::Covered), (2, 3));
        // No subsampling: both are the pixel range.
        assert_eq!(sub_range(3, 5, 0, 100, 100, Chroma::Covered), (3, 5));
    }

    #[test]
    fn label_colours_are_stable_and_differ() {
        assert_eq!(label_colour("face"), label_colour("face"));
        assert_ne!(label_colour("face"), label_colour("car"));
    }
}
