//! Rendering: procedural backgrounds, anti-aliased shapes, occlusion bookkeeping and the
//! ground-truth boxes of what stays visible.
//!
//! Coverage is computed per pixel as the exact horizontal overlap of the shape with the pixel,
//! averaged over [`SUBROWS`] horizontal lines per pixel row: analytic in x, supersampled in y.
//! The same coverage both blends the shape into the image and defines its ground truth, so a
//! box is exactly the set of pixels the shape visibly covers by more than half.

use crate::rng::Rng;

use super::ShapeKind;
use super::background::{Background, random_colour};

/// Horizontal sample lines per pixel row (coverage resolution in y is 1/SUBROWS).
const SUBROWS: usize = 8;

/// Objects that keep less than this fraction of their area visible are not annotated.
pub const MIN_VISIBLE_FRACTION: f64 = 0.25;

/// Objects whose visible box is narrower or lower than this (pixels) are not annotated.
pub const MIN_BOX_SIDE: u32 = 4;

/// When composing a random image, a new object is rejected (and placed elsewhere) if it would
/// leave an earlier one, or itself, less visible than this: every drawn object stays annotated.
const PLACEMENT_MIN_VISIBLE: f64 = 0.35;

/// A shape placed in pixel coordinates: the unit shape (inside `[-1, 1]^2`) is stretched by
/// `half_size`, rotated by `angle` (radians, clockwise on screen since y points down) and moved
/// to `center`.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapeSpec {
    pub kind: ShapeKind,
    /// Centre in pixels (pixel `(x, y)` spans `[x, x + 1) x [y, y + 1)`).
    pub center: [f64; 2],
    /// Half extents along the shape's own axes before rotation.
    pub half_size: [f64; 2],
    pub angle: f64,
    /// Fill colour, RGB in `0..=255`.
    pub colour: [f32; 3],
    /// Brightness ramp along the shape's own x axis: the colour is scaled by `1 + shading * u`
    /// for `u` in `[-1, 1]` (0 = flat fill).
    pub shading: f32,
}

/// Post-processing applied to a whole image after the shapes are drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Effects {
    /// A 3x3 binomial blur (about one pixel of softening).
    pub blur: bool,
    /// Standard deviation of additive per-channel noise, in 0..255 units (0 = none).
    pub noise_sigma: f32,
}

/// One annotated object of a rendered image.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthObject {
    pub kind: ShapeKind,
    /// Tight box of the pixels where the object is visible (visible coverage > 0.5), as
    /// `[x, y, w, h]` in whole pixels: the COCO `bbox`.
    pub bbox: [u32; 4],
    /// Tight box of the pixels the object would cover (> 0.5) with nothing in front of it,
    /// clipped to the image. Differs from `bbox` when the object is partly occluded.
    pub full_bbox: [u32; 4],
    /// Visible area in pixels (sum of visible coverage): the COCO `area`.
    pub visible_area: f64,
    /// Visible area over the shape's whole analytic area (parts outside the image count as
    /// hidden).
    pub visible_fraction: f64,
}

impl SynthObject {
    /// The category id of the object (1-based).
    pub fn class_id(&self) -> u32 {
        self.kind.class_id()
    }

    /// The box is "tiny": its longer side is at most 12 pixels.
    pub fn is_tiny(&self) -> bool {
        self.bbox[2].max(self.bbox[3]) <= 12
    }

    /// Part of the object is hidden behind later objects (its visible box is smaller than
    /// its unoccluded box).
    pub fn is_occluded(&self) -> bool {
        self.bbox != self.full_bbox
    }
}

/// A rendered image and its ground truth.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthImage {
    pub width: usize,
    pub height: usize,
    /// Tightly packed RGB8, row-major.
    pub rgb: Vec<u8>,
    /// Annotated objects, in drawing order (back to front).
    pub objects: Vec<SynthObject>,
    /// Objects drawn but not annotated (too hidden or too small; see [`MIN_VISIBLE_FRACTION`],
    /// [`MIN_BOX_SIDE`]).
    pub dropped: usize,
}

// ---------------------------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------------------------

