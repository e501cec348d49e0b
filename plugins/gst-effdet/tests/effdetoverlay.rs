//! Tests for the `effdetoverlay` element: frames of a known colour with ROI metas go through a
//! `gst_check::Harness`; every pixel and every padding byte of the result is then checked
//! against what the overlay should have drawn.
//!
//! The expected pictures are computed here independently of the element: which pixels form a
//! box's outline, where the label bar goes (above the box's top-left corner, `10 * scale` high,
//! `(6 * chars + 1) * scale` wide for the 5x8 font with one font pixel of padding), and the
//! BT.601 limited-range YUV of a colour.

use std::sync::Once;

use gst::glib;
use gst::prelude::*;
use gst_video::{VideoFormat, VideoInfo, VideoRegionOfInterestMeta};

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().unwrap();
        gsteffdet::plugin_register_static().expect("registering the effdet plugin");
    });
}

const FORMATS: [VideoFormat; 7] = [
    VideoFormat::Rgb,
    VideoFormat::Rgba,
    VideoFormat::Rgbx,
    VideoFormat::Bgrx,
    VideoFormat::Bgra,
    VideoFormat::Nv12,
    VideoFormat::I420,
];

/// Frame contents before drawing: RGB formats hold this colour...
const BASE_RGB: [u8; 3] = [10, 20, 30];
/// ...with this alpha (RGBA, BGRA)...
const BASE_ALPHA: u8 = 77;
/// ...and this in the unused byte (RGBx, BGRx); YUV formats hold this Y, U, V.
const BASE_X: u8 = 0x5A;
const BASE_YUV: [u8; 3] = [50, 100, 150];
/// Every byte of a buffer that is not a pixel component (row padding, gaps between planes).
const PADDING: u8 = 0xAB;

const WHITE: [u8; 3] = [255, 255, 255];
const BLACK: [u8; 3] = [0, 0, 0];

fn is_yuv(format: VideoFormat) -> bool {
    matches!(format, VideoFormat::Nv12 | VideoFormat::I420)
}

