//! The synthetic test video: shapes moving in straight lines (bouncing off the frame's edges)
//! with slight rotation over a slowly panning background, written as Y4M (YUV 4:2:0, BT.601
//! limited range) with per-frame COCO ground truth.

use std::io::Write;

use crate::rng::Rng;

use super::ShapeKind;
use super::background::Background;
use super::render::{
    Effects, ShapeSpec, SynthImage, contrasting_colour, random_pose, render_scene_at,
};

/// Frames per second written into the Y4M header.
pub const VIDEO_FPS: u32 = 30;

/// One moving object: its pose at frame `t` is a closed-form function of `t`, so frames can be
/// rendered in any order (and in parallel).
#[derive(Clone, Debug, PartialEq)]
struct Mover {
    kind: ShapeKind,
    half_size: [f64; 2],
    angle0: f64,
    /// Radians per frame.
    spin: f64,
    start: [f64; 2],
    /// Pixels per frame.
    velocity: [f64; 2],
    /// Range of the centre per axis; the object bounces off its ends.
    lo: [f64; 2],
    hi: [f64; 2],
    colour: [f32; 3],
    shading: f32,
}

/// Position `p0 + v t` reflected back and forth inside `[lo, hi]` (a triangle wave).
fn bounce(p0: f64, v: f64, t: f64, lo: f64, hi: f64) -> f64 {
    let len = hi - lo;
    if len <= 0.0 {
        return lo;
    }
    let s = (p0 - lo + v * t).rem_euclid(2.0 * len);
    lo + if s <= len { s } else { 2.0 * len - s }
}

/// A deterministic moving scene.
#[derive(Clone, Debug, PartialEq)]
pub struct VideoScene {
    pub width: usize,
    pub height: usize,
    background: Background,
    /// Background pan in pixels per frame.
    pan: [f64; 2],
    movers: Vec<Mover>,
    effects: Effects,
    /// Seed of the per-frame noise streams.
    noise_seed: u64,
}

impl VideoScene {
    /// A random scene of `width x height` frames lasting `frames` frames, entirely from `rng`.
    pub fn random(rng: &mut Rng, width: usize, height: usize, frames: usize) -> Self {
        let speed = rng.range_f64(0.2, 0.8);
        let dir = rng.range_f64(0.0, std::f64::consts::TAU);
        let pan = [speed * dir.cos(), speed * dir.sin()];
        let total = [
            (pan[0] * frames as f64) as f32,
            (pan[1] * frames as f64) as f32,
        ];
        let background = Background::random(rng, width, height, total);
        // Mean background colour, to pick fills that stand out from it.
        let mut probe = vec![0f32; width * height * 3];
        background.render(&mut probe, width, height, [0.0, 0.0]);
        let mut mean = [0f64; 3];
        for px in probe.chunks_exact(3) {
            for k in 0..3 {
                mean[k] += px[k] as f64;
            }
        }
        let mean = mean.map(|v| (v / (width * height).max(1) as f64) as f32);

        let short = width.min(height) as f64;
        let n = 8 + rng.below(4) as usize;
        // Every class at least once (n >= 6), in random order.
        let mut kinds: Vec<ShapeKind> = (0..n)
            .map(|i| ShapeKind::ALL[i % ShapeKind::ALL.len()])
            .collect();
        rng.shuffle(&mut kinds);
        let mut sized: Vec<(ShapeKind, f64)> = kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| {
                let extent = if i == 0 {
                    rng.range_f64(8.0, 12.0)
                } else {
                    let (lo, hi) = (14f64.min(short * 0.3), (short * 0.4).max(15.0));
                    rng.range_f64(lo.ln(), hi.ln()).exp()
                };
                (kind, extent)
            })
            .collect();
        // Larger objects behind smaller ones.
        sized.sort_by(|a, b| b.1.total_cmp(&a.1));
        let movers = sized
            .into_iter()
            .map(|(kind, extent)| {
                let (half_size, angle0) = random_pose(rng, kind, extent, 1.6);
                let m = extent / 4.0;
                let lo = [m, m];
                let hi = [width as f64 - m, height as f64 - m];
                let sp = rng.range_f64(0.5, 3.0);
                let a = rng.range_f64(0.0, std::f64::consts::TAU);
                Mover {
                    kind,
                    half_size,
                    angle0,
                    spin: rng.range_f64(-0.025, 0.025),
                    start: [rng.range_f64(lo[0], hi[0]), rng.range_f64(lo[1], hi[1])],
                    velocity: [sp * a.cos(), sp * a.sin()],
                    lo,
                    hi,
                    colour: contrasting_colour(rng, mean),
                    shading: rng.range_f64(-0.2, 0.2) as f32,
                }
            })
            .collect();
        let effects = Effects {
            blur: false,
            noise_sigma: rng.range_f64(0.0, 2.5) as f32,
        };
        VideoScene {
            width,
            height,
            background,
            pan,
            movers,
            effects,
            noise_seed: rng.next_u64(),
        }
    }

    /// The shapes of frame `t`, back to front.
    pub fn shapes_at(&self, t: usize) -> Vec<ShapeSpec> {
        let t = t as f64;
        self.movers
            .iter()
            .map(|m| ShapeSpec {
                kind: m.kind,
                center: [
                    bounce(m.start[0], m.velocity[0], t, m.lo[0], m.hi[0]),
                    bounce(m.start[1], m.velocity[1], t, m.lo[1], m.hi[1]),
                ],
                half_size: m.half_size,
                angle: m.angle0 + m.spin * t,
                colour: m.colour,
                shading: m.shading,
            })
            .collect()
    }

    /// Renders frame `t` with its ground truth.
    pub fn render_frame(&self, t: usize) -> SynthImage {
        let origin = [
            (self.pan[0] * t as f64) as f32,
            (self.pan[1] * t as f64) as f32,
        ];
        let mut noise = Rng::derive(self.noise_seed, t as u64);
        render_scene_at(
            self.width,
            self.height,
            &self.background,
            origin,
            &self.shapes_at(t),
            self.effects,
            &mut noise,
        )
    }
}