/// The unit polygon of a polygonal class (vertices inside `[-1, 1]^2`, y down).
fn unit_polygon(kind: ShapeKind) -> Vec<[f64; 2]> {
    use std::f64::consts::{FRAC_PI_2, PI};
    let ring = |n: usize, radius: &dyn Fn(usize) -> f64, start: f64| -> Vec<[f64; 2]> {
        (0..n)
            .map(|i| {
                let a = start + 2.0 * PI * i as f64 / n as f64;
                [radius(i) * a.cos(), radius(i) * a.sin()]
            })
            .collect()
    };
    match kind {
        ShapeKind::Square => vec![[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]],
        ShapeKind::Triangle => ring(3, &|_| 1.0, -FRAC_PI_2),
        ShapeKind::Hexagon => ring(6, &|_| 1.0, 0.0),
        ShapeKind::Star => ring(10, &|i| if i % 2 == 0 { 1.0 } else { 0.48 }, -FRAC_PI_2),
        ShapeKind::Cross => {
            let t = 0.34;
            vec![
                [-t, -1.0],
                [t, -1.0],
                [t, -t],
                [1.0, -t],
                [1.0, t],
                [t, t],
                [t, 1.0],
                [-t, 1.0],
                [-t, t],
                [-1.0, t],
                [-1.0, -t],
                [-t, -t],
            ]
        }
        // Not a polygon; `Geometry::new` handles it.
        ShapeKind::Circle => Vec::new(),
    }
}

/// A shape in pixel space, ready to be scanned.
#[derive(Clone, Debug)]
enum Geometry {
    Ellipse {
        c: [f64; 2],
        a: f64,
        b: f64,
        cos: f64,
        sin: f64,
    },
    Polygon(Vec<[f64; 2]>),
}

impl Geometry {
    fn new(s: &ShapeSpec) -> Self {
        let (sin, cos) = s.angle.sin_cos();
        let [sx, sy] = s.half_size;
        if s.kind == ShapeKind::Circle {
            return Geometry::Ellipse {
                c: s.center,
                a: sx,
                b: sy,
                cos,
                sin,
            };
        }
        let pts = unit_polygon(s.kind)
            .into_iter()
            .map(|[u, v]| {
                let (u, v) = (u * sx, v * sy);
                [
                    s.center[0] + cos * u - sin * v,
                    s.center[1] + sin * u + cos * v,
                ]
            })
            .collect();
        Geometry::Polygon(pts)
    }

    /// `[x_min, y_min, x_max, y_max]` of the shape.
    fn bounds(&self) -> [f64; 4] {
        match self {
            Geometry::Ellipse { c, a, b, cos, sin } => {
                let hw = (a * a * cos * cos + b * b * sin * sin).sqrt();
                let hh = (a * a * sin * sin + b * b * cos * cos).sqrt();
                [c[0] - hw, c[1] - hh, c[0] + hw, c[1] + hh]
            }
            Geometry::Polygon(p) => p.iter().fold(
                [
                    f64::INFINITY,
                    f64::INFINITY,
                    f64::NEG_INFINITY,
                    f64::NEG_INFINITY,
                ],
                |[x0, y0, x1, y1], [x, y]| [x0.min(*x), y0.min(*y), x1.max(*x), y1.max(*y)],
            ),
        }
    }

    /// Exact area in square pixels.
    fn area(&self) -> f64 {
        match self {
            Geometry::Ellipse { a, b, .. } => std::f64::consts::PI * a * b,
            Geometry::Polygon(p) => {
                let n = p.len();
                let twice: f64 = (0..n)
                    .map(|i| {
                        let (q, r) = (p[i], p[(i + 1) % n]);
                        q[0] * r[1] - r[0] * q[1]
                    })
                    .sum();
                twice.abs() / 2.0
            }
        }
    }

