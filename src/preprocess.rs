//! Frame -> network input: colour conversion, Pillow-exact bilinear resize, letterbox padding and
//! ImageNet normalisation, reproducing effdet 0.4.1's evaluation path bit for bit:
//!
//! ```python
//! # effdet.data.transforms.ResizePad (fill_color = 'mean' -> (124, 116, 104))
//! img_scale = min(target / height, target / width)           # Python floats (f64)
//! scaled_h, scaled_w = int(height * img_scale), int(width * img_scale)
//! new_img = Image.new("RGB", (target, target), color=(124, 116, 104))
//! new_img.paste(img.resize((scaled_w, scaled_h), Image.BILINEAR))  # top-left
//! anno['img_scale'] = 1. / img_scale
//! # effdet.data.loader.PrefetchLoader
//! mean = torch.tensor([x * 255 for x in IMAGENET_DEFAULT_MEAN])    # f64 product -> f32
//! std = torch.tensor([x * 255 for x in IMAGENET_DEFAULT_STD])
//! x = x.float().sub_(mean).div_(std)
//! ```
//!
//! The pipeline is: [`Letterbox::new`] (the `ResizePad` arithmetic), then a fused
//! convert-and-resize straight from the [`Frame`] (only the source rows the resize reads are
//! converted, and the horizontal pass consumes them one row at a time, so no full-size RGB copy of
//! the frame is made in the usual case), then [`letterbox_normalise_into`] (pad + normalise into
//! CHW `f32`). [`frame_to_rgb`] and [`resize_bilinear`] expose the two halves separately; running
//! them one after the other gives exactly the same pixels as the fused path.
//!
//! Every pass is parallelised over rows with `rayon` (each output row is computed independently,
//! so results do not depend on the number of threads).

use std::sync::LazyLock;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::frame::{Frame, PixelFormat, YuvMatrix, YuvRange};

/// ImageNet channel means (R, G, B) on a 0..1 scale, as in timm's `IMAGENET_DEFAULT_MEAN`.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (R, G, B) on a 0..1 scale (`IMAGENET_DEFAULT_STD`).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// effdet's fill colour: `tuple(round(255*m) for m in mean)` = (124, 116, 104).
pub const FILL_RGB: [u8; 3] = [124, 116, 104];

/// The same constants as Python floats: effdet multiplies them by 255 in f64 *before* torch turns
/// them into f32 tensors, and `f32(0.224 * 255.0) != f32(0.224) * 255f32`.
const MEAN_F64: [f64; 3] = [0.485, 0.456, 0.406];
const STD_F64: [f64; 3] = [0.229, 0.224, 0.225];

/// Geometry of effdet's `ResizePad`: how an `orig_width` x `orig_height` image is scaled into the
/// top-left corner of an `input_size` x `input_size` square.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Letterbox {
    /// Width of the source frame.
    pub orig_width: usize,
    /// Height of the source frame.
    pub orig_height: usize,
    /// Width of the resized image inside the square (at least 1, at most `input_size`).
    pub resized_width: usize,
    /// Height of the resized image inside the square (at least 1, at most `input_size`).
    pub resized_height: usize,
    /// Side of the square network input.
    pub input_size: usize,
    /// original / resized, as effdet's `img_scale` (1/scale): multiply network-space boxes by this
    /// to get frame coordinates.
    pub img_scale: f64,
}

impl Letterbox {
    /// effdet's `ResizePad` arithmetic, in the same f64 operations as the Python:
    /// `s = min(input_size / orig_height, input_size / orig_width)`,
    /// `resized_height = int(orig_height * s)`, `resized_width = int(orig_width * s)` (truncation),
    /// `img_scale = 1 / s`.
    ///
    /// Deviation from effdet: a resized side that truncates to 0 (a frame more than `input_size`
    /// times longer than it is wide, e.g. 1x2000 for 512) is clamped to 1 pixel, where effdet
    /// would crash in Pillow; `img_scale` keeps effdet's value `1 / s`. Sides are also capped at
    /// `input_size` (a no-op with IEEE arithmetic, kept as a guarantee for callers).
    ///
    /// Errors: [`Error::InvalidArgument`] when `input_size` or a frame side is 0, or when
    /// `3 * input_size * input_size` overflows `usize`.
    pub fn new(orig_width: usize, orig_height: usize, input_size: usize) -> Result<Letterbox> {
        if input_size == 0 {
            return Err(Error::InvalidArgument(
                "network input size must be at least 1 pixel".into(),
            ));
        }
        if input_size
            .checked_mul(input_size)
            .and_then(|v| v.checked_mul(3))
            .is_none()
        {
            return Err(Error::InvalidArgument(format!(
                "network input size {input_size} is too large"
            )));
        }
        if orig_width == 0 || orig_height == 0 {
            return Err(Error::InvalidArgument(format!(
                "cannot letterbox an empty {orig_width}x{orig_height} image"
            )));
        }
        let target = input_size as f64;
        let (w, h) = (orig_width as f64, orig_height as f64);
        let scale_y = target / h;
        let scale_x = target / w;
        // Python's min(a, b) returns a unless b < a.
        let scale = if scale_x < scale_y { scale_x } else { scale_y };
        // `as usize` truncates toward zero like Python's int() for these non-negative values.
        let resized_height = ((h * scale) as usize).clamp(1, input_size);
        let resized_width = ((w * scale) as usize).clamp(1, input_size);
        Ok(Letterbox {
            orig_width,
            orig_height,
            resized_width,
            resized_height,
            input_size,
            img_scale: 1.0 / scale,
        })
    }

