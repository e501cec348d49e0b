//! Procedural backgrounds: gradients, value noise, stripes, checkers and soft blobs, defined on
//! the whole plane so a panning camera can look at any window, and randomly mixed through a
//! smooth noise mask.

use crate::rng::Rng;

/// A hash of a lattice point to `[0, 1)`.
fn lattice(ix: i64, iy: i64, seed: u64) -> f32 {
    let mut h = seed
        ^ (ix as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (iy as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    h = (h ^ (h >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 29)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 32;
    (h >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// Smooth value noise in `[0, 1)`, defined on the whole plane (so a panning camera can sample
/// any offset).
fn value_noise(x: f32, y: f32, seed: u64) -> f32 {
    let (fx, fy) = (x.floor(), y.floor());
    let (ix, iy) = (fx as i64, fy as i64);
    let (tx, ty) = (x - fx, y - fy);
    let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
    let a = lattice(ix, iy, seed);
    let b = lattice(ix + 1, iy, seed);
    let c = lattice(ix, iy + 1, seed);
    let d = lattice(ix + 1, iy + 1, seed);
    let top = a + (b - a) * sx;
    let bottom = c + (d - c) * sx;
    top + (bottom - top) * sy
}

/// Two octaves of value noise, in `[0, 1)`.
fn fbm(x: f32, y: f32, seed: u64) -> f32 {
    (value_noise(x, y, seed) * 2.0 + value_noise(x * 2.03 + 17.1, y * 2.03 - 5.3, seed ^ 0x5555))
        / 3.0
}

fn lerp3(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

fn smoothstep(e0: f32, e1: f32, x: f32) -> f32 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// A soft-edged disc of a [`Texture::Blobs`] background.
#[derive(Clone, Debug, PartialEq)]
pub struct Blob {
    pub center: [f32; 2],
    /// Radius where the blob is fully opaque.
    pub inner: f32,
    /// Radius where it has faded out (`> inner`, several pixels wider: blobs never have the
    /// crisp edge of a shape).
    pub outer: f32,
    pub colour: [f32; 3],
}

/// One procedural background pattern, defined on the whole plane.
#[derive(Clone, Debug, PartialEq)]
pub enum Texture {
    /// One colour.
    Flat([f32; 3]),
    /// A linear (`radial: false`, along `dir`) or radial (around `origin`) ramp from `c0` to
    /// `c1` over `length` pixels.
    Gradient {
        c0: [f32; 3],
        c1: [f32; 3],
        origin: [f32; 2],
        dir: [f32; 2],
        length: f32,
        radial: bool,
    },
    /// Value noise with features about `scale` pixels wide, mapped between two colours.
    Noise {
        c0: [f32; 3],
        c1: [f32; 3],
        scale: f32,
        seed: u64,
    },
    /// Stripes across `dir` with period `period`; `sharpness` 0 is a sine, 1 nearly square.
    Stripes {
        c0: [f32; 3],
        c1: [f32; 3],
        dir: [f32; 2],
        period: f32,
        sharpness: f32,
    },
    /// A checkerboard of `cell`-pixel squares rotated so its rows run along `dir`.
    Checkers {
        c0: [f32; 3],
        c1: [f32; 3],
        dir: [f32; 2],
        cell: f32,
    },
    /// Soft discs over a base colour.
    Blobs { base: [f32; 3], blobs: Vec<Blob> },
}

impl Texture {
    /// Writes the texture seen through a `width x height` window whose top-left corner is at
    /// `origin` in texture space into `out` (RGB f32, 0..255).
    fn fill(&self, out: &mut [f32], width: usize, height: usize, origin: [f32; 2]) {
        let mut each = |f: &dyn Fn(f32, f32) -> [f32; 3]| {
            for y in 0..height {
                let py = origin[1] + y as f32 + 0.5;
                let row = &mut out[y * width * 3..(y + 1) * width * 3];
                for (x, px) in row.chunks_exact_mut(3).enumerate() {
                    px.copy_from_slice(&f(origin[0] + x as f32 + 0.5, py));
                }
            }
        };
        match self {
            Texture::Flat(c) => each(&|_, _| *c),
            Texture::Gradient {
                c0,
                c1,
                origin: o,
                dir,
                length,
                radial,
            } => each(&|x, y| {
                let (dx, dy) = (x - o[0], y - o[1]);
                let t = if *radial {
                    (dx * dx + dy * dy).sqrt() / length
                } else {
                    (dx * dir[0] + dy * dir[1]) / length
                };
                lerp3(*c0, *c1, t.clamp(0.0, 1.0))
            }),
            Texture::Noise {
                c0,
                c1,
                scale,
                seed,
            } => {
                let k = 1.0 / scale;
                each(&|x, y| lerp3(*c0, *c1, fbm(x * k, y * k, *seed)))
            }
            Texture::Stripes {
                c0,
                c1,
                dir,
                period,
                sharpness,
            } => {
                let k = std::f32::consts::TAU / period;
                let half = 0.5 * (1.0 - sharpness.clamp(0.0, 0.95));
                each(&|x, y| {
                    let s = 0.5 + 0.5 * ((x * dir[0] + y * dir[1]) * k).sin();
                    lerp3(*c0, *c1, smoothstep(0.5 - half, 0.5 + half, s))
                })
            }
            Texture::Checkers { c0, c1, dir, cell } => each(&|x, y| {
                let u = (x * dir[0] + y * dir[1]) / cell;
                let v = (-x * dir[1] + y * dir[0]) / cell;
                if (u.floor() as i64 + v.floor() as i64) & 1 == 0 {
                    *c0
                } else {
                    *c1
                }
            }),
            Texture::Blobs { base, blobs } => {
                for px in out[..width * height * 3].chunks_exact_mut(3) {
                    px.copy_from_slice(base);
                }
                for b in blobs {
                    // Only the blob's own window.
                    let x0 = ((b.center[0] - b.outer - origin[0]).floor().max(0.0)) as usize;
                    let y0 = ((b.center[1] - b.outer - origin[1]).floor().max(0.0)) as usize;
                    let x1 =
                        ((b.center[0] + b.outer - origin[0]).ceil().max(0.0) as usize).min(width);
                    let y1 =
                        ((b.center[1] + b.outer - origin[1]).ceil().max(0.0) as usize).min(height);
                    for y in y0..y1 {
                        let dy = origin[1] + y as f32 + 0.5 - b.center[1];
                        for x in x0..x1 {
                            let dx = origin[0] + x as f32 + 0.5 - b.center[0];
                            let r = (dx * dx + dy * dy).sqrt();
                            let a = 1.0 - smoothstep(b.inner, b.outer, r);
                            if a > 0.0 {
                                let i = (y * width + x) * 3;
                                let px = &mut out[i..i + 3];
                                let mixed = lerp3([px[0], px[1], px[2]], b.colour, a);
                                px.copy_from_slice(&mixed);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A background: a base texture, optionally mixed with a second one through a smooth noise
/// mask.
#[derive(Clone, Debug, PartialEq)]
pub struct Background {
    pub base: Texture,
    /// Second texture, mask seed and mask feature size (pixels).
    pub overlay: Option<(Texture, u64, f32)>,
}

impl Background {
    /// A single flat colour.
    pub fn flat(colour: [f32; 3]) -> Self {
        Background {
            base: Texture::Flat(colour),
            overlay: None,
        }
    }

    /// A random background for a view of `width x height` pixels that may pan by up to `pan`
    /// pixels (blobs are scattered over the whole panned area).
    pub fn random(rng: &mut Rng, width: usize, height: usize, pan: [f32; 2]) -> Self {
        let base = random_texture(rng, width, height, pan);
        let overlay = rng.chance(0.5).then(|| {
            let t = random_texture(rng, width, height, pan);
            let scale = rng.range_f64(40.0, 160.0) as f32;
            (t, rng.next_u64(), scale)
        });
        Background { base, overlay }
    }

    /// Renders the window at `origin` (texture space) into `out` (RGB f32, 0..255).
    pub(crate) fn render(&self, out: &mut [f32], width: usize, height: usize, origin: [f32; 2]) {
        self.base.fill(out, width, height, origin);
        if let Some((tex, seed, scale)) = &self.overlay {
            let mut other = vec![0f32; width * height * 3];
            tex.fill(&mut other, width, height, origin);
            let k = 1.0 / scale;
            for y in 0..height {
                let py = (origin[1] + y as f32 + 0.5) * k;
                for x in 0..width {
                    let px = (origin[0] + x as f32 + 0.5) * k;
                    let m = smoothstep(0.35, 0.65, value_noise(px, py, *seed));
                    let i = (y * width + x) * 3;
                    for c in 0..3 {
                        out[i + c] += (other[i + c] - out[i + c]) * m;
                    }
                }
            }
        }
    }
}

/// A random colour from HSV with the given saturation and value ranges.
pub(crate) fn random_colour(rng: &mut Rng, sat: (f64, f64), val: (f64, f64)) -> [f32; 3] {
    let h = rng.f64();
    let s = rng.range_f64(sat.0, sat.1);
    let v = rng.range_f64(val.0, val.1);
    crate::image_io::hsv_to_rgb(h, s, v).map(|c| (c * 255.0) as f32)
}

fn random_dir(rng: &mut Rng) -> [f32; 2] {
    let a = rng.range_f64(0.0, std::f64::consts::TAU);
    [a.cos() as f32, a.sin() as f32]
}

/// Two background colours: the second is pulled towards a random colour by a random contrast.
fn colour_pair(rng: &mut Rng) -> ([f32; 3], [f32; 3]) {
    let c0 = random_colour(rng, (0.0, 0.7), (0.15, 0.95));
    let other = random_colour(rng, (0.0, 0.8), (0.1, 1.0));
    let contrast = rng.range_f64(0.15, 0.8) as f32;
    (c0, lerp3(c0, other, contrast))
}

fn random_texture(rng: &mut Rng, width: usize, height: usize, pan: [f32; 2]) -> Texture {
    let (w, h) = (width as f32, height as f32);
    let (c0, c1) = colour_pair(rng);
    match rng.below(5) {
        0 => {
            let radial = rng.chance(0.3);
            let origin = [
                rng.range_f64(0.0, w as f64) as f32,
                rng.range_f64(0.0, h as f64) as f32,
            ];
            Texture::Gradient {
                c0,
                c1,
                origin: if radial { origin } else { [0.0, 0.0] },
                dir: random_dir(rng),
                length: (w.max(h) * rng.range_f64(0.6, 1.5) as f32).max(1.0),
                radial,
            }
        }
        1 => Texture::Noise {
            c0,
            c1,
            scale: rng.range_f64(6.0, 90.0) as f32,
            seed: rng.next_u64(),
        },
        2 => Texture::Stripes {
            c0,
            c1,
            dir: random_dir(rng),
            period: rng.range_f64(6.0, 70.0) as f32,
            sharpness: rng.range_f64(0.0, 0.9) as f32,
        },
        3 => Texture::Checkers {
            c0,
            c1,
            dir: random_dir(rng),
            cell: rng.range_f64(6.0, 60.0) as f32,
        },
        _ => {
            let (x_hi, y_hi) = (w + pan[0].abs(), h + pan[1].abs());
            let area = (x_hi * y_hi).max(1.0);
            let n = (area / 12_000.0 * rng.range_f64(0.5, 1.5) as f32).clamp(3.0, 200.0) as usize;
            let scale = w.min(h);
            let blobs = (0..n)
                .map(|_| {
                    let outer = scale * rng.range_f64(0.04, 0.25) as f32;
                    Blob {
                        center: [
                            (pan[0].min(0.0) as f64 + rng.range_f64(0.0, x_hi as f64)) as f32,
                            (pan[1].min(0.0) as f64 + rng.range_f64(0.0, y_hi as f64)) as f32,
                        ],
                        inner: outer * rng.range_f64(0.0, 0.6) as f32,
                        outer,
                        colour: lerp3(c0, random_colour(rng, (0.0, 0.8), (0.1, 1.0)), 0.6),
                    }
                })
                .collect();
            Texture::Blobs { base: c0, blobs }
        }
    }
}