    /// The x intervals where the horizontal line at `y` is inside the shape (even-odd rule),
    /// written to `spans` in increasing order.
    fn spans(&self, y: f64, xs: &mut Vec<f64>, spans: &mut Vec<(f64, f64)>) {
        spans.clear();
        match self {
            Geometry::Ellipse { c, a, b, cos, sin } => {
                // Local coordinates u = cos dx + sin dy, v = -sin dx + cos dy; inside when
                // (u / a)^2 + (v / b)^2 <= 1: a quadratic in dx.
                let dy = y - c[1];
                let (ia, ib) = (1.0 / (a * a), 1.0 / (b * b));
                let qa = cos * cos * ia + sin * sin * ib;
                let qb = 2.0 * sin * cos * dy * (ia - ib);
                let qc = dy * dy * (sin * sin * ia + cos * cos * ib) - 1.0;
                let disc = qb * qb - 4.0 * qa * qc;
                if disc > 0.0 {
                    let r = disc.sqrt();
                    spans.push((c[0] + (-qb - r) / (2.0 * qa), c[0] + (-qb + r) / (2.0 * qa)));
                }
            }
            Geometry::Polygon(p) => {
                xs.clear();
                let n = p.len();
                for i in 0..n {
                    let (q, r) = (p[i], p[(i + 1) % n]);
                    // Half-open rule: an edge counts when y lies in [min y, max y).
                    if (q[1] <= y) != (r[1] <= y) {
                        xs.push(q[0] + (y - q[1]) * (r[0] - q[0]) / (r[1] - q[1]));
                    }
                }
                xs.sort_by(f64::total_cmp);
                spans.extend(xs.chunks_exact(2).map(|w| (w[0], w[1])));
            }
        }
    }
}

/// Per-pixel coverage of one shape over a window of the image.
#[derive(Clone, Debug)]
struct Coverage {
    x0: usize,
    y0: usize,
    w: usize,
    h: usize,
    c: Vec<f32>,
}

impl Coverage {
    /// Coverage of `g` over the pixels of a `width x height` image its bounds touch; `None`
    /// when it misses the image.
    fn rasterize(g: &Geometry, width: usize, height: usize) -> Option<Self> {
        let [bx0, by0, bx1, by1] = g.bounds();
        if !(bx0.is_finite() && by0.is_finite() && bx1.is_finite() && by1.is_finite()) {
            return None;
        }
        let clampi = |v: f64, hi: usize| v.clamp(0.0, hi as f64) as usize;
        let (x0, x1) = (clampi(bx0.floor(), width), clampi(bx1.ceil(), width));
        let (y0, y1) = (clampi(by0.floor(), height), clampi(by1.ceil(), height));
        if x1 <= x0 || y1 <= y0 {
            return None;
        }
        let (w, h) = (x1 - x0, y1 - y0);
        let mut c = vec![0f32; w * h];
        let (mut xs, mut spans) = (Vec::new(), Vec::new());
        let weight = 1.0 / SUBROWS as f64;
        for row in 0..h {
            let line = &mut c[row * w..(row + 1) * w];
            for s in 0..SUBROWS {
                let y = (y0 + row) as f64 + (s as f64 + 0.5) * weight;
                g.spans(y, &mut xs, &mut spans);
                for &(a, b) in &spans {
                    let a = (a - x0 as f64).clamp(0.0, w as f64);
                    let b = (b - x0 as f64).clamp(0.0, w as f64);
                    add_interval(line, a, b, weight);
                }
            }
        }
        for v in &mut c {
            *v = v.min(1.0);
        }
        Some(Coverage { x0, y0, w, h, c })
    }

    /// Tight `[x, y, w, h]` box of the pixels where `values` (laid out like `self`) exceed 0.5.
    fn tight_box(&self, values: &[f32]) -> Option<[u32; 4]> {
        let (mut bx0, mut by0, mut bx1, mut by1) = (usize::MAX, usize::MAX, 0, 0);
        for row in 0..self.h {
            let line = &values[row * self.w..(row + 1) * self.w];
            let Some(first) = line.iter().position(|&v| v > 0.5) else {
                continue;
            };
            let last = line.iter().rposition(|&v| v > 0.5).unwrap_or(first);
            bx0 = bx0.min(first);
            bx1 = bx1.max(last + 1);
            by0 = by0.min(row);
            by1 = row + 1;
        }
        (bx1 > bx0).then(|| {
            [
                (self.x0 + bx0) as u32,
                (self.y0 + by0) as u32,
                (bx1 - bx0) as u32,
                (by1 - by0) as u32,
            ]
        })
    }