    /// Number of `f32` values in the CHW network input: `3 * input_size * input_size`.
    pub fn input_len(&self) -> usize {
        3 * self.input_size * self.input_size
    }
}

/// An owned RGB8 image, tightly packed HWC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height * 3` bytes, row-major, R G B per pixel.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// An image from packed HWC bytes; [`Error::InvalidArgument`] unless
    /// `data.len() == width * height * 3`.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<RgbImage> {
        match width.checked_mul(height).and_then(|v| v.checked_mul(3)) {
            Some(n) if n == data.len() => Ok(RgbImage {
                width,
                height,
                data,
            }),
            _ => Err(Error::InvalidArgument(format!(
                "RGB image {width}x{height} needs {width}*{height}*3 bytes, got {}",
                data.len()
            ))),
        }
    }

    /// Row `y` (`width * 3` bytes).
    fn row(&self, y: usize) -> &[u8] {
        let n = self.width * 3;
        &self.data[y * n..(y + 1) * n]
    }

    fn check(&self, what: &str) {
        assert_eq!(
            self.data.len(),
            self.width * self.height * 3,
            "{what}: RgbImage {}x{} must hold width*height*3 bytes",
            self.width,
            self.height
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Colour conversion
// ------------------------------------------------------------------------------------------------

/// Fractional bits of the YUV -> RGB fixed-point coefficients.
const YUV_SHIFT: u32 = 16;

const fn fixed(c: f64) -> i32 {
    (c * (1u32 << YUV_SHIFT) as f64 + 0.5) as i32
}

/// Integer YUV -> RGB coefficients (value * 2^16, rounded) and the luma offset.
#[derive(Clone, Copy, Debug)]
struct YuvCoeffs {
    y_off: i32,
    cy: i32,
    crv: i32,
    cgu: i32,
    cgv: i32,
    cbu: i32,
}

impl YuvCoeffs {
    const fn from_float(y_off: i32, cy: f64, crv: f64, cgu: f64, cgv: f64, cbu: f64) -> Self {
        YuvCoeffs {
            y_off,
            cy: fixed(cy),
            crv: fixed(crv),
            cgu: fixed(cgu),
            cgv: fixed(cgv),
            cbu: fixed(cbu),
        }
    }

    const fn new(matrix: YuvMatrix, range: YuvRange) -> Self {
        match (matrix, range) {
            (YuvMatrix::Bt601, YuvRange::Limited) => {
                Self::from_float(16, 1.164383, 1.596027, 0.391762, 0.812968, 2.017232)
            }
            (YuvMatrix::Bt709, YuvRange::Limited) => {
                Self::from_float(16, 1.164383, 1.792741, 0.213249, 0.532909, 2.112402)
            }
            (YuvMatrix::Bt601, YuvRange::Full) => {
                Self::from_float(0, 1.0, 1.402, 0.344136, 0.714136, 1.772)
            }
            (YuvMatrix::Bt709, YuvRange::Full) => {
                Self::from_float(0, 1.0, 1.5748, 0.187324, 0.468124, 1.8556)
            }
        }
    }

    /// Converts one row: `luma` (`w` samples), one (U, V) pair per two pixels, into `dst`
    /// (`w * 3` bytes). The chroma terms are computed once per pair.
    #[inline(always)]
    fn convert_row(&self, luma: &[u8], uv: impl Iterator<Item = (u8, u8)>, dst: &mut [u8]) {
        const HALF: i32 = 1 << (YUV_SHIFT - 1);
        let px = |l: u8, (dr, dg, db): (i32, i32, i32), d: &mut [u8]| {
            let yy = (i32::from(l) - self.y_off) * self.cy + HALF;
            d[0] = ((yy + dr) >> YUV_SHIFT).clamp(0, 255) as u8;
            d[1] = ((yy + dg) >> YUV_SHIFT).clamp(0, 255) as u8;
            d[2] = ((yy + db) >> YUV_SHIFT).clamp(0, 255) as u8;
        };
        let chroma = |(u, v): (u8, u8)| {
            let u = i32::from(u) - 128;
            let v = i32::from(v) - 128;
            (self.crv * v, -(self.cgu * u + self.cgv * v), self.cbu * u)
        };
        // Two pixels share one U V pair; an odd width leaves a final single pixel.
        let mut uv = uv.map(chroma);
        let mut pairs = dst.chunks_exact_mut(6);
        let mut lumas = luma.chunks_exact(2);
        for ((d, l), c) in (&mut pairs).zip(&mut lumas).zip(&mut uv) {
            let (d0, d1) = d.split_at_mut(3);
            px(l[0], c, d0);
            px(l[1], c, d1);
        }
        if let (&[l], Some(c)) = (lumas.remainder(), uv.next()) {
            px(l, c, pairs.into_remainder());
        }
    }
}

/// Converts row `y` of `frame` to packed RGB8 in `dst` (`width * 3` bytes).
fn convert_row(frame: &Frame, y: usize, dst: &mut [u8]) {
    let w = frame.width();
    debug_assert_eq!(dst.len(), w * 3);
    match frame.format() {
        PixelFormat::Rgb => dst.copy_from_slice(frame.row(0, y)),
        PixelFormat::Rgba | PixelFormat::Rgbx => {
            for (d, s) in dst.chunks_exact_mut(3).zip(frame.row(0, y).chunks_exact(4)) {
                d.copy_from_slice(&s[..3]);
            }
        }
        PixelFormat::Bgrx | PixelFormat::Bgra => {
            for (d, s) in dst.chunks_exact_mut(3).zip(frame.row(0, y).chunks_exact(4)) {
                d[0] = s[2];
                d[1] = s[1];
                d[2] = s[0];
            }
        }
        PixelFormat::Nv12 => {
            let c = YuvCoeffs::new(frame.matrix(), frame.range());
            let uv = frame.row(1, y / 2).chunks_exact(2).map(|p| (p[0], p[1]));
            c.convert_row(frame.row(0, y), uv, dst);
        }
        PixelFormat::I420 => {
            let c = YuvCoeffs::new(frame.matrix(), frame.range());
            let u = frame.row(1, y / 2).iter().copied();
            let v = frame.row(2, y / 2).iter().copied();
            c.convert_row(frame.row(0, y), u.zip(v), dst);
        }
    }
}

/// Converts a frame to packed RGB8 (colour conversion only, no resize).
///
/// - RGB, RGBA, RGBx: R, G, B are copied (alpha / padding dropped); BGRx, BGRA: swapped.
/// - NV12, I420: pixel (x, y) uses the chroma sample at (x / 2, y / 2) (nearest, no
///   interpolation; odd sizes use the ceil(w/2) x ceil(h/2) chroma planes). With
///   `U' = U - 128`, `V' = V - 128` and integer coefficients `c = round(k * 65536)`:
///
///   ```text
///   Y'' = cy * (Y - y0) + 32768
///   R = clamp((Y'' + cr_v * V')             >> 16, 0, 255)
///   G = clamp((Y'' - cg_u * U' - cg_v * V') >> 16, 0, 255)
///   B = clamp((Y'' + cb_u * U')             >> 16, 0, 255)
///   ```
///
///   (`>>` is an arithmetic shift, i.e. floor; the +32768 makes it round half up), with
///
///   | matrix, range   | y0 | k_y      | k_rv     | k_gu     | k_gv     | k_bu     |
///   |-----------------|----|----------|----------|----------|----------|----------|
///   | BT.601 limited  | 16 | 1.164383 | 1.596027 | 0.391762 | 0.812968 | 2.017232 |
///   | BT.709 limited  | 16 | 1.164383 | 1.792741 | 0.213249 | 0.532909 | 2.112402 |
///   | BT.601 full     | 0  | 1        | 1.402    | 0.344136 | 0.714136 | 1.772    |
///   | BT.709 full     | 0  | 1        | 1.5748   | 0.187324 | 0.468124 | 1.8556   |
///
///   This is the real-valued formula rounded to nearest (to within 2^-16 of a level, from the
///   coefficient rounding). It is pure integer arithmetic so that the GPU pre-processing kernel,
///   which must implement this same formula, produces identical bytes on any device.
pub fn frame_to_rgb(frame: &Frame) -> RgbImage {
    let (w, h) = (frame.width(), frame.height());
    let mut data = vec![0u8; w * h * 3];
    data.par_chunks_mut(w * 3)
        .enumerate()
        .for_each(|(y, dst)| convert_row(frame, y, dst));
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

// ------------------------------------------------------------------------------------------------
// Pillow-exact bilinear resampling (libImaging/Resample.c, 8 bits per channel)
// ------------------------------------------------------------------------------------------------

/// Pillow's `PRECISION_BITS` for 8-bit images: 32 - 8 - 2.
const PRECISION_BITS: u32 = 22;
const ROUND_BIAS: i32 = 1 << (PRECISION_BITS - 1);

/// Fixed-point filter taps of one resampling pass: output `i` reads `len[i]` input pixels from
/// `start[i]`, weighted by `k[i * ksize..][..len[i]]`.
struct Coeffs {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    k: Vec<i32>,
}

impl Coeffs {
    /// Pillow's `precompute_coeffs` with the bilinear (triangle, support 1) filter, followed by
    /// `normalize_coeffs_8bpc`. All arithmetic is in the same f64 operations and order as the C.
    fn bilinear(in_size: usize, out_size: usize) -> Coeffs {
        // `box` is a C float array holding (0, 0, width, height): in1 - in0 is a float.
        let scale = f64::from(in_size as f32) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = 1.0 * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut start = Vec::with_capacity(out_size);
        let mut len = Vec::with_capacity(out_size);
        let mut k = vec![0i32; out_size * ksize];
        let mut w = vec![0f64; ksize];
        let ss = 1.0 / filterscale;
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // (int) casts truncate toward zero; Rust's `as` does too (and saturates).
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
            let n = xmax.clamp(0, ksize as i64) as usize;
            let mut ww = 0.0f64;
            for (x, wx) in w.iter_mut().enumerate().take(n) {
                let t = ((x as i64 + xmin) as f64 - center + 0.5) * ss;
                let t = t.abs();
                *wx = if t < 1.0 { 1.0 - t } else { 0.0 };
                ww += *wx;
            }
            let row = &mut k[xx * ksize..xx * ksize + n];
            for (kx, &wx) in row.iter_mut().zip(&w) {
                let v = if ww != 0.0 { wx / ww } else { wx };
                let f = v * f64::from(1u32 << PRECISION_BITS);
                *kx = if v < 0.0 {
                    (-0.5 + f) as i32
                } else {
                    (0.5 + f) as i32
                };
            }
            start.push(xmin as usize);
            len.push(n);
        }
        Coeffs {
            ksize,
            start,
            len,
            k,
        }
    }

    /// One tap of weight 1.0 per output: what a skipped pass does.
    fn identity(size: usize) -> Coeffs {
        Coeffs {
            ksize: 1,
            start: (0..size).collect(),
            len: vec![1; size],
            k: vec![1 << PRECISION_BITS; size],
        }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let off = i * self.ksize;
        (self.start[i], &self.k[off..off + self.len[i]])
    }

    /// First and one-past-last input index read by any output.
    fn span(&self) -> (usize, usize) {
        match (self.start.first(), self.start.len()) {
            (Some(&first), n) => (first, self.start[n - 1] + self.len[n - 1]),
            _ => (0, 0),
        }
    }
}

/// The integer taps of one resampling pass, as the GPU pre-processing kernel reads them
/// (`src/compute/cuda/kernels/preprocess.cu`): output `i` reads `len[i]` source pixels from
/// `start[i]` with 22-bit fixed-point weights `k[i * ksize..][..len[i]]`. A pass that Pillow
/// skips (size unchanged) is the identity: one tap of weight `2^22` at `start[i] = i`, which the
/// kernel's arithmetic maps to the source value unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassTaps {
    pub ksize: usize,
    pub start: Vec<i32>,
    pub len: Vec<i32>,
    pub k: Vec<i32>,
}

impl PassTaps {
    fn new(in_size: usize, out_size: usize) -> PassTaps {
        let c = if in_size == out_size {
            Coeffs::identity(out_size)
        } else {
            Coeffs::bilinear(in_size, out_size)
        };
        // Sizes are below 2^31: frames are validated and the resized side is at most the input.
        let to_i32 = |v: &[usize]| v.iter().map(|&x| x as i32).collect();
        PassTaps {
            ksize: c.ksize,
            start: to_i32(&c.start),
            len: to_i32(&c.len),
            k: c.k,
        }
    }
}

/// Everything a one-kernel implementation of [`preprocess_into`] needs besides the pixels:
/// the letterbox, both passes' taps and Pillow 13's pass order (see [`resize_bilinear`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ResizePlan {
    pub letterbox: Letterbox,
    /// Horizontal pass: one entry per resized column.
    pub horizontal: PassTaps,
    /// Vertical pass: one entry per resized row.
    pub vertical: PassTaps,
    /// Pillow runs the vertical pass first.
    pub vertical_first: bool,
}