/// BT.601 limited range, the 8-bit integer form documented by the element.
fn yuv(rgb: [u8; 3]) -> [u8; 3] {
    let [r, g, b] = rgb.map(i32::from);
    [
        (((66 * r + 129 * g + 25 * b + 128) >> 8) + 16) as u8,
        (((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128) as u8,
        (((112 * r - 94 * g - 18 * b + 128) >> 8) + 128) as u8,
    ]
}

fn class_colour(class_id: u32) -> [u8; 3] {
    effdet::image_io::class_colour(class_id)
}

// ---------------------------------------------------------------------------------------------
// Buffers
// ---------------------------------------------------------------------------------------------

/// Where a test frame's planes lie in its buffer.
#[derive(Clone, Debug)]
struct Layout {
    info: VideoInfo,
    offsets: Vec<usize>,
    strides: Vec<usize>,
    size: usize,
    /// Whether the buffer carries a `GstVideoMeta` describing a non-default layout.
    video_meta: bool,
}

/// Geometry of one component (R, G, B, A or Y, U, V).
struct Comp {
    plane: usize,
    poffset: usize,
    pstride: usize,
    w_sub: u32,
    h_sub: u32,
}

impl Layout {
    /// The default layout GStreamer gives this format and size (rows padded to 4 bytes).
    fn natural(format: VideoFormat, width: u32, height: u32) -> Layout {
        init();
        let info = VideoInfo::builder(format, width, height).build().unwrap();
        Layout {
            offsets: info.offset().to_vec(),
            strides: info.stride().iter().map(|s| *s as usize).collect(),
            size: info.size(),
            info,
            video_meta: false,
        }
    }

    /// Every row 13 bytes longer than natural, 7 bytes between planes and 5 after the last one,
    /// announced with a `GstVideoMeta`.
    fn padded(format: VideoFormat, width: u32, height: u32) -> Layout {
        let mut l = Layout::natural(format, width, height);
        let mut offset = 0;
        for p in 0..l.info.n_planes() as usize {
            l.strides[p] += 13;
            l.offsets[p] = offset;
            offset += l.strides[p] * l.plane_height(p) + 7;
        }
        l.size = offset + 5;
        l.video_meta = true;
        l
    }

    fn width(&self) -> i64 {
        self.info.width() as i64
    }

    fn height(&self) -> i64 {
        self.info.height() as i64
    }

    fn format(&self) -> VideoFormat {
        self.info.format()
    }

    fn plane_height(&self, plane: usize) -> usize {
        let h = self.info.height() as usize;
        if plane == 0 { h } else { h.div_ceil(2) }
    }

    fn n_comps(&self) -> usize {
        self.info.format_info().n_components() as usize
    }

    fn comp(&self, c: usize) -> Comp {
        let f = self.info.format_info();
        Comp {
            plane: f.plane()[c] as usize,
            poffset: f.poffset()[c] as usize,
            pstride: f.pixel_stride()[c] as usize,
            w_sub: f.w_sub()[c],
            h_sub: f.h_sub()[c],
        }
    }

    fn comp_size(&self, c: usize) -> (usize, usize) {
        let comp = self.comp(c);
        let w = (self.info.width() as usize).div_ceil(1 << comp.w_sub);
        let h = (self.info.height() as usize).div_ceil(1 << comp.h_sub);
        (w, h)
    }

    /// Byte index of component `c`'s sample (`x`, `y`) in component coordinates.
    fn index(&self, c: usize, x: usize, y: usize) -> usize {
        let comp = self.comp(c);
        self.offsets[comp.plane] + y * self.strides[comp.plane] + x * comp.pstride + comp.poffset
    }

    /// Byte index of the first byte of packed pixel (`x`, `y`) (RGB formats).
    fn pixel_index(&self, x: usize, y: usize) -> usize {
        self.offsets[0] + y * self.strides[0] + x * self.comp(0).pstride
    }

    /// Which bytes of the buffer are pixel components, the only bytes the element may write.
    fn component_bytes(&self) -> Vec<bool> {
        let mut mask = vec![false; self.size];
        for c in 0..self.n_comps() {
            let (w, h) = self.comp_size(c);
            for y in 0..h {
                for x in 0..w {
                    mask[self.index(c, x, y)] = true;
                }
            }
        }
        mask
    }

    /// A buffer of the base colour in this layout, padding bytes set to `PADDING`.
    fn buffer(&self) -> gst::Buffer {
        let mut bytes = vec![PADDING; self.size];
        if is_yuv(self.format()) {
            for (c, value) in BASE_YUV.iter().enumerate() {
                let (w, h) = self.comp_size(c);
                for y in 0..h {
                    for x in 0..w {
                        bytes[self.index(c, x, y)] = *value;
                    }
                }
            }
        } else {
            let pstride = self.comp(0).pstride;
            for y in 0..self.info.height() as usize {
                for x in 0..self.info.width() as usize {
                    let i = self.pixel_index(x, y);
                    bytes[i..i + pstride].fill(BASE_X);
                    for (c, value) in BASE_RGB.iter().enumerate() {
                        bytes[self.index(c, x, y)] = *value;
                    }
                    if self.n_comps() == 4 {
                        bytes[self.index(3, x, y)] = BASE_ALPHA;
                    }
                }
            }
        }
        let mut buffer = gst::Buffer::from_mut_slice(bytes);
        if self.video_meta {
            let strides: Vec<i32> = self.strides.iter().map(|s| *s as i32).collect();
            gst_video::VideoMeta::add_full(
                buffer.get_mut().unwrap(),
                gst_video::VideoFrameFlags::empty(),
                self.format(),
                self.info.width(),
                self.info.height(),
                &self.offsets,
                &strides,
            )
            .unwrap();
        }
        buffer
    }

    fn caps(&self) -> String {
        format!(
            "video/x-raw,format={},width={},height={},framerate=30/1",
            self.format().to_str(),
            self.info.width(),
            self.info.height()
        )
    }
}

fn bytes_of(buffer: &gst::Buffer) -> Vec<u8> {
    buffer.map_readable().unwrap().as_slice().to_vec()
}

/// A detection as `effdet` would produce it.
fn det(
    class_id: u32,
    label: &str,
    score: f32,
    x1: f32,
    y1: f32,
    x2: f32,
    y2: f32,
) -> effdet::Detection {
    effdet::Detection {
        x1,
        y1,
        x2,
        y2,
        score,
        class_id,
        label: label.to_string(),
    }
}

/// An `effdetoverlay` harness negotiated for `layout`, with `props` set.
fn harness(layout: &Layout, props: &[(&str, glib::Value)]) -> gst_check::Harness {
    init();
    let mut h = gst_check::Harness::new("effdetoverlay");
    let element = h.element().unwrap();
    for (name, value) in props {
        element.set_property_from_value(name, value);
    }
    h.set_src_caps_str(&layout.caps());
    h.play();
    h
}

/// Pushes a base-colour frame in `layout` with `dets` attached (plus `extra` for other metas)
/// through `h`; returns the bytes before and after.
fn push(
    h: &mut gst_check::Harness,
    layout: &Layout,
    dets: &[effdet::Detection],
    extra: impl FnOnce(&mut gst::BufferRef),
) -> (Vec<u8>, Vec<u8>) {
    let mut buffer = layout.buffer();
    let before = bytes_of(&buffer);
    {
        let b = buffer.get_mut().unwrap();
        for d in dets {
            gsteffdet::meta::attach(b, d, layout.info.width(), layout.info.height());
        }
        extra(b);
    }
    let out = h.push_and_pull(buffer).unwrap();
    let after = bytes_of(&out);
    assert_eq!(after.len(), before.len());
    (before, after)
}

fn run(
    layout: &Layout,
    props: &[(&str, glib::Value)],
    dets: &[effdet::Detection],
) -> (Vec<u8>, Vec<u8>) {
    let mut h = harness(layout, props);
    push(&mut h, layout, dets, |_| {})
}

// ---------------------------------------------------------------------------------------------
// Expected pictures
// ---------------------------------------------------------------------------------------------

/// What one pixel should be after drawing.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    /// Unchanged.
    Base,
    /// A box outline in this colour.
    Line([u8; 3]),
    /// A label bar: either the bar colour or the text colour.
    Bar { bg: [u8; 3], text: [u8; 3] },
}

/// A half-open pixel rectangle.
#[derive(Clone, Copy, Debug)]
struct R {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
}

impl R {
    fn contains(&self, x: i64, y: i64) -> bool {
        x >= self.x0 && x < self.x1 && y >= self.y0 && y < self.y1
    }
}

/// Whether (`x`, `y`) is on the outline of `b` drawn `lw` pixels thick inside the box.
fn on_outline(b: R, lw: i64, x: i64, y: i64) -> bool {
    b.contains(x, y) && (x < b.x0 + lw || x >= b.x1 - lw || y < b.y0 + lw || y >= b.y1 - lw)
}

/// The label bar for `text` at `scale` over box `b`, when the box has room above it and the bar
/// fits horizontally.
fn bar_above(b: R, text: &str, scale: i64) -> R {
    let (w, h) = bar_size(text, scale);
    R {
        x0: b.x0,
        y0: b.y0 - h,
        x1: b.x0 + w,
        y1: b.y0,
    }
}

fn bar_size(text: &str, scale: i64) -> (i64, i64) {
    let n = text.chars().count() as i64;
    ((6 * n - 1 + 2) * scale, 10 * scale)
}

/// Counts of what was found where a label bar was wanted.
#[derive(Debug, Default)]
struct Found {
    bar_pixels: usize,
    text_pixels: usize,
}

/// Checks every byte of `after`: non-component bytes are as `before`, each pixel as `want`
/// says. For YUV, a chroma sample must be the base chroma when all its pixels are `Base`, the
/// line's chroma when any is `Line` (and none is `Bar`), and the bar's or neutral chroma when
/// any is `Bar`.
fn check(layout: &Layout, before: &[u8], after: &[u8], want: impl Fn(i64, i64) -> Want) -> Found {
    let what = format!(
        "{} {}x{}{}",
        layout.format().to_str(),
        layout.width(),
        layout.height(),
        if layout.video_meta {
            " (padded strides)"
        } else {
            ""
        }
    );
    let mask = layout.component_bytes();
    for (i, is_comp) in mask.iter().enumerate() {
        if !is_comp {
            assert_eq!(after[i], before[i], "{what}: non-pixel byte {i} changed");
        }
    }

    let mut found = Found::default();
    let (w, h) = (layout.width(), layout.height());
    if is_yuv(layout.format()) {
        for y in 0..h {
            for x in 0..w {
                let got = after[layout.index(0, x as usize, y as usize)];
                match want(x, y) {
                    Want::Base => assert_eq!(got, BASE_YUV[0], "{what}: Y at ({x}, {y})"),
                    Want::Line(c) => assert_eq!(got, yuv(c)[0], "{what}: line Y at ({x}, {y})"),
                    Want::Bar { bg, text } => {
                        found.bar_pixels += 1;
                        if got == yuv(text)[0] && yuv(text)[0] != yuv(bg)[0] {
                            found.text_pixels += 1;
                        } else {
                            assert_eq!(got, yuv(bg)[0], "{what}: bar Y at ({x}, {y})");
                        }
                    }
                }
            }
        }
        let (cw, ch) = layout.comp_size(1);
        for cy in 0..ch as i64 {
            for cx in 0..cw as i64 {
                let got = [1, 2].map(|c| after[layout.index(c, cx as usize, cy as usize)]);
                let wants: Vec<Want> = [(0, 0), (1, 0), (0, 1), (1, 1)]
                    .iter()
                    .map(|(dx, dy)| (2 * cx + dx, 2 * cy + dy))
                    .filter(|(x, y)| *x < w && *y < h)
                    .map(|(x, y)| want(x, y))
                    .collect();
                let bar = wants.iter().find_map(|w| match w {
                    Want::Bar { bg, .. } => Some(*bg),
                    _ => None,
                });
                let line = wants.iter().find_map(|w| match w {
                    Want::Line(c) => Some(*c),
                    _ => None,
                });
                let at = format!("{what}: chroma sample ({cx}, {cy}), wanted {wants:?}");
                match (bar, line) {
                    (Some(bg), _) => {
                        let bg = [yuv(bg)[1], yuv(bg)[2]];
                        assert!(got == bg || got == [128, 128], "{at}: got {got:?}");
                    }
                    (None, Some(c)) => assert_eq!(got, [yuv(c)[1], yuv(c)[2]], "{at}"),
                    (None, None) => assert_eq!(got, [BASE_YUV[1], BASE_YUV[2]], "{at}"),
                }
            }
        }
    } else {
        let alpha = layout.n_comps() == 4;
        for y in 0..h {
            for x in 0..w {
                let rgb = [0, 1, 2].map(|c| after[layout.index(c, x as usize, y as usize)]);
                let a = alpha.then(|| after[layout.index(3, x as usize, y as usize)]);
                let at = format!("{what}: pixel ({x}, {y})");
                match want(x, y) {
                    Want::Base => {
                        let i = layout.pixel_index(x as usize, y as usize);
                        let n = layout.comp(0).pstride;
                        assert_eq!(after[i..i + n], before[i..i + n], "{at}");
                    }
                    Want::Line(c) => {
                        assert_eq!(rgb, c, "{at}");
                        assert!(a.is_none_or(|a| a == 255), "{at}: alpha {a:?}");
                    }
                    Want::Bar { bg, text } => {
                        found.bar_pixels += 1;
                        if rgb == text {
                            found.text_pixels += 1;
                        } else {
                            assert_eq!(rgb, bg, "{at}: in the label bar");
                        }
                        assert!(a.is_none_or(|a| a == 255), "{at}: alpha {a:?}");
                    }
                }
            }
        }
    }
    found
}

/// The layouts each drawing test runs on: natural strides (padded rows for odd widths) and
/// explicitly padded strides with gaps between planes.
fn layouts(width: u32, height: u32) -> Vec<Layout> {
    FORMATS
        .iter()
        .flat_map(|f| {
            [
                Layout::natural(*f, width, height),
                Layout::padded(*f, width, height),
            ]
        })
        .collect()
}

fn no_labels() -> Vec<(&'static str, glib::Value)> {
    vec![("show-labels", false.to_value())]
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn element_is_documented_with_its_properties() {
    init();
    let factory = gst::ElementFactory::find("effdetoverlay").unwrap();
    assert_eq!(factory.rank(), gst::Rank::NONE);
    assert_eq!(
        factory.metadata(gst::ELEMENT_METADATA_KLASS),
        Some("Filter/Effect/Video")
    );
    let element = factory.create().build().unwrap();
    let uint = |name: &str| {
        let p = element.find_property(name).unwrap();
        let p = p.downcast::<glib::ParamSpecUInt>().unwrap();
        (p.minimum(), p.maximum(), p.default_value())
    };
    assert_eq!(uint("line-width"), (1, 64, 3));
    assert_eq!(uint("text-scale"), (1, 16, 2));
    for (name, default) in [("show-confidence", true), ("show-labels", true)] {
        let p = element.find_property(name).unwrap();
        let p = p.downcast::<glib::ParamSpecBoolean>().unwrap();
        assert_eq!(p.default_value(), default, "{name}");
    }
    for name in ["line-width", "text-scale", "show-confidence", "show-labels"] {
        let p = element.find_property(name).unwrap();
        assert!(
            !p.blurb().unwrap_or_default().is_empty(),
            "{name} has a blurb"
        );
        assert!(p.nick() != name, "{name} has a nick");
        assert!(
            p.flags().contains(gst::PARAM_FLAG_MUTABLE_PLAYING),
            "{name} is mutable while playing"
        );
    }
}

#[test]
fn frames_without_metas_pass_byte_identical() {
    for (w, h) in [(64, 48), (37, 29), (5, 3), (1, 1)] {
        for layout in layouts(w, h) {
            let (before, after) = run(&layout, &[], &[]);
            assert_eq!(before, after, "{layout:?}");
        }
    }
}

#[test]
fn outlines_are_drawn_in_the_class_colour_and_nothing_else_changes() {
    // Odd corners on purpose: the outline's chroma samples straddle line and background.
    let a = R {
        x0: 7,
        y0: 9,
        x1: 31,
        y1: 27,
    };
    let b = R {
        x0: 40,
        y0: 30,
        x1: 61,
        y1: 45,
    };
    for (w, h) in [(64, 48), (63, 47)] {
        for layout in layouts(w, h) {
            let dets = [
                det(1, "person", 0.87, 7.0, 9.0, 31.0, 27.0),
                det(3, "car", 0.5, 40.0, 30.0, 61.0, 45.0),
            ];
            let (before, after) = run(&layout, &no_labels(), &dets);
            check(&layout, &before, &after, |x, y| {
                if on_outline(a, 3, x, y) {
                    Want::Line(class_colour(1))
                } else if on_outline(b, 3, x, y) {
                    Want::Line(class_colour(3))
                } else {
                    Want::Base
                }
            });
        }
    }
}

#[test]
fn line_width_sets_the_outline_thickness() {
    let b = R {
        x0: 10,
        y0: 8,
        x1: 50,
        y1: 40,
    };
    for lw in [1u32, 2, 5, 64] {
        for layout in [
            Layout::natural(VideoFormat::Rgb, 64, 48),
            Layout::natural(VideoFormat::I420, 64, 48),
        ] {
            let mut props = no_labels();
            props.push(("line-width", lw.to_value()));
            let dets = [det(5, "airplane", 0.9, 10.0, 8.0, 50.0, 40.0)];
            let (before, after) = run(&layout, &props, &dets);
            check(&layout, &before, &after, |x, y| {
                if on_outline(b, lw as i64, x, y) {
                    Want::Line(class_colour(5))
                } else {
                    Want::Base
                }
            });
        }
    }
}

#[test]
fn label_bar_sits_above_the_box_with_contrasting_text() {
    // Class 1 is a dark blue (white text), class 2 a light yellow-green (black text).
    for (class_id, text_colour) in [(1, WHITE), (2, BLACK)] {
        for layout in layouts(160, 100) {
            let b = R {
                x0: 10,
                y0: 40,
                x1: 90,
                y1: 90,
            };
            let dets = [det(class_id, "person", 0.87, 10.0, 40.0, 90.0, 90.0)];
            let (before, after) = run(&layout, &[], &dets);
            let bar = bar_above(b, "person 0.87", 2);
            let colour = class_colour(class_id);
            let found = check(&layout, &before, &after, |x, y| {
                if bar.contains(x, y) {
                    Want::Bar {
                        bg: colour,
                        text: text_colour,
                    }
                } else if on_outline(b, 3, x, y) {
                    Want::Line(colour)
                } else {
                    Want::Base
                }
            });
            assert_eq!(found.bar_pixels, (bar.x1 - bar.x0) as usize * 20);
            assert!(
                found.text_pixels > 200,
                "{:?}: text drawn in {text_colour:?}: {found:?}",
                layout.format()
            );
        }
    }
}

#[test]
fn show_labels_false_draws_no_bar() {
    for layout in layouts(160, 100) {
        let b = R {
            x0: 10,
            y0: 40,
            x1: 90,
            y1: 90,
        };
        let dets = [det(1, "person", 0.87, 10.0, 40.0, 90.0, 90.0)];
        let (before, after) = run(&layout, &no_labels(), &dets);
        // The whole region where the bar would be is untouched.
        check(&layout, &before, &after, |x, y| {
            if on_outline(b, 3, x, y) {
                Want::Line(class_colour(1))
            } else {
                Want::Base
            }
        });
    }
}

#[test]
fn show_confidence_false_shortens_the_label_to_the_class_name() {
    for layout in [
        Layout::natural(VideoFormat::Bgrx, 160, 100),
        Layout::natural(VideoFormat::Nv12, 160, 100),
    ] {
        let b = R {
            x0: 10,
            y0: 40,
            x1: 90,
            y1: 90,
        };
        let dets = [det(1, "person", 0.87, 10.0, 40.0, 90.0, 90.0)];
        let props = [("show-confidence", false.to_value())];
        let (before, after) = run(&layout, &props, &dets);
        let bar = bar_above(b, "person", 2);
        let found = check(&layout, &before, &after, |x, y| {
            if bar.contains(x, y) {
                Want::Bar {
                    bg: class_colour(1),
                    text: WHITE,
                }
            } else if on_outline(b, 3, x, y) {
                Want::Line(class_colour(1))
            } else {
                Want::Base
            }
        });
        assert!(found.text_pixels > 100, "{found:?}");
    }
}

#[test]
fn text_scale_sets_the_bar_size() {
    for scale in [1u32, 3] {
        let layout = Layout::natural(VideoFormat::Rgba, 200, 120);
        let b = R {
            x0: 20,
            y0: 50,
            x1: 100,
            y1: 110,
        };
        let dets = [det(2, "dog", 0.5, 20.0, 50.0, 100.0, 110.0)];
        let props = [("text-scale", scale.to_value())];
        let (before, after) = run(&layout, &props, &dets);
        let bar = bar_above(b, "dog 0.50", scale as i64);
        let found = check(&layout, &before, &after, |x, y| {
            if bar.contains(x, y) {
                Want::Bar {
                    bg: class_colour(2),
                    text: BLACK,
                }
            } else if on_outline(b, 3, x, y) {
                Want::Line(class_colour(2))
            } else {
                Want::Base
            }
        });
        assert!(found.text_pixels > 0, "{found:?}");
    }
}

#[test]
fn label_moves_inside_the_box_when_there_is_no_room_above() {
    for layout in layouts(120, 80) {
        // Box at the very top: the bar covers the top of the box.
        let b = R {
            x0: 4,
            y0: 0,
            x1: 100,
            y1: 60,
        };
        let dets = [det(1, "cat", 0.25, 4.0, 0.0, 100.0, 60.0)];
        let (before, after) = run(&layout, &[], &dets);
        let (bw, bh) = bar_size("cat 0.25", 2);
        let bar = R {
            x0: 4,
            y0: 0,
            x1: 4 + bw,
            y1: bh,
        };
        let found = check(&layout, &before, &after, |x, y| {
            if bar.contains(x, y) {
                Want::Bar {
                    bg: class_colour(1),
                    text: WHITE,
                }
            } else if on_outline(b, 3, x, y) {
                Want::Line(class_colour(1))
            } else {
                Want::Base
            }
        });
        assert!(found.text_pixels > 0);
    }
}

#[test]
fn label_stays_inside_the_frame_at_the_right_edge() {
    let layout = Layout::natural(VideoFormat::Rgb, 100, 60);
    let b = R {
        x0: 80,
        y0: 30,
        x1: 98,
        y1: 50,
    };
    let dets = [det(1, "person", 0.87, 80.0, 30.0, 98.0, 50.0)];
    let (before, after) = run(&layout, &[("text-scale", 1u32.to_value())], &dets);
    let (bw, bh) = bar_size("person 0.87", 1);
    let bar = R {
        x0: 100 - bw,
        y0: 30 - bh,
        x1: 100,
        y1: 30,
    };
    check(&layout, &before, &after, |x, y| {
        if bar.contains(x, y) {
            Want::Bar {
                bg: class_colour(1),
                text: WHITE,
            }
        } else if on_outline(b, 3, x, y) {
            Want::Line(class_colour(1))
        } else {
            Want::Base
        }
    });
}

#[test]
fn boxes_partly_outside_the_frame_draw_only_their_inside_part() {
    // One box over the top-left corner, one past the bottom-right corner.
    let a = R {
        x0: -20,
        y0: -10,
        x1: 30,
        y1: 25,
    };
    let b = R {
        x0: 50,
        y0: 30,
        x1: 200,
        y1: 200,
    };
    for (w, h) in [(64, 48), (63, 47)] {
        for layout in layouts(w, h) {
            let dets = [
                det(1, "person", 0.9, -20.0, -10.0, 30.0, 25.0),
                det(4, "motorcycle", 0.8, 50.0, 30.0, 200.0, 200.0),
            ];
            let (before, after) = run(&layout, &no_labels(), &dets);
            check(&layout, &before, &after, |x, y| {
                if on_outline(a, 3, x, y) {
                    Want::Line(class_colour(1))
                } else if on_outline(b, 3, x, y) {
                    Want::Line(class_colour(4))
                } else {
                    Want::Base
                }
            });
        }
    }
}

#[test]
fn invisible_degenerate_and_absurd_boxes_change_nothing() {
    let dets = [
        // Wholly outside, on every side.
        det(1, "a", 0.5, 100.0, 10.0, 150.0, 20.0),
        det(1, "b", 0.5, -50.0, 10.0, -1.0, 20.0),
        det(1, "c", 0.5, 10.0, -50.0, 20.0, 0.0),
        det(1, "d", 0.5, 10.0, 48.0, 20.0, 90.0),
        // Zero area.
        det(1, "e", 0.5, 10.0, 10.0, 10.0, 30.0),
        det(1, "f", 0.5, 10.0, 10.0, 10.0, 10.0),
        // Not numbers.
        det(1, "g", f32::NAN, f32::NAN, 1.0, 20.0, 20.0),
        det(1, "h", 0.5, 1.0, 1.0, f32::INFINITY, 20.0),
        det(1, "i", 0.5, f32::NEG_INFINITY, f32::NEG_INFINITY, 5.0, 5.0),
        // Far away.
        det(1, "j", 0.5, 1e30, 1e30, f32::MAX, f32::MAX),
        det(1, "k", 0.5, f32::MIN, f32::MIN, -1e30, -1e30),
    ];
    for layout in layouts(64, 48) {
        let (before, after) = run(&layout, &[], &dets);
        assert_eq!(before, after, "{:?}", layout.format());
    }
}

#[test]
fn a_box_around_the_whole_frame_draws_only_its_label() {
    for layout in layouts(64, 48) {
        let dets = [det(1, "x", 0.5, -1e30, -1e30, 1e30, 1e30)];
        let (before, after) = run(&layout, &no_labels(), &dets);
        assert_eq!(before, after, "{:?}: outline is off-frame", layout.format());

        let (before, after) = run(&layout, &[("text-scale", 1u32.to_value())], &dets);
        let (bw, bh) = bar_size("x 0.50", 1);
        let bar = R {
            x0: 0,
            y0: 0,
            x1: bw,
            y1: bh,
        };
        check(&layout, &before, &after, |x, y| {
            if bar.contains(x, y) {
                Want::Bar {
                    bg: class_colour(1),
                    text: WHITE,
                }
            } else {
                Want::Base
            }
        });
    }
}

#[test]
fn roi_metas_from_other_elements_are_drawn_with_their_type_as_label() {
    for layout in layouts(96, 64) {
        let mut h = harness(&layout, &no_labels());
        let (before, after) = push(&mut h, &layout, &[], |b| {
            VideoRegionOfInterestMeta::add(b, "face", (10, 12, 20, 16));
        });
        let b = R {
            x0: 10,
            y0: 12,
            x1: 30,
            y1: 28,
        };
        // The colour is a hash of the label: read it off the top-left corner, then check the
        // whole outline has it.
        let colour = if is_yuv(layout.format()) {
            let y = after[layout.index(0, 10, 12)];
            assert_ne!(y, BASE_YUV[0]);
            None
        } else {
            let c = [0, 1, 2].map(|c| after[layout.index(c, 10, 12)]);
            assert_ne!(c, BASE_RGB);
            Some(c)
        };
        if let Some(colour) = colour {
            check(&layout, &before, &after, |x, y| {
                if on_outline(b, 3, x, y) {
                    Want::Line(colour)
                } else {
                    Want::Base
                }
            });
        } else {
            // YUV: every outline luma sample equals the corner's, nothing outside changed.
            let corner = after[layout.index(0, 10, 12)];
            for y in 0..layout.height() {
                for x in 0..layout.width() {
                    let got = after[layout.index(0, x as usize, y as usize)];
                    let want = if on_outline(b, 3, x, y) {
                        corner
                    } else {
                        BASE_YUV[0]
                    };
                    assert_eq!(got, want, "({x}, {y})");
                }
            }
        }
    }

    // With labels: the bar reads the type alone (no confidence), in the same colour.
    let layout = Layout::natural(VideoFormat::Rgb, 96, 64);
    let mut h = harness(&layout, &[]);
    let (before, after) = push(&mut h, &layout, &[], |b| {
        VideoRegionOfInterestMeta::add(b, "face", (10, 30, 20, 16));
    });
    let colour = [0, 1, 2].map(|c| after[layout.index(c, 10, 40)]);
    let b = R {
        x0: 10,
        y0: 30,
        x1: 30,
        y1: 46,
    };
    let bar = bar_above(b, "face", 2);
    let text = if after.chunks(3).any(|p| p == BLACK) {
        BLACK
    } else {
        WHITE
    };
    let found = check(&layout, &before, &after, |x, y| {
        if bar.contains(x, y) {
            Want::Bar { bg: colour, text }
        } else if on_outline(b, 3, x, y) {
            Want::Line(colour)
        } else {
            Want::Base
        }
    });
    assert!(found.text_pixels > 0);
}

#[test]
fn tiny_frames_and_huge_settings_do_not_panic() {
    let props = [
        ("line-width", 64u32.to_value()),
        ("text-scale", 16u32.to_value()),
    ];
    for (w, h) in [(1, 1), (2, 1), (1, 2), (3, 3), (2, 2)] {
        for layout in layouts(w, h) {
            let dets = [
                det(1, "person", 0.9, 0.0, 0.0, w as f32, h as f32),
                det(2, "bicycle", 0.1, -5.0, -5.0, 50.0, 50.0),
                det(3, "", 0.3, 0.5, 0.5, 0.7, 0.7),
            ];
            let (before, after) = run(&layout, &props, &dets);
            assert_ne!(before, after, "{layout:?}");
            // Bars and boxes cover every pixel; padding bytes are untouched.
            let mask = layout.component_bytes();
            for (i, is_comp) in mask.iter().enumerate() {
                if !is_comp {
                    assert_eq!(before[i], after[i], "{layout:?} byte {i}");
                }
            }
        }
    }
}

#[test]
fn full_hd_odd_size_with_padded_strides() {
    for format in [VideoFormat::Nv12, VideoFormat::I420, VideoFormat::Bgra] {
        let layout = Layout::padded(format, 1919, 1079);
        let a = R {
            x0: 101,
            y0: 301,
            x1: 1919,
            y1: 1079,
        };
        let dets = [det(7, "train", 0.99, 101.0, 301.0, 1919.0, 1079.0)];
        let (before, after) = run(&layout, &[("line-width", 5u32.to_value())], &dets);
        let bar = bar_above(a, "train 0.99", 2);
        let text = if draw_text_is_black(class_colour(7)) {
            BLACK
        } else {
            WHITE
        };
        let found = check(&layout, &before, &after, |x, y| {
            if bar.contains(x, y) {
                Want::Bar {
                    bg: class_colour(7),
                    text,
                }
            } else if on_outline(a, 5, x, y) {
                Want::Line(class_colour(7))
            } else {
                Want::Base
            }
        });
        assert!(found.text_pixels > 0, "{format:?}: {found:?}");
    }
}

/// WCAG: black text when it contrasts more than white.
fn draw_text_is_black(bg: [u8; 3]) -> bool {
    let lin = |c: u8| {
        let c = c as f64 / 255.0;
        if c <= 0.04045 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    let l = 0.2126 * lin(bg[0]) + 0.7152 * lin(bg[1]) + 0.0722 * lin(bg[2]);
    (l + 0.05) / 0.05 >= 1.05 / (l + 0.05)
}

#[test]
fn property_changes_while_playing_take_effect() {
    let layout = Layout::natural(VideoFormat::Rgbx, 160, 100);
    let mut h = harness(&layout, &[]);
    let element = h.element().unwrap();
    assert_eq!(element.current_state(), gst::State::Playing);
    let b = R {
        x0: 10,
        y0: 40,
        x1: 90,
        y1: 90,
    };
    let dets = [det(1, "person", 0.87, 10.0, 40.0, 90.0, 90.0)];
    let colour = class_colour(1);
    let expect = |before: &[u8], after: &[u8], lw: i64, bar: Option<R>| {
        check(&layout, before, after, |x, y| {
            if bar.is_some_and(|bar| bar.contains(x, y)) {
                Want::Bar {
                    bg: colour,
                    text: WHITE,
                }
            } else if on_outline(b, lw, x, y) {
                Want::Line(colour)
            } else {
                Want::Base
            }
        })
    };

    let (before, after) = push(&mut h, &layout, &dets, |_| {});
    expect(&before, &after, 3, Some(bar_above(b, "person 0.87", 2)));

    element.set_property("line-width", 7u32);
    let (before, after) = push(&mut h, &layout, &dets, |_| {});
    expect(&before, &after, 7, Some(bar_above(b, "person 0.87", 2)));

    element.set_property("show-confidence", false);
    element.set_property("text-scale", 1u32);
    let (before, after) = push(&mut h, &layout, &dets, |_| {});
    expect(&before, &after, 7, Some(bar_above(b, "person", 1)));

    element.set_property("show-labels", false);
    let (before, after) = push(&mut h, &layout, &dets, |_| {});
    expect(&before, &after, 7, None);

    assert_eq!(element.property::<u32>("line-width"), 7);
    assert_eq!(element.property::<u32>("text-scale"), 1);
    assert!(!element.property::<bool>("show-confidence"));
    assert!(!element.property::<bool>("show-labels"));
}

#[test]
fn documented_yuv_matches_the_bt601_equations() {
    // The integer form used above is the BT.601 limited-range matrix to within rounding.
    for rgb in [
        [0, 0, 0],
        [255, 255, 255],
        [255, 0, 0],
        [0, 255, 0],
        [0, 0, 255],
        class_colour(1),
    ] {
        let [r, g, b] = rgb.map(f64::from);
        let y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0;
        let u = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0;
        let v = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0;
        let got = yuv(rgb);
        for (g, f) in got.iter().zip([y, u, v]) {
            assert!(
                (*g as f64 - f).abs() <= 1.0,
                "{rgb:?}: {got:?} vs {y} {u} {v}"
            );
        }
    }
}