    /// The overlap of two windows as image rectangles `[x0, y0, x1, y1]`.
    fn overlap(&self, o: &Coverage) -> Option<[usize; 4]> {
        let x0 = self.x0.max(o.x0);
        let y0 = self.y0.max(o.y0);
        let x1 = (self.x0 + self.w).min(o.x0 + o.w);
        let y1 = (self.y0 + self.h).min(o.y0 + o.h);
        (x1 > x0 && y1 > y0).then_some([x0, y0, x1, y1])
    }
}

/// Adds `weight` times the overlap of `[a, b)` with each pixel `[i, i + 1)` of `line`.
fn add_interval(line: &mut [f32], a: f64, b: f64, weight: f64) {
    if b <= a {
        return;
    }
    let (ia, ib) = (a.floor() as usize, b.floor() as usize);
    if ia == ib {
        if let Some(v) = line.get_mut(ia) {
            *v += ((b - a) * weight) as f32;
        }
        return;
    }
    line[ia] += ((ia as f64 + 1.0 - a) * weight) as f32;
    for v in &mut line[ia + 1..ib] {
        *v += weight as f32;
    }
    if let Some(v) = line.get_mut(ib) {
        *v += ((b - ib as f64) * weight) as f32;
    }
}

// ---------------------------------------------------------------------------------------------
// Composition
// ---------------------------------------------------------------------------------------------

/// A shape drawn onto the canvas, with its coverage and what of it is still visible.
struct Placed {
    kind: ShapeKind,
    cov: Coverage,
    /// Visible coverage: `cov` times the transmittance of everything drawn over it.
    vis: Vec<f32>,
    area: f64,
}

impl Placed {
    /// Visible area and tight visible box, optionally as if `cover` were drawn on top.
    fn visibility(&self, cover: Option<&Coverage>) -> (f64, Option<[u32; 4]>) {
        let mut vis = std::borrow::Cow::Borrowed(&self.vis);
        if let Some(k) = cover
            && let Some([x0, y0, x1, y1]) = self.cov.overlap(k)
        {
            let v = vis.to_mut();
            for y in y0..y1 {
                for x in x0..x1 {
                    let i = (y - self.cov.y0) * self.cov.w + (x - self.cov.x0);
                    v[i] *= 1.0 - k.c[(y - k.y0) * k.w + (x - k.x0)];
                }
            }
        }
        let sum: f64 = vis.iter().map(|&v| v as f64).sum();
        (sum, self.cov.tight_box(&vis))
    }
}

/// An image being composed: the canvas (RGB f32) and the shapes on it, back to front.
pub(crate) struct Compositor {
    width: usize,
    height: usize,
    canvas: Vec<f32>,
    placed: Vec<Placed>,
}

impl Compositor {
    /// A canvas showing `background` through the window at `origin`.
    pub(crate) fn new(
        width: usize,
        height: usize,
        background: &Background,
        origin: [f32; 2],
    ) -> Self {
        let mut canvas = vec![0f32; width * height * 3];
        background.render(&mut canvas, width, height, origin);
        Compositor {
            width,
            height,
            canvas,
            placed: Vec::new(),
        }
    }

    /// Draws `s` over everything so far, whatever it hides.
    pub(crate) fn draw(&mut self, s: &ShapeSpec) {
        let g = Geometry::new(s);
        if let Some(cov) = Coverage::rasterize(&g, self.width, self.height) {
            self.commit(s, g.area(), cov);
        }
    }

    /// Rasterises `s` for [`Self::try_draw_with`]: its coverage, area and mean canvas colour
    /// beneath it. `None` when it misses the image.
    fn prepare(&self, s: &ShapeSpec) -> Option<(Coverage, f64, [f32; 3])> {
        let g = Geometry::new(s);
        let cov = Coverage::rasterize(&g, self.width, self.height)?;
        let (mut sum, mut wsum) = ([0f64; 3], 0f64);
        for row in 0..cov.h {
            for col in 0..cov.w {
                let c = cov.c[row * cov.w + col] as f64;
                if c > 0.0 {
                    let i = ((cov.y0 + row) * self.width + cov.x0 + col) * 3;
                    for (acc, &v) in sum.iter_mut().zip(&self.canvas[i..i + 3]) {
                        *acc += c * v as f64;
                    }
                    wsum += c;
                }
            }
        }
        let mean = sum.map(|v| (v / wsum.max(1e-9)) as f32);
        Some((cov, g.area(), mean))
    }