impl ResizePlan {
    /// The plan for a `width` x `height` frame into a square `input_size` input.
    /// Errors as [`Letterbox::new`].
    pub fn new(width: usize, height: usize, input_size: usize) -> Result<ResizePlan> {
        let letterbox = Letterbox::new(width, height, input_size)?;
        let (out_w, out_h) = (letterbox.resized_width, letterbox.resized_height);
        Ok(ResizePlan {
            letterbox,
            horizontal: PassTaps::new(width, out_w),
            vertical: PassTaps::new(height, out_h),
            vertical_first: vertical_first(width, height, out_w, out_h),
        })
    }
}

/// Pillow 13's pass order: vertical first when both passes run and the height shrinks by more
/// than twice as many pixels as the width.
fn vertical_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    in_w != out_w
        && in_h != out_h
        && out_h < in_h
        && (in_h - out_h) as i128 > 2 * (in_w as i128 - out_w as i128)
}

/// The integer YUV -> RGB coefficients [`frame_to_rgb`] uses for a matrix and range:
/// `[y_offset, k_y, k_rv, k_gu, k_gv, k_bu]`, each `k` as `round(k * 2^16)`.
pub fn yuv_coefficients(matrix: YuvMatrix, range: YuvRange) -> [i32; 6] {
    let c = YuvCoeffs::new(matrix, range);
    [c.y_off, c.cy, c.crv, c.cgu, c.cgv, c.cbu]
}

