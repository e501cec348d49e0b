//! Borrowed views of raw video frames (the formats GStreamer hands the `effdet` element), with
//! validation of sizes, strides and plane offsets so later stages can index without checks failing.

use crate::error::{Error, Result};

/// Pixel layouts the detector accepts. Names follow GStreamer's `video/x-raw` formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    /// 3 bytes per pixel, R G B.
    Rgb,
    /// 4 bytes per pixel, R G B A (alpha ignored).
    Rgba,
    /// 4 bytes per pixel, R G B x (padding byte ignored).
    Rgbx,
    /// 4 bytes per pixel, B G R x.
    Bgrx,
    /// 4 bytes per pixel, B G R A.
    Bgra,
    /// Y plane, then one interleaved U V plane at half resolution in both directions.
    Nv12,
    /// Y plane, U plane, V plane; U and V at half resolution in both directions.
    I420,
}

impl PixelFormat {
    /// All supported formats, in a stable order (used by tests and by caps negotiation).
    pub const ALL: [PixelFormat; 7] = [
        PixelFormat::Rgb,
        PixelFormat::Rgba,
        PixelFormat::Rgbx,
        PixelFormat::Bgrx,
        PixelFormat::Bgra,
        PixelFormat::Nv12,
        PixelFormat::I420,
    ];

    /// The GStreamer format name (`RGB`, `NV12`, ...).
    pub fn name(self) -> &'static str {
        match self {
            PixelFormat::Rgb => "RGB",
            PixelFormat::Rgba => "RGBA",
            PixelFormat::Rgbx => "RGBx",
            PixelFormat::Bgrx => "BGRx",
            PixelFormat::Bgra => "BGRA",
            PixelFormat::Nv12 => "NV12",
            PixelFormat::I420 => "I420",
        }
    }

    /// Parses a GStreamer format name (case-sensitive, as in caps).
    pub fn from_name(name: &str) -> Option<PixelFormat> {
        PixelFormat::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Number of planes in memory.
    pub fn num_planes(self) -> usize {
        match self {
            PixelFormat::Nv12 => 2,
            PixelFormat::I420 => 3,
            _ => 1,
        }
    }

    /// True for the planar YUV formats.
    pub fn is_yuv(self) -> bool {
        matches!(self, PixelFormat::Nv12 | PixelFormat::I420)
    }

    /// Bytes per pixel of a packed RGB format; `None` for planar YUV.
    pub fn bytes_per_pixel(self) -> Option<usize> {
        match self {
            PixelFormat::Rgb => Some(3),
            PixelFormat::Rgba | PixelFormat::Rgbx | PixelFormat::Bgrx | PixelFormat::Bgra => {
                Some(4)
            }
            PixelFormat::Nv12 | PixelFormat::I420 => None,
        }
    }

    /// (row bytes, rows) of plane `plane` for a `width` x `height` frame.
    pub fn plane_extent(self, plane: usize, width: usize, height: usize) -> (usize, usize) {
        let cw = width.div_ceil(2);
        let ch = height.div_ceil(2);
        match (self, plane) {
            (PixelFormat::Nv12, 0) | (PixelFormat::I420, 0) => (width, height),
            (PixelFormat::Nv12, _) => (2 * cw, ch),
            (PixelFormat::I420, _) => (cw, ch),
            (f, _) => (width * f.bytes_per_pixel().unwrap_or(1), height),
        }
    }

    /// Tightly packed strides (no row padding), one per plane.
    pub fn packed_strides(self, width: usize) -> Vec<usize> {
        (0..self.num_planes())
            .map(|p| self.plane_extent(p, width, 1).0)
            .collect()
    }
}

impl std::fmt::Display for PixelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The YUV -> RGB matrix of a YUV frame (GStreamer's `colorimetry` matrix).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum YuvMatrix {
    /// ITU-R BT.601 (SD video, most webcams).
    #[default]
    Bt601,
    /// ITU-R BT.709 (HD video).
    Bt709,
}

/// Whether YUV values use the limited (16..235 / 16..240) or full (0..255) range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum YuvRange {
    #[default]
    Limited,
    Full,
}

/// A borrowed, validated video frame: format, size, and the planes inside one byte buffer.
///
/// Construction checks that every row of every plane lies inside `data`, so a frame shorter than
/// its declared size and strides is an [`Error::InvalidFrame`], never an out-of-bounds panic later.
#[derive(Clone, Debug)]
pub struct Frame<'a> {
    format: PixelFormat,
    width: usize,
    height: usize,
    /// Each plane's bytes, starting at its first row (unused planes are empty).
    planes: [&'a [u8]; 3],
    strides: [usize; 3],
    matrix: YuvMatrix,
    range: YuvRange,
}