    /// Draws `s` unless it would leave itself or an earlier shape less than
    /// `PLACEMENT_MIN_VISIBLE` visible or with a box side under [`MIN_BOX_SIDE`]. `colour`
    /// chooses the fill given the mean colour beneath the shape. Returns whether it was drawn.
    fn try_draw_with(
        &mut self,
        mut s: ShapeSpec,
        colour: impl FnOnce([f32; 3]) -> [f32; 3],
    ) -> bool {
        let Some((cov, area, beneath)) = self.prepare(&s) else {
            return false;
        };
        let own: f64 = cov.c.iter().map(|&v| v as f64).sum();
        let ok_box = |b: Option<[u32; 4]>| b.is_some_and(|b| b[2].min(b[3]) >= MIN_BOX_SIDE);
        if own < PLACEMENT_MIN_VISIBLE * area || !ok_box(cov.tight_box(&cov.c)) {
            return false;
        }
        for p in &self.placed {
            if p.cov.overlap(&cov).is_none() {
                continue;
            }
            let (sum, b) = p.visibility(Some(&cov));
            if sum < PLACEMENT_MIN_VISIBLE * p.area || !ok_box(b) {
                return false;
            }
        }
        s.colour = colour(beneath);
        self.commit(&s, area, cov);
        true
    }

    fn commit(&mut self, s: &ShapeSpec, area: f64, cov: Coverage) {
        // Blend the fill, with its shading ramp along the shape's own x axis.
        let (sin, cos) = s.angle.sin_cos();
        let inv = 1.0 / s.half_size[0].max(1e-9);
        for row in 0..cov.h {
            let py = (cov.y0 + row) as f64 + 0.5 - s.center[1];
            for col in 0..cov.w {
                let c = cov.c[row * cov.w + col];
                if c <= 0.0 {
                    continue;
                }
                let px = (cov.x0 + col) as f64 + 0.5 - s.center[0];
                let u = ((px * cos + py * sin) * inv).clamp(-1.0, 1.0) as f32;
                let gain = 1.0 + s.shading * u;
                let i = ((cov.y0 + row) * self.width + cov.x0 + col) * 3;
                for k in 0..3 {
                    let fill = (s.colour[k] * gain).clamp(0.0, 255.0);
                    self.canvas[i + k] += (fill - self.canvas[i + k]) * c;
                }
            }
        }
        // Earlier shapes lose what this one covers.
        for p in &mut self.placed {
            let Some([x0, y0, x1, y1]) = p.cov.overlap(&cov) else {
                continue;
            };
            for y in y0..y1 {
                for x in x0..x1 {
                    let i = (y - p.cov.y0) * p.cov.w + (x - p.cov.x0);
                    p.vis[i] *= 1.0 - cov.c[(y - cov.y0) * cov.w + (x - cov.x0)];
                }
            }
        }
        self.placed.push(Placed {
            kind: s.kind,
            vis: cov.c.clone(),
            cov,
            area,
        });
    }

    /// Applies `effects` (noise drawn from `rng`), quantises, and measures the ground truth.
    pub(crate) fn finish(mut self, effects: Effects, rng: &mut Rng) -> SynthImage {
        if effects.blur {
            blur3(&mut self.canvas, self.width, self.height);
        }
        if effects.noise_sigma > 0.0 {
            add_noise(&mut self.canvas, effects.noise_sigma, rng);
        }
        let rgb = self
            .canvas
            .iter()
            .map(|&v| v.round().clamp(0.0, 255.0) as u8)
            .collect();
        let mut objects = Vec::with_capacity(self.placed.len());
        let mut dropped = 0;
        for p in &self.placed {
            let (sum, b) = p.visibility(None);
            let fraction = (sum / p.area.max(1e-9)).min(1.0);
            match (b, p.cov.tight_box(&p.cov.c)) {
                (Some(bbox), Some(full_bbox))
                    if fraction >= MIN_VISIBLE_FRACTION && bbox[2].min(bbox[3]) >= MIN_BOX_SIDE =>
                {
                    objects.push(SynthObject {
                        kind: p.kind,
                        bbox,
                        full_bbox,
                        visible_area: sum,
                        visible_fraction: fraction,
                    })
                }
                _ => dropped += 1,
            }
        }
        SynthImage {
            width: self.width,
            height: self.height,
            rgb,
            objects,
            dropped,
        }
    }
}