/// The normalisation table [`normalise`] reads: `[channel * 256 + level]`.
pub fn normalisation_table() -> [f32; 768] {
    let mut t = [0f32; 768];
    for (c, table) in NORM_LUT.iter().enumerate() {
        t[c * 256..(c + 1) * 256].copy_from_slice(table);
    }
    t
}

#[inline(always)]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One row of Pillow's `ImagingResampleHorizontal_8bpc` on RGB pixels.
fn resample_row_horizontal(src: &[u8], dst: &mut [u8], c: &Coeffs) {
    for (xx, d) in dst.chunks_exact_mut(3).enumerate() {
        let (xmin, k) = c.taps(xx);
        let px = &src[xmin * 3..(xmin + k.len()) * 3];
        let (mut r, mut g, mut b) = (ROUND_BIAS, ROUND_BIAS, ROUND_BIAS);
        for (p, &kx) in px.chunks_exact(3).zip(k) {
            r += i32::from(p[0]) * kx;
            g += i32::from(p[1]) * kx;
            b += i32::from(p[2]) * kx;
        }
        d[0] = clip8(r);
        d[1] = clip8(g);
        d[2] = clip8(b);
    }
}

/// One output row of Pillow's `ImagingResampleVertical_8bpc`: `rows(y)` gives input row `y`.
/// Integer sums are order-independent, so accumulating tap by tap over a whole row (which
/// vectorises) gives Pillow's per-pixel result exactly.
fn resample_row_vertical<'a>(
    rows: impl Fn(usize) -> &'a [u8],
    yy: usize,
    c: &Coeffs,
    acc: &mut Vec<i32>,
    dst: &mut [u8],
) {
    acc.clear();
    acc.resize(dst.len(), ROUND_BIAS);
    let (ymin, k) = c.taps(yy);
    for (t, &ky) in k.iter().enumerate() {
        for (a, &p) in acc.iter_mut().zip(rows(ymin + t)) {
            *a += i32::from(p) * ky;
        }
    }
    for (d, &a) in dst.iter_mut().zip(acc.iter()) {
        *d = clip8(a);
    }
}