impl<'a> Frame<'a> {
    /// A frame whose planes start at `offsets` in `data` with row `strides` (bytes), one entry per
    /// plane (as `GstVideoInfo` describes them).
    pub fn new(
        format: PixelFormat,
        width: usize,
        height: usize,
        data: &'a [u8],
        strides: &[usize],
        offsets: &[usize],
    ) -> Result<Self> {
        if offsets.len() != format.num_planes() {
            return Err(Error::InvalidFrame(format!(
                "{format} has {} plane(s) but {} stride(s) and {} offset(s) were given",
                format.num_planes(),
                strides.len(),
                offsets.len()
            )));
        }
        let mut planes: [&'a [u8]; 3] = [&[]; 3];
        for (p, &off) in offsets.iter().enumerate() {
            planes[p] = data.get(off..).unwrap_or(&[]);
        }
        Self::from_planes(format, width, height, &planes[..offsets.len()], strides).map_err(|e| {
            match e {
                Error::InvalidFrame(msg) => {
                    Error::InvalidFrame(format!("{msg} (buffer of {} bytes)", data.len()))
                }
                other => other,
            }
        })
    }

    /// A frame from one byte slice per plane (each starting at the plane's first row) and the
    /// planes' row strides: what a mapped GStreamer video frame provides, where planes may live
    /// in separate memories.
    pub fn from_planes(
        format: PixelFormat,
        width: usize,
        height: usize,
        planes: &[&'a [u8]],
        strides: &[usize],
    ) -> Result<Self> {
        if width == 0 || height == 0 {
            return Err(Error::InvalidFrame(format!(
                "{format} frame has zero size ({width}x{height})"
            )));
        }
        let n = format.num_planes();
        if strides.len() != n || planes.len() != n {
            return Err(Error::InvalidFrame(format!(
                "{format} has {n} plane(s) but {} stride(s) and {} plane buffer(s) were given",
                strides.len(),
                planes.len()
            )));
        }
        let mut s = [0usize; 3];
        let mut pl: [&'a [u8]; 3] = [&[]; 3];
        for p in 0..n {
            let (row_bytes, rows) = format.plane_extent(p, width, height);
            if strides[p] < row_bytes {
                return Err(Error::InvalidFrame(format!(
                    "{format} {width}x{height}: plane {p} stride {} is smaller than its row of {row_bytes} bytes",
                    strides[p]
                )));
            }
            let end = strides[p]
                .checked_mul(rows - 1)
                .and_then(|v| v.checked_add(row_bytes));
            match end {
                Some(end) if end <= planes[p].len() => {}
                _ => {
                    return Err(Error::InvalidFrame(format!(
                        "{format} {width}x{height}: plane {p} (stride {}, {rows} rows) needs more than the {} bytes given",
                        strides[p],
                        planes[p].len()
                    )));
                }
            }
            s[p] = strides[p];
            pl[p] = planes[p];
        }
        Ok(Frame {
            format,
            width,
            height,
            planes: pl,
            strides: s,
            matrix: YuvMatrix::default(),
            range: YuvRange::default(),
        })
    }

    /// A tightly packed frame: planes one after another with no row padding.
    pub fn packed(
        format: PixelFormat,
        width: usize,
        height: usize,
        data: &'a [u8],
    ) -> Result<Self> {
        let strides = format.packed_strides(width);
        let mut offsets = Vec::with_capacity(strides.len());
        let mut at = 0usize;
        for (p, stride) in strides.iter().enumerate() {
            offsets.push(at);
            at += stride * format.plane_extent(p, width, height).1;
        }
        Frame::new(format, width, height, data, &strides, &offsets)
    }

    /// Sets the YUV matrix and range (ignored for RGB formats).
    pub fn with_colorimetry(mut self, matrix: YuvMatrix, range: YuvRange) -> Self {
        self.matrix = matrix;
        self.range = range;
        self
    }

    pub fn format(&self) -> PixelFormat {
        self.format
    }
    pub fn width(&self) -> usize {
        self.width
    }
    pub fn height(&self) -> usize {
        self.height
    }
    pub fn matrix(&self) -> YuvMatrix {
        self.matrix
    }
    pub fn range(&self) -> YuvRange {
        self.range
    }
    /// Plane `p`'s bytes from its first row (empty for planes the format does not have).
    pub fn plane(&self, p: usize) -> &'a [u8] {
        self.planes[p]
    }
    /// Row stride of plane `p` in bytes.
    pub fn stride(&self, p: usize) -> usize {
        self.strides[p]
    }
    /// Row `y` of plane `p` (exactly the plane's row bytes, without stride padding).
    /// `y` must be below the plane's row count; validated frames make that the only precondition.
    pub fn row(&self, p: usize, y: usize) -> &'a [u8] {
        let (row_bytes, _) = self.format.plane_extent(p, self.width, self.height);
        let start = y * self.strides[p];
        &self.planes[p][start..start + row_bytes]
    }
}