/// The Y4M stream header for `width x height` 4:2:0 frames at `fps` (chroma sited between
/// luma samples, as produced by [`rgb_to_i420`]; limited range).
pub fn y4m_header(width: usize, height: usize, fps: u32) -> String {
    format!(
        "YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg XYSCSS=420JPEG XCOLORRANGE=LIMITED\n"
    )
}

/// Bytes of one I420 frame (Y plane, then U and V at half resolution rounded up).
pub fn i420_frame_len(width: usize, height: usize) -> usize {
    width * height + 2 * width.div_ceil(2) * height.div_ceil(2)
}

/// Converts packed RGB8 to planar I420 with BT.601 limited-range coefficients (Y in 16..=235,
/// U and V in 16..=240); each chroma sample is the conversion of its 2x2 block's mean colour.
pub fn rgb_to_i420(rgb: &[u8], width: usize, height: usize) -> Vec<u8> {
    let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
    let mut out = vec![0u8; i420_frame_len(width, height)];
    let (y_plane, uv) = out.split_at_mut(width * height);
    let (u_plane, v_plane) = uv.split_at_mut(cw * ch);
    let px = |x: usize, y: usize| {
        let i = (y * width + x) * 3;
        [rgb[i] as f32, rgb[i + 1] as f32, rgb[i + 2] as f32]
    };
    let q = |v: f32| v.round().clamp(0.0, 255.0) as u8;
    for y in 0..height {
        for x in 0..width {
            let [r, g, b] = px(x, y);
            y_plane[y * width + x] = q(16.0 + 0.256_788 * r + 0.504_129 * g + 0.097_906 * b);
        }
    }
    for cy in 0..ch {
        for cx in 0..cw {
            let mut sum = [0f32; 3];
            let mut n = 0f32;
            for y in 2 * cy..(2 * cy + 2).min(height) {
                for x in 2 * cx..(2 * cx + 2).min(width) {
                    let p = px(x, y);
                    for k in 0..3 {
                        sum[k] += p[k];
                    }
                    n += 1.0;
                }
            }
            let [r, g, b] = sum.map(|s| s / n);
            u_plane[cy * cw + cx] = q(128.0 - 0.148_223 * r - 0.290_993 * g + 0.439_216 * b);
            v_plane[cy * cw + cx] = q(128.0 + 0.439_216 * r - 0.367_788 * g - 0.071_427 * b);
        }
    }
    out
}

/// Writes one Y4M frame (the `FRAME` marker and the I420 planes of `rgb`).
pub fn write_y4m_frame(
    w: &mut impl Write,
    rgb: &[u8],
    width: usize,
    height: usize,
) -> std::io::Result<()> {
    w.write_all(b"FRAME\n")?;
    w.write_all(&rgb_to_i420(rgb, width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounce_stays_in_range_and_is_continuous() {
        let mut last = bounce(3.0, 2.5, 0.0, 0.0, 10.0);
        for t in 1..200 {
            let p = bounce(3.0, 2.5, t as f64, 0.0, 10.0);
            assert!((0.0..=10.0).contains(&p));
            assert!((p - last).abs() <= 2.5 + 1e-9);
            last = p;
        }
    }

    #[test]
    fn bt601_limited_range_extremes() {
        let rgb = [0u8, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0, 255];
        let yuv = rgb_to_i420(&rgb, 4, 1);
        assert_eq!(&yuv[..4], &[16, 235, 81, 41]);
        // Chroma of (black + white) / 2 is neutral; of (red + blue) / 2 is (165, 175).
        assert_eq!((yuv[4], yuv[6]), (128, 128));
        assert_eq!((yuv[5], yuv[7]), (165, 175));
        assert_eq!(yuv.len(), 4 + 2 * 2);
    }
}