/// Source of RGB8 rows for the resizer: an [`RgbImage`] or a [`Frame`] converted on the fly.
trait RowSource: Sync {
    fn width(&self) -> usize;
    fn height(&self) -> usize;
    /// Row `y` as RGB8 when it already exists in memory in that layout.
    fn direct_row(&self, y: usize) -> Option<&[u8]>;
    /// Writes row `y` as RGB8 into `dst` (`width * 3` bytes).
    fn convert_row(&self, y: usize, dst: &mut [u8]);

    /// Row `y` as RGB8, converted into `scratch` when needed.
    fn row<'s>(&'s self, y: usize, scratch: &'s mut [u8]) -> &'s [u8] {
        match self.direct_row(y) {
            Some(r) => r,
            None => {
                self.convert_row(y, scratch);
                scratch
            }
        }
    }
}

impl RowSource for RgbImage {
    fn width(&self) -> usize {
        self.width
    }
    fn height(&self) -> usize {
        self.height
    }
    fn direct_row(&self, y: usize) -> Option<&[u8]> {
        Some(self.row(y))
    }
    fn convert_row(&self, y: usize, dst: &mut [u8]) {
        dst.copy_from_slice(self.row(y));
    }
}

impl RowSource for Frame<'_> {
    fn width(&self) -> usize {
        Frame::width(self)
    }
    fn height(&self) -> usize {
        Frame::height(self)
    }
    fn direct_row(&self, y: usize) -> Option<&[u8]> {
        (self.format() == PixelFormat::Rgb).then(|| self.row(0, y))
    }
    fn convert_row(&self, y: usize, dst: &mut [u8]) {
        convert_row(self, y, dst);
    }
}