/// Separable `[1, 2, 1] / 4` blur, edges clamped.
fn blur3(img: &mut [f32], w: usize, h: usize) {
    let mut tmp = vec![0f32; img.len()];
    for y in 0..h {
        for x in 0..w {
            let (l, r) = (x.saturating_sub(1), (x + 1).min(w - 1));
            for c in 0..3 {
                let at = |xx: usize| img[(y * w + xx) * 3 + c];
                tmp[(y * w + x) * 3 + c] = 0.25 * at(l) + 0.5 * at(x) + 0.25 * at(r);
            }
        }
    }
    for y in 0..h {
        let (u, d) = (y.saturating_sub(1), (y + 1).min(h - 1));
        for x in 0..w {
            for c in 0..3 {
                let at = |yy: usize| tmp[(yy * w + x) * 3 + c];
                img[(y * w + x) * 3 + c] = 0.25 * at(u) + 0.5 * at(y) + 0.25 * at(d);
            }
        }
    }
}

/// Adds approximately Gaussian noise (Irwin-Hall of four 16-bit uniforms, unit variance).
fn add_noise(img: &mut [f32], sigma: f32, rng: &mut Rng) {
    // The sum of 4 uniforms on [0, 1) has mean 2 and variance 1/3.
    let k = sigma * 3f32.sqrt() / 65_536.0;
    for v in img {
        let r = rng.next_u64();
        let s = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
        *v += (s as f32 - 2.0 * 65_536.0) * k;
    }
}

// ---------------------------------------------------------------------------------------------
// Random scenes
// ---------------------------------------------------------------------------------------------

/// Picks the fill colour that contrasts most with `beneath` out of a few random ones (enough
/// for any clearly visible object; further tries rarely change anything).
pub(crate) fn contrasting_colour(rng: &mut Rng, beneath: [f32; 3]) -> [f32; 3] {
    let mut best = ([0f32; 3], -1f32);
    for _ in 0..12 {
        let c = if rng.chance(0.1) {
            random_colour(rng, (0.0, 0.1), (0.05, 1.0))
        } else {
            random_colour(rng, (0.35, 1.0), (0.3, 1.0))
        };
        let d = (0..3)
            .map(|k| (c[k] - beneath[k]).powi(2))
            .sum::<f32>()
            .sqrt();
        if d > best.1 {
            best = (c, d);
        }
        if d >= 100.0 {
            break;
        }
    }
    best.0
}

/// A random `(half_size, angle)` for a shape of `kind` whose rotated bounding box has longer
/// side `extent` pixels; `max_stretch` bounds the aspect ratio of the stretch.
pub(crate) fn random_pose(
    rng: &mut Rng,
    kind: ShapeKind,
    extent: f64,
    max_stretch: f64,
) -> ([f64; 2], f64) {
    let stretch = rng
        .range_f64(-max_stretch.ln(), max_stretch.ln())
        .exp()
        .sqrt();
    let unit = [stretch, 1.0 / stretch];
    let angle = rng.range_f64(0.0, std::f64::consts::TAU);
    let probe = ShapeSpec {
        kind,
        center: [0.0, 0.0],
        half_size: unit,
        angle,
        colour: [0.0; 3],
        shading: 0.0,
    };
    let [x0, y0, x1, y1] = Geometry::new(&probe).bounds();
    let k = extent / (x1 - x0).max(y1 - y0).max(1e-9);
    ([unit[0] * k, unit[1] * k], angle)
}