/// Random access to the source rows `y0..y1`: borrowed when the source is RGB8 already,
/// otherwise converted once into a buffer.
enum Rows<'a, S: RowSource> {
    Direct(&'a S),
    Converted {
        data: Vec<u8>,
        y0: usize,
        stride: usize,
    },
}

impl<'a, S: RowSource> Rows<'a, S> {
    fn new(src: &'a S, y0: usize, y1: usize) -> Self {
        if src.direct_row(y0.min(src.height() - 1)).is_some() {
            return Rows::Direct(src);
        }
        let stride = src.width() * 3;
        let mut data = vec![0u8; (y1 - y0) * stride];
        data.par_chunks_mut(stride)
            .enumerate()
            .for_each(|(i, dst)| src.convert_row(y0 + i, dst));
        Rows::Converted { data, y0, stride }
    }

    fn get(&self, y: usize) -> &[u8] {
        match self {
            Rows::Direct(src) => src.direct_row(y).expect("direct source"),
            Rows::Converted { data, y0, stride } => {
                let at = (y - y0) * stride;
                &data[at..at + stride]
            }
        }
    }
}

/// Pillow's `ImagingResampleInner` for 8-bit RGB with the bilinear filter and no box: a separable
/// two-pass resize that skips a pass whose size does not change. Pillow 13 runs the vertical pass
/// first when the height shrinks by more than twice as many pixels as the width does
/// (`out_h < in_h && in_h - out_h > 2 * (in_w - out_w)`), the horizontal pass first otherwise;
/// the order changes rounding, so it is reproduced (established empirically against Pillow
/// 13.0.0 over thousands of size combinations; earlier Pillow always went horizontal first).
fn resize_source<S: RowSource>(src: &S, out_w: usize, out_h: usize) -> RgbImage {
    let (in_w, in_h) = (src.width(), src.height());
    let mut out = RgbImage {
        width: out_w,
        height: out_h,
        data: vec![0u8; out_w * out_h * 3],
    };
    if out_w == 0 || out_h == 0 || in_w == 0 || in_h == 0 {
        return out;
    }
    let out_stride = out_w * 3;
    let need_h = in_w != out_w;
    let need_v = in_h != out_h;
    let vertical_first = vertical_first(in_w, in_h, out_w, out_h);

    match (need_h, need_v) {
        (false, false) => {
            out.data
                .par_chunks_mut(out_stride)
                .enumerate()
                .for_each(|(y, dst)| match src.direct_row(y) {
                    Some(r) => dst.copy_from_slice(r),
                    None => src.convert_row(y, dst),
                });
        }
        (true, false) => {
            let ch = Coeffs::bilinear(in_w, out_w);
            out.data
                .par_chunks_mut(out_stride)
                .enumerate()
                .for_each_init(
                    || vec![0u8; in_w * 3],
                    |scratch, (y, dst)| {
                        resample_row_horizontal(src.row(y, scratch), dst, &ch);
                    },
                );
        }
        (false, true) => {
            let cv = Coeffs::bilinear(in_h, out_h);
            let (y0, y1) = cv.span();
            let rows = Rows::new(src, y0, y1);
            out.data
                .par_chunks_mut(out_stride)
                .enumerate()
                .for_each_init(Vec::new, |acc, (yy, dst)| {
                    resample_row_vertical(|y| rows.get(y), yy, &cv, acc, dst)
                });
        }
        (true, true) if !vertical_first => {
            // Horizontal pass over the source rows the vertical pass will read, into an
            // `out_w`-wide intermediate (uint8, as in Pillow), then the vertical pass.
            let ch = Coeffs::bilinear(in_w, out_w);
            let cv = Coeffs::bilinear(in_h, out_h);
            let (y0, y1) = cv.span();
            let mut tmp = vec![0u8; (y1 - y0) * out_stride];
            tmp.par_chunks_mut(out_stride).enumerate().for_each_init(
                || vec![0u8; in_w * 3],
                |scratch, (i, dst)| {
                    resample_row_horizontal(src.row(y0 + i, scratch), dst, &ch);
                },
            );
            let tmp_row = |y: usize| &tmp[(y - y0) * out_stride..(y - y0 + 1) * out_stride];
            out.data
                .par_chunks_mut(out_stride)
                .enumerate()
                .for_each_init(Vec::new, |acc, (yy, dst)| {
                    resample_row_vertical(tmp_row, yy, &cv, acc, dst)
                });
        }
        (true, true) => {
            // Vertical pass first into an `in_w`-wide, `out_h`-tall intermediate.
            let ch = Coeffs::bilinear(in_w, out_w);
            let cv = Coeffs::bilinear(in_h, out_h);
            let (y0, y1) = cv.span();
            let rows = Rows::new(src, y0, y1);
            let tmp_stride = in_w * 3;
            let mut tmp = vec![0u8; out_h * tmp_stride];
            tmp.par_chunks_mut(tmp_stride)
                .enumerate()
                .for_each_init(Vec::new, |acc, (yy, dst)| {
                    resample_row_vertical(|y| rows.get(y), yy, &cv, acc, dst)
                });
            out.data
                .par_chunks_mut(out_stride)
                .zip(tmp.par_chunks(tmp_stride))
                .for_each(|(dst, src_row)| resample_row_horizontal(src_row, dst, &ch));
        }
    }
    out
}