/// The longer side (pixels) of a random object's box, from four buckets drawn log-uniformly:
/// tiny 7-12 px (8%), small 14 px to 10% of the image's shorter side (25%), medium 10-30%
/// (47%) and large 30-60% (20%, at most `large_left` per image; medium otherwise). Small
/// objects are what limits a detector's AP most; these shares are the knob.
fn random_extent(rng: &mut Rng, short_side: f64, large_left: &mut usize) -> f64 {
    let log_uniform = |rng: &mut Rng, lo: f64, hi: f64| rng.range_f64(lo.ln(), hi.ln()).exp();
    let (s10, s30, s60) = (
        (short_side * 0.1).max(15.0),
        (short_side * 0.3).max(16.0),
        (short_side * 0.6).max(17.0),
    );
    let r = rng.f64();
    if r < 0.08 {
        log_uniform(rng, 7.0, 12.0)
    } else if r < 0.33 {
        log_uniform(rng, 14.0, s10)
    } else if r < 0.8 || *large_left == 0 {
        log_uniform(rng, s10, s30)
    } else {
        *large_left -= 1;
        log_uniform(rng, s30, s60)
    }
}

/// A random image: a random background, 3 to 12 objects of random classes, sizes, stretches,
/// rotations and colours (larger ones usually behind smaller ones, partial occlusion
/// allowed), then random blur and noise. Everything comes from `rng`.
pub fn render_random_image(rng: &mut Rng, width: usize, height: usize) -> SynthImage {
    let background = Background::random(rng, width, height, [0.0, 0.0]);
    let mut comp = Compositor::new(width, height, &background, [0.0, 0.0]);
    let short = width.min(height) as f64;
    let n = 3 + rng.below(10) as usize;
    let mut large_left = 2;
    let mut plan: Vec<(ShapeKind, f64)> = (0..n)
        .map(|_| {
            let kind = ShapeKind::ALL[rng.below(ShapeKind::ALL.len() as u64) as usize];
            (kind, random_extent(rng, short, &mut large_left))
        })
        .collect();
    if rng.chance(0.7) {
        plan.sort_by(|a, b| b.1.total_cmp(&a.1));
    }
    for (kind, extent) in plan {
        let max_stretch = if extent < 14.0 { 1.3 } else { 1.8 };
        for _ in 0..25 {
            let (half_size, angle) = random_pose(rng, kind, extent, max_stretch);
            // Mostly inside the image; sometimes cut by its border.
            let margin = if rng.chance(0.15) { 0.2 } else { 0.5 } * extent;
            let cx = rng.range_f64(margin, (width as f64 - margin).max(margin + 1.0));
            let cy = rng.range_f64(margin, (height as f64 - margin).max(margin + 1.0));
            let shading = if rng.chance(0.5) {
                rng.range_f64(-0.3, 0.3) as f32
            } else {
                0.0
            };
            let spec = ShapeSpec {
                kind,
                center: [cx, cy],
                half_size,
                angle,
                colour: [0.0; 3],
                shading,
            };
            let mut pick = Rng::new(rng.next_u64());
            if comp.try_draw_with(spec, |beneath| contrasting_colour(&mut pick, beneath)) {
                break;
            }
        }
    }
    let effects = Effects {
        blur: rng.chance(0.25),
        noise_sigma: if rng.chance(0.4) {
            rng.range_f64(1.0, 5.0) as f32
        } else {
            0.0
        },
    };
    comp.finish(effects, rng)
}

/// Renders `shapes` in order (later ones on top, nothing rejected) over `background`, then
/// applies `effects` (noise from `rng`): for hand-made scenes and tests.
pub fn render_scene(
    width: usize,
    height: usize,
    background: &Background,
    shapes: &[ShapeSpec],
    effects: Effects,
    rng: &mut Rng,
) -> SynthImage {
    render_scene_at(width, height, background, [0.0, 0.0], shapes, effects, rng)
}

/// [`render_scene`] with the background seen through the window at `origin`.
pub(crate) fn render_scene_at(
    width: usize,
    height: usize,
    background: &Background,
    origin: [f32; 2],
    shapes: &[ShapeSpec],
    effects: Effects,
    rng: &mut Rng,
) -> SynthImage {
    let mut comp = Compositor::new(width, height, background, origin);
    for s in shapes {
        comp.draw(s);
    }
    comp.finish(effects, rng)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_of_an_axis_aligned_square_is_exact() {
        // A square from (10.25, 20.5) to (30.25, 40.5).
        let s = ShapeSpec {
            kind: ShapeKind::Square,
            center: [20.25, 30.5],
            half_size: [10.0, 10.0],
            angle: 0.0,
            colour: [255.0; 3],
            shading: 0.0,
        };
        let g = Geometry::new(&s);
        let cov = Coverage::rasterize(&g, 64, 64).unwrap();
        let total: f32 = cov.c.iter().sum();
        assert!((total - 400.0).abs() < 1e-3, "{total}");
        assert!((g.area() - 400.0).abs() < 1e-9);
        // Column 10 is 3/4 covered, column 30 1/4; rows 20 and 40 half covered (not > 0.5).
        assert_eq!(cov.tight_box(&cov.c), Some([10, 21, 20, 19]));
    }

    #[test]
    fn ellipse_area_matches_its_coverage() {
        let s = ShapeSpec {
            kind: ShapeKind::Circle,
            center: [50.0, 40.0],
            half_size: [30.0, 12.0],
            angle: 0.7,
            colour: [255.0; 3],
            shading: 0.0,
        };
        let g = Geometry::new(&s);
        let cov = Coverage::rasterize(&g, 100, 100).unwrap();
        let total: f64 = cov.c.iter().map(|&v| v as f64).sum();
        assert!(
            (total / g.area() - 1.0).abs() < 2e-3,
            "{total} vs {}",
            g.area()
        );
    }

    /// Inside test by definition, for brute-force supersampling.
    fn inside(g: &Geometry, x: f64, y: f64) -> bool {
        match g {
            Geometry::Ellipse { c, a, b, cos, sin } => {
                let (dx, dy) = (x - c[0], y - c[1]);
                let (u, v) = (cos * dx + sin * dy, -sin * dx + cos * dy);
                (u / a).powi(2) + (v / b).powi(2) <= 1.0
            }
            Geometry::Polygon(p) => {
                let mut inside = false;
                for i in 0..p.len() {
                    let (q, r) = (p[i], p[(i + 1) % p.len()]);
                    if (q[1] <= y) != (r[1] <= y)
                        && x < q[0] + (y - q[1]) * (r[0] - q[0]) / (r[1] - q[1])
                    {
                        inside = !inside;
                    }
                }
                inside
            }
        }
    }

    #[test]
    fn coverage_matches_brute_force_supersampling_for_every_class() {
        let mut rng = Rng::new(11);
        for kind in ShapeKind::ALL {
            for _ in 0..4 {
                let extent = rng.range_f64(8.0, 40.0);
                let (half_size, angle) = random_pose(&mut rng, kind, extent, 1.8);
                let s = ShapeSpec {
                    kind,
                    center: [rng.range_f64(20.0, 30.0), rng.range_f64(20.0, 30.0)],
                    half_size,
                    angle,
                    colour: [0.0; 3],
                    shading: 0.0,
                };
                let g = Geometry::new(&s);
                let cov = Coverage::rasterize(&g, 50, 50).unwrap();
                let n = 32;
                let mut worst = 0f32;
                for py in 0..50 {
                    for px in 0..50 {
                        let mut hits = 0;
                        for sy in 0..n {
                            for sx in 0..n {
                                let x = px as f64 + (sx as f64 + 0.5) / n as f64;
                                let y = py as f64 + (sy as f64 + 0.5) / n as f64;
                                hits += inside(&g, x, y) as u32;
                            }
                        }
                        let brute = hits as f32 / (n * n) as f32;
                        let ours = if (cov.x0..cov.x0 + cov.w).contains(&px)
                            && (cov.y0..cov.y0 + cov.h).contains(&py)
                        {
                            cov.c[(py - cov.y0) * cov.w + px - cov.x0]
                        } else {
                            0.0
                        };
                        worst = worst.max((brute - ours).abs());
                    }
                }
                assert!(worst < 0.09, "{kind:?} {s:?}: coverage off by {worst}");
            }
        }
    }
}