/// Resizes an RGB8 image to `width` x `height` exactly as Pillow 13's
/// `Image.resize((width, height), Image.BILINEAR)` does on a mode "RGB" image (default `box`,
/// `reducing_gap=None`): a separable triangle filter whose support grows with the down-scale
/// factor (antialiasing), 22-bit fixed-point taps, a uint8 intermediate between the two passes,
/// and Pillow 13's choice of pass order: vertical first when the height shrinks by more than
/// twice as many pixels as the width (`out_h < in_h && in_h - out_h > 2 * (in_w - out_w)`),
/// horizontal first otherwise (Pillow < 13 always went horizontal first; the order changes
/// rounding). A dimension that does not change skips its pass; same size returns a copy.
///
/// A zero `width` or `height` gives an empty image, as does an empty source (all zero bytes).
///
/// # Panics
/// If `src.data.len() != src.width * src.height * 3` (use [`RgbImage::new`] to validate).
pub fn resize_bilinear(src: &RgbImage, width: usize, height: usize) -> RgbImage {
    src.check("resize_bilinear");
    resize_source(src, width, height)
}

// ------------------------------------------------------------------------------------------------
// Letterbox + normalisation
// ------------------------------------------------------------------------------------------------

/// `NORM_LUT[c][p]` = `(p as f32 - mean) / std` with effdet's f32 `mean = f32(255 * MEAN[c])`,
/// `std = f32(255 * STD[c])` (products in f64, like the Python list comprehension), and a true
/// f32 division, like torch's `sub_` / `div_`.
static NORM_LUT: LazyLock<[[f32; 256]; 3]> = LazyLock::new(|| {
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        let mean = (MEAN_F64[c] * 255.0) as f32;
        let std = (STD_F64[c] * 255.0) as f32;
        for (p, v) in table.iter_mut().enumerate() {
            *v = (p as f32 - mean) / std;
        }
    }
    lut
});

/// The normalised value of channel `c` (0 = R, 1 = G, 2 = B) at 8-bit level `p`, computed the
/// way effdet's `PrefetchLoader` does in float32: `(p as f32 - mean) / std` with
/// `mean = (255.0 * MEAN[c]) as f32`, `std = (255.0 * STD[c]) as f32` (products in f64, as the
/// Python list comprehension computes them, then rounded once to f32; note that
/// `0.224f32 * 255f32 != (0.224 * 255.0) as f32`) and a true f32 division (no reciprocal).
/// Channel `c` must be below 3 (panics otherwise).
pub fn normalise(c: usize, p: u8) -> f32 {
    NORM_LUT[c][usize::from(p)]
}

fn check_out_len(out: &[f32], input_size: usize) -> Result<()> {
    let want = input_size
        .checked_mul(input_size)
        .and_then(|v| v.checked_mul(3));
    if want != Some(out.len()) {
        return Err(Error::InvalidArgument(format!(
            "output buffer holds {} f32, a 3x{input_size}x{input_size} network input needs {}",
            out.len(),
            want.map_or_else(|| "more than usize::MAX".to_string(), |n| n.to_string())
        )));
    }
    Ok(())
}

/// Pad + normalise an already-resized RGB8 image (top-left placed), used by tests and by
/// [`preprocess_into`]: writes CHW `f32` `[3, input_size, input_size]` into `out`, pixels outside
/// the image taking [`FILL_RGB`] (which normalises to about 0), every value normalised as
/// [`normalise`] describes.
///
/// Errors ([`Error::InvalidArgument`]): `input_size` 0; `out.len() != 3 * input_size^2`; an image
/// wider or taller than `input_size`, or whose `data` is not `width * height * 3` bytes.
pub fn letterbox_normalise_into(
    resized: &RgbImage,
    input_size: usize,
    out: &mut [f32],
) -> Result<()> {
    if input_size == 0 {
        return Err(Error::InvalidArgument(
            "network input size must be at least 1 pixel".into(),
        ));
    }
    check_out_len(out, input_size)?;
    let (w, h) = (resized.width, resized.height);
    if w > input_size || h > input_size {
        return Err(Error::InvalidArgument(format!(
            "resized image {w}x{h} does not fit in a {input_size}x{input_size} input"
        )));
    }
    if w.checked_mul(h).and_then(|v| v.checked_mul(3)) != Some(resized.data.len()) {
        return Err(Error::InvalidArgument(format!(
            "RGB image {w}x{h} must hold {w}*{h}*3 bytes, not {}",
            resized.data.len()
        )));
    }
    let lut = &*NORM_LUT;
    // One parallel item = one row of one channel plane.
    out.par_chunks_mut(input_size)
        .enumerate()
        .for_each(|(i, dst)| {
            let (c, y) = (i / input_size, i % input_size);
            let table = &lut[c];
            let fill = table[usize::from(FILL_RGB[c])];
            let valid = if y < h { w } else { 0 };
            if valid > 0 {
                let src = &resized.data[y * w * 3..(y + 1) * w * 3];
                for (d, px) in dst[..valid].iter_mut().zip(src.chunks_exact(3)) {
                    *d = table[usize::from(px[c])];
                }
            }
            dst[valid..].fill(fill);
        });
    Ok(())
}

/// Full pipeline: frame -> CHW f32 [3, input_size, input_size], normalised, letterboxed.
///
/// Equivalent to `letterbox_normalise_into(&resize_bilinear(&frame_to_rgb(frame), w, h), ..)`
/// with `(w, h)` from [`Letterbox::new`], i.e. effdet's `ResizePad` + `PrefetchLoader` on the
/// frame's RGB image, but converts only the rows the resize reads and streams them through the
/// horizontal pass. Returns the [`Letterbox`] needed to map detections back to the frame.
///
/// Errors ([`Error::InvalidArgument`]): `input_size` 0 or absurdly large, or
/// `out.len() != 3 * input_size * input_size`. Any validated [`Frame`] is accepted, including
/// ones so elongated that effdet would crash (the resized side is clamped to 1 pixel).
pub fn preprocess_into(frame: &Frame, input_size: usize, out: &mut [f32]) -> Result<Letterbox> {
    let lb = Letterbox::new(frame.width(), frame.height(), input_size)?;
    check_out_len(out, input_size)?;
    let resized = resize_source(frame, lb.resized_width, lb.resized_height);
    letterbox_normalise_into(&resized, input_size, out)?;
    Ok(lb)
}

/// [`preprocess_into`] into a newly allocated `Vec` of `3 * input_size * input_size` values.
pub fn preprocess(frame: &Frame, input_size: usize) -> Result<(Vec<f32>, Letterbox)> {
    let lb = Letterbox::new(frame.width(), frame.height(), input_size)?;
    let mut out = vec![0f32; lb.input_len()];
    preprocess_into(frame, input_size, &mut out)?;
    Ok((out, lb))
}
