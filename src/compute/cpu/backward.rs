//! Backward (gradient) kernels of the CPU engine: for every forward op the model uses, the
//! vector-Jacobian product given the gradient of the loss with respect to the op's output.
//!
//! These are the CPU reference the training tape calls and a CUDA backend must match, checked
//! against f64 finite differences. Most are direct loops that mirror the forward definitions.
//! Convolutions, where training spends its time, have f32 fast paths (GEMMs for pointwise and
//! dense convolutions, tight plane loops for depthwise ones) behind [`conv2d_backward`]; the
//! direct f64 loops stay available as [`conv2d_backward_reference`], the oracle they are tested
//! against.
//!
//! Conventions: activations NCHW, conv weights `[out, in / groups, kh, kw]`, TF-SAME padding
//! resolved exactly as the forward does ([`Padding::resolve`]).

use rayon::prelude::*;

use super::SharedOut;
use super::simd::{self, PaddedPlane};
use crate::compute::{Activation, ConvSpec, Padding, Tensor};
use crate::error::{Error, Result};

fn shape_err(op: &'static str, detail: String) -> Error {
    Error::Shape { op, detail }
}

fn check_same(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(shape_err(
            op,
            format!("shapes differ: {:?} vs {:?}", a.shape(), b.shape()),
        ));
    }
    Ok(())
}

/// Gradients of a convolution: with respect to its input, weight and (summed) bias.
#[derive(Debug, Clone)]
pub struct ConvGrads {
    pub input: Tensor,
    pub weight: Tensor,
    pub bias: Tensor,
}

/// Validated shape of a convolution backward: input, weight, output gradient and the padding
/// resolved exactly as the forward resolves it.
#[derive(Clone, Copy, Debug)]
struct ConvGeom {
    n: usize,
    cin: usize,
    cout: usize,
    /// Input channels per group (the weight's second dimension).
    cin_g: usize,
    groups: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    /// Top, bottom, left, right, from [`Padding::resolve`].
    pads: [usize; 4],
}

impl ConvGeom {
    fn new(x: &Tensor, weight: &Tensor, spec: ConvSpec, grad_out: &Tensor) -> Result<Self> {
        let [n, cin, h, w] = x.dims4("conv2d_backward")?;
        let [cout, cin_g, kh, kw] = weight.dims4("conv2d_backward weight")?;
        let g = spec.groups;
        if g == 0 || cin % g != 0 || cout % g != 0 || cin / g != cin_g || spec.stride == 0 {
            return Err(shape_err(
                "conv2d_backward",
                format!(
                    "input {cin} channels, weight {:?}, groups {g}, stride {}",
                    weight.shape(),
                    spec.stride
                ),
            ));
        }
        let (oh, pt, pb) = spec.padding.resolve(h, kh, spec.stride, true);
        let (ow, pl, pr) = spec.padding.resolve(w, kw, spec.stride, false);
        if grad_out.shape() != [n, cout, oh, ow] {
            return Err(shape_err(
                "conv2d_backward",
                format!(
                    "output gradient {:?}, expected [{n}, {cout}, {oh}, {ow}]",
                    grad_out.shape()
                ),
            ));
        }
        Ok(ConvGeom {
            n,
            cin,
            cout,
            cin_g,
            groups: g,
            h,
            w,
            oh,
            ow,
            kh,
            kw,
            stride: spec.stride,
            pads: [pt, pb, pl, pr],
        })
    }

    /// Packs the three gradient buffers into tensors of the input, weight and bias shapes.
    fn grads(&self, gx: Vec<f32>, gw: Vec<f32>, gb: Vec<f32>) -> Result<ConvGrads> {
        let ConvGeom {
            n,
            cin,
            cout,
            cin_g,
            h,
            w,
            kh,
            kw,
            ..
        } = *self;
        Ok(ConvGrads {
            input: Tensor::new(vec![n, cin, h, w], gx)?,
            weight: Tensor::new(vec![cout, cin_g, kh, kw], gw)?,
            bias: Tensor::new(vec![cout], gb)?,
        })
    }
}

/// Backward of `conv2d(x, w) + b` (no activation or residual: apply [`activation_backward`] to
/// the output gradient first; a residual's gradient is the output gradient itself).
/// Any groups, stride and padding (TF-SAME resolved exactly as the forward does).
///
/// Dispatches on the convolution's shape to an f32 fast path, each parallelised with rayon in the
/// current thread pool (install the backend's pool to bound it):
/// - pointwise (1x1, stride 1, no padding, 1 group): two GEMMs per column tile of each image,
///   `dX = W^T dY` and `dW += dY X^T` (`pointwise_backward`);
/// - depthwise (`groups == in == out channels`), any kernel and stride: direct loops over
///   zero-padded planes, one task per (image, channel) plane (`depthwise_backward`);
/// - any other single-group convolution (the 3x3 stride-2 stem): im2col + GEMM for `dW` and
///   GEMM + col2im for `dX` (`im2col_backward`).
///
/// Other shapes (grouped convolutions that are not depthwise, or empty tensors) fall back to
/// [`conv2d_backward_reference`]. GEMMs accumulate in f32 like PyTorch's CPU kernels (their
/// per-thread weight-gradient partials are added in f64); bias gradients and the row sums of
/// depthwise weight gradients are accumulated in f64. Results are deterministic for a given
/// thread count.
pub fn conv2d_backward(
    x: &Tensor,
    weight: &Tensor,
    spec: ConvSpec,
    grad_out: &Tensor,
) -> Result<ConvGrads> {
    let g = ConvGeom::new(x, weight, spec, grad_out)?;
    let (xd, wd, gd) = (x.data(), weight.data(), grad_out.data());
    let empty = [g.n, g.cin, g.cout, g.h, g.w, g.oh, g.ow, g.kh, g.kw].contains(&0);
    let (gx, gw, gb) = if empty {
        conv_backward_direct(xd, wd, gd, &g)
    } else if g.groups == 1 && g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pads == [0; 4] {
        pointwise_backward(xd, wd, gd, &g)
    } else if g.groups == g.cin && g.cin_g == 1 && g.cout == g.cin {
        depthwise_backward(xd, wd, gd, &g)
    } else if g.groups == 1 {
        im2col_backward(xd, wd, gd, &g)
    } else {
        conv_backward_direct(xd, wd, gd, &g)
    };
    g.grads(gx, gw, gb)
}

/// The slow reference backward of a convolution: direct loops mirroring the forward definition,
/// accumulating in f64, for any groups, stride and padding. Kept as the oracle the fast paths of
/// [`conv2d_backward`] are tested against (itself checked against finite differences) and as
/// their fallback; far too slow for training.
pub fn conv2d_backward_reference(
    x: &Tensor,
    weight: &Tensor,
    spec: ConvSpec,
    grad_out: &Tensor,
) -> Result<ConvGrads> {
    let g = ConvGeom::new(x, weight, spec, grad_out)?;
    let (gx, gw, gb) = conv_backward_direct(x.data(), weight.data(), grad_out.data(), &g);
    g.grads(gx, gw, gb)
}

/// Gradient buffers of a convolution backward: input, weight, bias.
type GradBufs = (Vec<f32>, Vec<f32>, Vec<f32>);

/// The direct f64 loops behind [`conv2d_backward_reference`].
fn conv_backward_direct(xd: &[f32], wd: &[f32], gd: &[f32], g: &ConvGeom) -> GradBufs {
    let ConvGeom {
        n,
        cin,
        cout,
        cin_g,
        groups,
        h,
        w,
        oh,
        ow,
        kh,
        kw,
        stride: s,
        pads: [pt, _, pl, _],
    } = *g;
    let opg = cout / groups;
    // Input position of output (oy, ox) and tap (ky, kx), if inside the image.
    let at = |oy: usize, ox: usize, ky: usize, kx: usize| -> Option<(usize, usize)> {
        let iy = (oy * s + ky) as isize - pt as isize;
        let ix = (ox * s + kx) as isize - pl as isize;
        (iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w)
            .then_some((iy as usize, ix as usize))
    };

    // dW[co, ci, ky, kx] = sum_{n, oy, ox} dY[n, co, oy, ox] * X[n, group(co) * cin_g + ci, iy, ix]
    let mut gw = vec![0f32; cout * cin_g * kh * kw];
    if cin_g * kh * kw > 0 {
        gw.par_chunks_mut(cin_g * kh * kw)
            .enumerate()
            .for_each(|(co, out)| {
                let gi = co / opg;
                for b in 0..n {
                    let dy = &gd[(b * cout + co) * oh * ow..(b * cout + co + 1) * oh * ow];
                    for ci in 0..cin_g {
                        let plane = &xd[(b * cin + gi * cin_g + ci) * h * w
                            ..(b * cin + gi * cin_g + ci + 1) * h * w];
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let mut acc = 0f64;
                                for oy in 0..oh {
                                    for ox in 0..ow {
                                        if let Some((iy, ix)) = at(oy, ox, ky, kx) {
                                            acc +=
                                                dy[oy * ow + ox] as f64 * plane[iy * w + ix] as f64;
                                        }
                                    }
                                }
                                out[(ci * kh + ky) * kw + kx] += acc as f32;
                            }
                        }
                    }
                }
            });
    }

    // dB[co] = sum_{n, oy, ox} dY
    let gb: Vec<f32> = (0..cout)
        .map(|co| {
            (0..n)
                .map(|b| {
                    gd[(b * cout + co) * oh * ow..(b * cout + co + 1) * oh * ow]
                        .iter()
                        .map(|&v| v as f64)
                        .sum::<f64>()
                })
                .sum::<f64>() as f32
        })
        .collect();

    // dX[b, c, iy, ix] = sum over the outputs and taps that read it.
    let mut gx = vec![0f32; n * cin * h * w];
    if h * w > 0 {
        gx.par_chunks_mut(h * w).enumerate().for_each(|(p, out)| {
            let (b, c) = (p / cin, p % cin);
            let gi = c / cin_g;
            let ci = c % cin_g;
            let mut acc = vec![0f64; h * w];
            for co in gi * opg..(gi + 1) * opg {
                let dy = &gd[(b * cout + co) * oh * ow..(b * cout + co + 1) * oh * ow];
                let k = &wd[(co * cin_g + ci) * kh * kw..(co * cin_g + ci + 1) * kh * kw];
                for oy in 0..oh {
                    for ox in 0..ow {
                        let d = dy[oy * ow + ox] as f64;
                        if d == 0.0 {
                            continue;
                        }
                        for ky in 0..kh {
                            for kx in 0..kw {
                                if let Some((iy, ix)) = at(oy, ox, ky, kx) {
                                    acc[iy * w + ix] += d * k[ky * kw + kx] as f64;
                                }
                            }
                        }
                    }
                }
            }
            out.iter_mut().zip(&acc).for_each(|(o, a)| *o = *a as f32);
        });
    }
    (gx, gw, gb)
}

// ---------------------------------------------------------------------------------------------
// Fast paths: shared helpers.

/// GEMMs (in total, per parallel region) smaller than this many multiply-adds run single-threaded.
const GEMM_PAR_MIN: usize = 1 << 18;

/// Element strides of a GEMM operand: element `(i, j)` lives at `i * row + j * col`.
#[derive(Clone, Copy, Debug)]
struct Strides {
    row: usize,
    col: usize,
}

impl Strides {
    /// Row-major with `row` elements between rows.
    const fn rows(row: usize) -> Self {
        Strides { row, col: 1 }
    }

    /// Row-major storage read transposed: element `(i, j)` of the view is element `(j, i)` of a
    /// row-major matrix with `row` elements between rows.
    const fn transposed(row: usize) -> Self {
        Strides { row: 1, col: row }
    }

    /// How many elements from the first a `rows x cols` matrix with these strides spans.
    fn span(self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * self.row + (cols - 1) * self.col + 1
        }
    }
}

/// `dst = lhs * rhs`, or `dst += lhs * rhs` when `accumulate`, for an `m x k` lhs and a `k x n`
/// rhs: f32 with f32 accumulation (the `gemm` crate, as the forward). `dst` is row-major with
/// `dst_row` elements between rows and `dst_len` elements valid from `dst`.
///
/// # Safety
/// `dst` must be valid for reads and writes of `dst_len` elements, no other thread may access the
/// `m x n` elements this call writes while it runs, and they must not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    dst: *mut f32,
    dst_row: usize,
    dst_len: usize,
    accumulate: bool,
    (lhs, ls): (&[f32], Strides),
    (rhs, rs): (&[f32], Strides),
    [m, n, k]: [usize; 3],
    par: gemm::Parallelism,
) {
    // Bounds of all three operands: a failure is a bug in this module, not bad input.
    assert!(
        Strides::rows(dst_row).span(m, n) <= dst_len
            && ls.span(m, k) <= lhs.len()
            && rs.span(k, n) <= rhs.len(),
        "conv2d_backward: GEMM operand out of bounds"
    );
    // SAFETY: the assertion keeps every access inside the three buffers (strides are element
    // offsets of in-bounds positions, so the isize casts cannot overflow); the caller guarantees
    // exclusive access to the written part of `dst` and no overlap with the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row as isize,
            accumulate,
            lhs.as_ptr(),
            ls.col as isize,
            ls.row as isize,
            rhs.as_ptr(),
            rs.col as isize,
            rs.row as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Safe [`gemm_raw`] into a slice.
fn gemm_into(
    dst: &mut [f32],
    dst_row: usize,
    accumulate: bool,
    lhs: (&[f32], Strides),
    rhs: (&[f32], Strides),
    mnk: [usize; 3],
    par: gemm::Parallelism,
) {
    // SAFETY: `dst` is an exclusive borrow of `dst.len()` elements, so nothing else reads or
    // writes it and it cannot overlap the shared borrows `lhs` and `rhs`.
    unsafe {
        gemm_raw(
            dst.as_mut_ptr(),
            dst_row,
            dst.len(),
            accumulate,
            lhs,
            rhs,
            mnk,
            par,
        );
    }
}

/// How a list of equal GEMM tasks is spread over the thread pool: `groups` contiguous runs of
/// tasks execute in parallel, each accumulating its own weight-gradient partial (summed in a fixed
/// order afterwards, so results do not depend on scheduling). Up to four groups per thread let
/// rayon balance the load; when there are fewer tasks than threads, each GEMM also gets a share
/// of the threads.
#[derive(Clone, Copy, Debug)]
struct Plan {
    groups: usize,
    tasks: usize,
    par: gemm::Parallelism,
}

impl Plan {
    /// `tasks` tasks of about `task_work` multiply-adds each.
    fn new(tasks: usize, task_work: usize) -> Self {
        let threads = rayon::current_num_threads().max(1);
        if threads == 1 || tasks.saturating_mul(task_work) < GEMM_PAR_MIN {
            return Plan {
                groups: 1,
                tasks,
                par: gemm::Parallelism::None,
            };
        }
        let groups = tasks.clamp(1, 4 * threads);
        let inner = threads / groups;
        let par = if inner > 1 && task_work >= GEMM_PAR_MIN {
            gemm::Parallelism::Rayon(inner)
        } else {
            gemm::Parallelism::None
        };
        Plan { groups, tasks, par }
    }

    /// The tasks of group `g`.
    fn range(&self, g: usize) -> std::ops::Range<usize> {
        g * self.tasks / self.groups..(g + 1) * self.tasks / self.groups
    }
}

/// Columns per task when a GEMM is tiled over the columns (pixels) of an image: about 256 KB per
/// operand tile, like the forward, so the tile stays in L2 between the GEMMs that read it; small
/// enough for at least two tasks per thread when the batch allows; but at least 256 columns, the
/// depth of the weight-gradient GEMM (shallower ones spend their time on the accumulator).
/// A multiple of 16 (aligned tiles) unless it is the whole image.
fn column_block(n: usize, cols: usize, channels: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_cache = 65_536 / channels.max(1);
    let by_threads = (n * cols).div_ceil(2 * threads);
    (by_cache.min(by_threads).max(256) / 16 * 16)
        .min(cols)
        .max(1)
}

/// Sums `parts` (consecutive partials of `len` values each) in f64, adding the partials in order
/// so the result does not depend on scheduling; parallel over runs of values.
fn sum_partials<T: Copy + Into<f64> + Sync>(parts: &[T], len: usize) -> Vec<f32> {
    const RUN: usize = 4096;
    let mut out = vec![0f32; len];
    out.par_chunks_mut(RUN).enumerate().for_each(|(r, out)| {
        let mut acc = vec![0f64; out.len()];
        for part in parts.chunks_exact(len) {
            for (a, &v) in acc.iter_mut().zip(&part[r * RUN..]) {
                *a += v.into();
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = *a as f32;
        }
    });
    out
}

/// Sum of a slice in f64, with eight independent accumulators so the loop vectorises.
fn sum_f64(v: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x as f64;
        }
    }
    acc.iter().sum::<f64>() + chunks.remainder().iter().map(|&x| x as f64).sum::<f64>()
}

/// Output indices `o` in `0..out_len` whose input index `o * stride + tap - pad` lies in
/// `0..len`: a contiguous range.
fn valid_outputs(
    tap: usize,
    pad: usize,
    stride: usize,
    len: usize,
    out_len: usize,
) -> std::ops::Range<usize> {
    let lo = pad.saturating_sub(tap).div_ceil(stride);
    let hi = if len + pad > tap {
        ((len + pad - tap - 1) / stride + 1).min(out_len)
    } else {
        0
    };
    lo.min(hi)..hi
}

// ---------------------------------------------------------------------------------------------
// Pointwise 1x1 stride 1.

/// 1x1 stride-1 convolution: per image `b`, with `X[b]` as a `cin x HW` matrix and `dY[b]` as
/// `cout x HW` (NCHW makes both contiguous, no copies):
/// `dX[b] = W^T dY[b]`, `dW = sum_b dY[b] X[b]^T`, `dB = sum_b dY[b] 1`.
///
/// Both GEMMs run per tile of [`column_block`] pixel columns of one image, so the `dY` and `X`
/// tiles are read from memory once and reused from cache: a task writes its `cin x cols` tile
/// of `dX` directly (tiles are disjoint) and adds the tile's `cout x cin` contribution to its
/// group's `dW` partial ([`Plan`]).
fn pointwise_backward(xd: &[f32], wd: &[f32], gd: &[f32], g: &ConvGeom) -> GradBufs {
    let ConvGeom { n, cin, cout, .. } = *g;
    let hw = g.h * g.w;
    let block = column_block(n, hw, cin.max(cout));
    let blocks = hw.div_ceil(block);
    let plan = Plan::new(n * blocks, cin * cout * block);
    let mut gx = vec![0f32; n * cin * hw];
    let mut pw = vec![0f32; plan.groups * cout * cin];
    let mut pb = vec![0f64; plan.groups * cout];
    let gx_len = gx.len();
    let out = SharedOut(gx.as_mut_ptr());
    pw.par_chunks_mut(cout * cin)
        .zip(pb.par_chunks_mut(cout))
        .enumerate()
        .for_each(|(group, (dw, db))| {
            for t in plan.range(group) {
                let (b, c0) = (t / blocks, (t % blocks) * block);
                let cols = block.min(hw - c0);
                // Tiles: rows `hw` apart, starting at column c0 of image b.
                let dy = &gd[b * cout * hw + c0..(b + 1) * cout * hw];
                let xt = &xd[b * cin * hw + c0..(b + 1) * cin * hw];
                let at = b * cin * hw + c0;
                // SAFETY: `at < gx_len`, and the written tile (rows 0..cin, columns c0..c0+cols of
                // image b) is disjoint from every other task's; `gx` is not otherwise accessed
                // until the parallel loop ends, and it does not overlap the inputs.
                unsafe {
                    gemm_raw(
                        out.ptr().add(at),
                        hw,
                        gx_len - at,
                        false,
                        (wd, Strides::transposed(cin)),
                        (dy, Strides::rows(hw)),
                        [cin, cols, cout],
                        plan.par,
                    );
                }
                gemm_into(
                    dw,
                    cin,
                    true,
                    (dy, Strides::rows(hw)),
                    (xt, Strides::transposed(hw)),
                    [cout, cin, cols],
                    plan.par,
                );
                for (co, acc) in db.iter_mut().enumerate() {
                    *acc += sum_f64(&dy[co * hw..co * hw + cols]);
                }
            }
        });
    (gx, sum_partials(&pw, cout * cin), sum_partials(&pb, cout))
}

// ---------------------------------------------------------------------------------------------
// General dense convolution (one group): im2col + GEMM.

/// Copies output rows `oy0..oy0 + rows` of the im2col matrix of one image into `cols`
/// (`cin * kh * kw` rows of `rows * ow` values; row `(ci * kh + ky) * kw + kx` holds the input
/// pixel each output reads through that tap, zero in the padding), as the forward lays it out.
fn im2col_rows(img: &[f32], g: &ConvGeom, oy0: usize, rows: usize, cols: &mut [f32]) {
    let ConvGeom {
        h,
        w,
        ow,
        kh,
        kw,
        stride: s,
        pads: [pt, _, pl, _],
        ..
    } = *g;
    for (r, col) in cols.chunks_exact_mut(rows * ow).enumerate() {
        let (ci, ky, kx) = (r / (kh * kw), (r / kw) % kh, r % kw);
        let plane = &img[ci * h * w..(ci + 1) * h * w];
        let xs = valid_outputs(kx, pl, s, w, ow);
        for (j, dst) in col.chunks_exact_mut(ow).enumerate() {
            let iy = (oy0 + j) * s + ky;
            if iy < pt || iy - pt >= h {
                dst.fill(0.0);
                continue;
            }
            let src = &plane[(iy - pt) * w..(iy - pt + 1) * w];
            dst[..xs.start].fill(0.0);
            dst[xs.end..].fill(0.0);
            if xs.is_empty() {
                continue;
            }
            if s == 1 {
                let x0 = xs.start + kx - pl;
                dst[xs.clone()].copy_from_slice(&src[x0..x0 + xs.len()]);
            } else {
                for (ox, d) in dst[xs.clone()].iter_mut().enumerate() {
                    *d = src[(xs.start + ox) * s + kx - pl];
                }
            }
        }
    }
}

/// Any single-group convolution (in D0: the 3x3 stride-2 stem). With `cols` the im2col matrix of
/// an image (`K = cin * kh * kw` rows, one column per output pixel) and `W` as `cout x K`:
/// `dW = sum_b dY[b] cols[b]^T`, `dcols[b] = W^T dY[b]`, then col2im scatters `dcols` back onto
/// the input pixels to form `dX`.
///
/// Tasks are bands of whole output rows of one image: each builds its band of `cols` in a scratch
/// buffer (in cache for both GEMMs), adds the band's `dW` contribution to its group's partial and
/// stores the band's `dcols` in its own region. Col2im then runs in parallel over input rows,
/// each gathering the `dcols` rows of the taps that read it (bands overlap in the input, so
/// scattering per band would race).
fn im2col_backward(xd: &[f32], wd: &[f32], gd: &[f32], g: &ConvGeom) -> GradBufs {
    let ConvGeom {
        n,
        cin,
        cout,
        h,
        w,
        oh,
        ow,
        kh,
        kw,
        stride: s,
        pads: [pt, _, pl, _],
        ..
    } = *g;
    let kdim = cin * kh * kw;
    let ohw = oh * ow;
    let band = (column_block(n, ohw, kdim.max(cout)) / ow).clamp(1, oh);
    let bands = oh.div_ceil(band);
    let region = kdim * band * ow;
    let plan = Plan::new(n * bands, kdim * cout * band * ow);

    let mut dcols = vec![0f32; n * bands * region];
    let mut pw = vec![0f32; plan.groups * cout * kdim];
    let mut pb = vec![0f64; plan.groups * cout];
    // One contiguous slice of `dcols` per group: its tasks' regions, in task order.
    let mut group_cols = Vec::with_capacity(plan.groups);
    let mut rest = dcols.as_mut_slice();
    for group in 0..plan.groups {
        let (mine, tail) = rest.split_at_mut(plan.range(group).len() * region);
        group_cols.push(mine);
        rest = tail;
    }
    group_cols
        .into_par_iter()
        .zip(pw.par_chunks_mut(cout * kdim))
        .zip(pb.par_chunks_mut(cout))
        .enumerate()
        .for_each(|(group, ((dc, dw), db))| {
            let mut cols = vec![0f32; region];
            for (i, t) in plan.range(group).enumerate() {
                let (b, oy0) = (t / bands, (t % bands) * band);
                let pixels = band.min(oh - oy0) * ow;
                let cols = &mut cols[..kdim * pixels];
                im2col_rows(
                    &xd[b * cin * h * w..(b + 1) * cin * h * w],
                    g,
                    oy0,
                    pixels / ow,
                    cols,
                );
                let dy = &gd[b * cout * ohw + oy0 * ow..(b + 1) * cout * ohw];
                gemm_into(
                    dw,
                    kdim,
                    true,
                    (dy, Strides::rows(ohw)),
                    (cols, Strides::transposed(pixels)),
                    [cout, kdim, pixels],
                    plan.par,
                );
                gemm_into(
                    &mut dc[i * region..i * region + kdim * pixels],
                    pixels,
                    false,
                    (wd, Strides::transposed(kdim)),
                    (dy, Strides::rows(ohw)),
                    [kdim, pixels, cout],
                    plan.par,
                );
                for (co, acc) in db.iter_mut().enumerate() {
                    *acc += sum_f64(&dy[co * ohw..co * ohw + pixels]);
                }
            }
        });

    // col2im: dX[b, ci, iy, ix] = sum over taps (ky, kx) with iy = oy * s + ky - pt and
    // ix = ox * s + kx - pl of dcols[b][(ci, ky, kx), (oy, ox)].
    let mut gx = vec![0f32; n * cin * h * w];
    gx.par_chunks_mut(w).enumerate().for_each(|(r, dx)| {
        let (b, ci, iy) = (r / (cin * h), (r / h) % cin, r % h);
        for ky in 0..kh {
            let Some(t) = (iy + pt).checked_sub(ky) else {
                continue;
            };
            let oy = t / s;
            if t % s != 0 || oy >= oh {
                continue;
            }
            let band_start = oy / band * band;
            let pixels = band.min(oh - band_start) * ow;
            let base = (b * bands + oy / band) * region + (oy - band_start) * ow;
            for kx in 0..kw {
                let row = &dcols[base + ((ci * kh + ky) * kw + kx) * pixels..][..ow];
                let xs = valid_outputs(kx, pl, s, w, ow);
                if xs.is_empty() {
                    continue;
                }
                if s == 1 {
                    let x0 = xs.start + kx - pl;
                    for (d, &v) in dx[x0..x0 + xs.len()].iter_mut().zip(&row[xs]) {
                        *d += v;
                    }
                } else {
                    for ox in xs {
                        dx[ox * s + kx - pl] += row[ox];
                    }
                }
            }
        }
    });
    (gx, sum_partials(&pw, cout * kdim), sum_partials(&pb, cout))
}

// ---------------------------------------------------------------------------------------------
// Depthwise.

/// Depthwise convolution (one input channel per output channel), any kernel and stride. One task
/// per (image, channel) plane, on zero-padded scratch planes laid out as the forward's
/// ([`PaddedPlane`]: stride-2 rows de-interleaved so every tap reads a contiguous run):
/// - `dX`: each output-gradient row is scattered, times the tap weight, into the `kh * kw`
///   shifted rows of a padded `dX` plane, which is then cropped to the image (the padding's
///   gradient is dropped). Padding makes the inner loops free of bounds tests.
/// - `dW`: per tap, a row of `ow` f32 accumulators gathers `dY * X` element-wise over the plane
///   (vectorised, no reduction inside the loop); each row is summed in f64 at the end of the
///   plane, and the planes of a channel are summed in f64 across the batch.
///
/// `dY` and `X` planes are read once for both gradients.
fn depthwise_backward(xd: &[f32], wd: &[f32], gd: &[f32], g: &ConvGeom) -> GradBufs {
    let ConvGeom {
        n,
        cin: c,
        h,
        w,
        oh,
        ow,
        kh,
        kw,
        stride,
        pads: [pt, pb, pl, pr],
        ..
    } = *g;
    let (ph, pw) = (h + pt + pb, w + pl + pr);
    let layout = PaddedPlane {
        row: pw,
        even: pw.div_ceil(2),
    };
    let taps = kh * kw;
    let mut gx = vec![0f32; n * c * h * w];
    // Per plane: the taps' weight-gradient partials, then the bias partial.
    let mut parts = vec![0f64; n * c * (taps + 1)];
    gx.par_chunks_mut(h * w)
        .zip(parts.par_chunks_mut(taps + 1))
        .enumerate()
        .for_each_init(
            || {
                (
                    vec![0f32; ph * pw],
                    vec![0f32; ph * pw],
                    vec![0f32; taps * ow],
                )
            },
            |(xpad, dxpad, acc), (p, (dx, part))| {
                let plane = &xd[p * h * w..(p + 1) * h * w];
                let dy = &gd[p * oh * ow..(p + 1) * oh * ow];
                let k = &wd[(p % c) * taps..(p % c + 1) * taps];
                // The padding of `xpad` stays zero across reuse: only interior positions are
                // ever written.
                for (r, src) in plane.chunks_exact(w).enumerate() {
                    let row = &mut xpad[(r + pt) * pw..(r + pt + 1) * pw];
                    if stride == 2 {
                        for (col, &v) in src.iter().enumerate() {
                            row[layout.column(col + pl, 2)] = v;
                        }
                    } else {
                        row[pl..pl + w].copy_from_slice(src);
                    }
                }
                dxpad.fill(0.0);
                acc.fill(0.0);
                depthwise_plane_backward(xpad, dxpad, acc, dy, k, [kh, kw], stride, layout);
                for (r, dst) in dx.chunks_exact_mut(w).enumerate() {
                    let row = &dxpad[(r + pt) * pw..(r + pt + 1) * pw];
                    if stride == 2 {
                        for (col, d) in dst.iter_mut().enumerate() {
                            *d = row[layout.column(col + pl, 2)];
                        }
                    } else {
                        dst.copy_from_slice(&row[pl..pl + w]);
                    }
                }
                for (out, a) in part.iter_mut().zip(acc.chunks_exact(ow)) {
                    *out = sum_f64(a);
                }
                part[taps] = sum_f64(dy);
            },
        );
    let mut gw = vec![0f32; c * taps];
    let mut gb = vec![0f32; c];
    for (ch, (gw, gb)) in gw.chunks_exact_mut(taps).zip(gb.iter_mut()).enumerate() {
        let plane = |b: usize| &parts[(b * c + ch) * (taps + 1)..(b * c + ch + 1) * (taps + 1)];
        for (tap, v) in gw.iter_mut().enumerate() {
            *v = (0..n).map(|b| plane(b)[tap]).sum::<f64>() as f32;
        }
        *gb = (0..n).map(|b| plane(b)[taps]).sum::<f64>() as f32;
    }
    (gx, gw, gb)
}

/// The inner loops of [`depthwise_backward`] for one plane, compiled for AVX2+FMA as well when
/// the target is x86-64 and picked at run time (like the forward's kernels in [`super::simd`]).
/// `acc` holds `kh * kw` rows of `ow` weight-gradient accumulators.
#[allow(clippy::too_many_arguments)]
fn depthwise_plane_backward(
    xpad: &[f32],
    dxpad: &mut [f32],
    acc: &mut [f32],
    dy: &[f32],
    k: &[f32],
    kernel: [usize; 2],
    stride: usize,
    layout: PaddedPlane,
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx2(
            xpad: &[f32],
            dxpad: &mut [f32],
            acc: &mut [f32],
            dy: &[f32],
            k: &[f32],
            kernel: [usize; 2],
            stride: usize,
            layout: PaddedPlane,
        ) {
            depthwise_plane_backward_generic(xpad, dxpad, acc, dy, k, kernel, stride, layout)
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features `avx2` was compiled for.
            return unsafe { avx2(xpad, dxpad, acc, dy, k, kernel, stride, layout) };
        }
    }
    depthwise_plane_backward_generic(xpad, dxpad, acc, dy, k, kernel, stride, layout)
}

/// See [`depthwise_plane_backward`]. Plain `for` loops over zipped slices: closures could be
/// outlined out of the `target_feature` function and lose the AVX2 code path.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn depthwise_plane_backward_generic(
    xpad: &[f32],
    dxpad: &mut [f32],
    acc: &mut [f32],
    dy: &[f32],
    k: &[f32],
    [kh, kw]: [usize; 2],
    stride: usize,
    layout: PaddedPlane,
) {
    let ow = acc.len() / (kh * kw);
    for (oy, dyrow) in dy.chunks_exact(ow).enumerate() {
        for ky in 0..kh {
            let start = (oy * stride + ky) * layout.row;
            let xrow = &xpad[start..start + layout.row];
            let dxrow = &mut dxpad[start..start + layout.row];
            for kx in 0..kw {
                let tap = ky * kw + kx;
                let wv = k[tap];
                let a = &mut acc[tap * ow..(tap + 1) * ow];
                if stride <= 2 {
                    let at = layout.column(kx, stride);
                    let xs = &xrow[at..at + ow];
                    let dxs = &mut dxrow[at..at + ow];
                    for (((d, a), &gv), &xv) in dxs.iter_mut().zip(a.iter_mut()).zip(dyrow).zip(xs)
                    {
                        *d += wv * gv;
                        *a += gv * xv;
                    }
                } else {
                    for (ox, (a, &gv)) in a.iter_mut().zip(dyrow).enumerate() {
                        let i = ox * stride + kx;
                        dxrow[i] += wv * gv;
                        *a += gv * xrow[i];
                    }
                }
            }
        }
    }
}

/// Backward of `y = act(x)` given the pre-activation `x`.
pub fn activation_backward(x: &Tensor, act: Activation, grad_out: &Tensor) -> Result<Tensor> {
    check_same("activation_backward", x, grad_out)?;
    let mut g = grad_out.clone();
    g.data_mut()
        .par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(x.data().par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|(g, x)| simd::act_backward(g, x, act));
    Ok(g)
}

/// Elements per rayon task in elementwise kernels (large enough to amortise scheduling).
const ELEMENTWISE_CHUNK: usize = 1 << 15;

/// Batch statistics of a training-mode batch norm, kept for the backward pass and the running
/// statistics update.
#[derive(Debug, Clone)]
pub struct BatchNormCache {
    pub mean: Vec<f32>,
    /// Biased variance (divided by N*H*W), as used to normalise.
    pub var: Vec<f32>,
    pub eps: f32,
    /// Elements per channel the statistics were taken over (N * H * W, over all ranks when
    /// synchronised); the running variance uses the unbiased `var * count / (count - 1)`.
    pub count: usize,
}

/// Sums across data-parallel ranks for synchronised batch norm: called with per-channel partial
/// sums (this rank's), it must replace them with the sums over all ranks. The identity for a
/// single process.
pub type ReduceSums<'a> = &'a mut dyn FnMut(&mut [f64]) -> Result<()>;

/// Training-mode batch norm: normalise with the batch's per-channel mean and biased variance,
/// then `gamma * x_hat + beta`. Returns the output and the statistics (PyTorch semantics).
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> Result<(Tensor, BatchNormCache)> {
    batch_norm_train_reduced(x, gamma, beta, eps, &mut |_| Ok(()))
}

/// [`batch_norm_train`] whose statistics are those of the union of the batches of all ranks
/// (PyTorch's `SyncBatchNorm`): `reduce` sums the per-channel partial sums (and the element
/// count) over ranks, once for the mean and once for the variance, so the result equals a
/// single rank holding every rank's batch up to the rounding of the reduction.
pub fn batch_norm_train_reduced(
    x: &Tensor,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    reduce: ReduceSums<'_>,
) -> Result<(Tensor, BatchNormCache)> {
    let [n, c, h, w] = x.dims4("batch_norm_train")?;
    if gamma.len() != c || beta.len() != c {
        return Err(shape_err(
            "batch_norm_train",
            format!("{c} channels, {} / {} affine", gamma.len(), beta.len()),
        ));
    }
    let hw = h * w;
    let xd = x.data();
    let planes = |ch: usize| (0..n).map(move |b| &xd[(b * c + ch) * hw..(b * c + ch + 1) * hw]);
    // Pass 1: sums and the element count -> mean.
    let mut sums: Vec<f64> = (0..c)
        .into_par_iter()
        .map(|ch| planes(ch).map(simd::sum_f64).sum())
        .collect();
    sums.push((n * hw) as f64);
    reduce(&mut sums)?;
    let count = sums[c];
    if count < 1.0 {
        return Err(shape_err("batch_norm_train", "empty batch".into()));
    }
    let mean: Vec<f64> = sums[..c].iter().map(|s| s / count).collect();
    // Pass 2: squared deviations from the (global) mean -> biased variance.
    let mut sq: Vec<f64> = (0..c)
        .into_par_iter()
        .map(|ch| planes(ch).map(|p| simd::sq_dev_f64(p, mean[ch])).sum())
        .collect();
    reduce(&mut sq)?;
    let stats: Vec<(f64, f64)> = mean
        .iter()
        .zip(&sq)
        .map(|(&m, &s)| (m, s / count))
        .collect();
    let y = normalize_affine(x, gamma, beta, eps, |ch| stats[ch]);
    Ok((
        y,
        BatchNormCache {
            mean: stats.iter().map(|s| s.0 as f32).collect(),
            var: stats.iter().map(|s| s.1 as f32).collect(),
            eps,
            count: count as usize,
        },
    ))
}

/// Gradients of a training-mode batch norm: input, gamma, beta.
#[derive(Debug, Clone)]
pub struct BatchNormGrads {
    pub input: Tensor,
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

/// Backward of [`batch_norm_train`]: `dx = gamma / sigma * (dy - mean(dy) - x_hat * mean(dy * x_hat))`.
pub fn batch_norm_train_backward(
    x: &Tensor,
    gamma: &[f32],
    cache: &BatchNormCache,
    grad_out: &Tensor,
) -> Result<BatchNormGrads> {
    batch_norm_train_backward_reduced(x, gamma, cache, grad_out, &mut |_| Ok(()))
}

/// Backward of [`batch_norm_train_reduced`] (PyTorch's `SyncBatchNorm` backward): the means of
/// `dy` and `dy * x_hat` in the input gradient are over all ranks (`reduce` sums them), while
/// the returned gamma and beta gradients are this rank's own sums, which data-parallel gradient
/// averaging then combines like every other parameter gradient.
pub fn batch_norm_train_backward_reduced(
    x: &Tensor,
    gamma: &[f32],
    cache: &BatchNormCache,
    grad_out: &Tensor,
    reduce: ReduceSums<'_>,
) -> Result<BatchNormGrads> {
    let (c, hw, sums) = bn_grad_sums("batch_norm_train_backward", x, gamma, cache, grad_out)?;
    let count = cache.count as f64;
    let (xd, gd) = (x.data(), grad_out.data());
    let mut global: Vec<f64> = sums.iter().flat_map(|&(a, b)| [a, b]).collect();
    reduce(&mut global)?;
    // dx = gamma inv (dy - sum(dy) / N - x_hat sum(dy x_hat) / N)
    //    = k1 dy + k2 (x - mean) + k3.
    let mut gx = vec![0f32; x.len()];
    gx.par_chunks_mut(hw.max(1))
        .enumerate()
        .for_each(|(p, out)| {
            let ch = p % c;
            let inv = 1.0 / (cache.var[ch] as f64 + cache.eps as f64).sqrt();
            let (sg, sgx) = (global[2 * ch], global[2 * ch + 1]);
            let k1 = gamma[ch] as f64 * inv;
            let k = [
                k1 as f32,
                (-k1 * inv * sgx / count) as f32,
                (-k1 * sg / count) as f32,
            ];
            let r = p * hw..(p + 1) * hw;
            simd::bn_input_grad(out, &gd[r.clone()], &xd[r], cache.mean[ch], k);
        });
    Ok(BatchNormGrads {
        input: Tensor::new(x.shape().to_vec(), gx)?,
        gamma: sums.iter().map(|s| s.1 as f32).collect(),
        beta: sums.iter().map(|s| s.0 as f32).collect(),
    })
}

/// Frozen (inference-mode) batch norm: normalise with fixed statistics (the running mean and
/// variance in `stats`, not the batch's), then `gamma * x_hat + beta`. This is the layer the
/// inference engine folds into its convolutions, so training through it optimises exactly what
/// inference computes; `stats.count` is not used.
pub fn batch_norm_frozen(
    x: &Tensor,
    gamma: &[f32],
    beta: &[f32],
    stats: &BatchNormCache,
) -> Result<Tensor> {
    let [_, c, _, _] = x.dims4("batch_norm_frozen")?;
    if gamma.len() != c || beta.len() != c || stats.mean.len() != c || stats.var.len() != c {
        return Err(shape_err(
            "batch_norm_frozen",
            format!(
                "{c} channels, {} / {} affine, {} / {} statistics",
                gamma.len(),
                beta.len(),
                stats.mean.len(),
                stats.var.len()
            ),
        ));
    }
    Ok(normalize_affine(x, gamma, beta, stats.eps, |ch| {
        (stats.mean[ch] as f64, stats.var[ch] as f64)
    }))
}

/// `y = (x - mean) * gamma / sqrt(var + eps) + beta` per channel of an NCHW tensor whose shape
/// the caller checked, with `(mean, var) = stats(channel)` and the per-channel constants in f64:
/// the normalisation of both batch-norm modes.
fn normalize_affine(
    x: &Tensor,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    stats: impl Fn(usize) -> (f64, f64) + Sync,
) -> Tensor {
    let (c, hw) = (x.shape()[1], x.shape()[2] * x.shape()[3]);
    let mut y = x.clone();
    y.data_mut()
        .par_chunks_mut(hw.max(1))
        .enumerate()
        .for_each(|(p, plane)| {
            let ch = p % c;
            let (mean, var) = stats(ch);
            let scale = gamma[ch] as f64 / (var + eps as f64).sqrt();
            simd::centered_affine(plane, mean, scale, beta[ch] as f64);
        });
    y
}

/// `(channels, H * W, per-channel (sum(dy), sum(dy * x_hat)))` of [`bn_grad_sums`].
type BnGradSums = (usize, usize, Vec<(f64, f64)>);

/// The shape checks of a batch-norm backward and its per-channel sums over batch and space,
/// `(sum(dy), sum(dy * x_hat))` with `x_hat = (x - mean) / sqrt(var + eps)` of `stats`
/// (`sum(dy * x_hat)` as `inv * (sum(dy * x) - mean * sum(dy))`). Returns `(C, H * W, sums)`.
fn bn_grad_sums(
    op: &'static str,
    x: &Tensor,
    gamma: &[f32],
    stats: &BatchNormCache,
    grad_out: &Tensor,
) -> Result<BnGradSums> {
    check_same(op, x, grad_out)?;
    let [n, c, h, w] = x.dims4(op)?;
    if gamma.len() != c || stats.mean.len() != c || stats.var.len() != c {
        return Err(shape_err(
            op,
            format!(
                "{c} channels, gamma {} / statistics {}",
                gamma.len(),
                stats.mean.len()
            ),
        ));
    }
    let hw = h * w;
    let (xd, gd) = (x.data(), grad_out.data());
    let sums = (0..c)
        .into_par_iter()
        .map(|ch| {
            let inv = 1.0 / (stats.var[ch] as f64 + stats.eps as f64).sqrt();
            let (mut sg, mut sgx) = (0f64, 0f64);
            for b in 0..n {
                let r = (b * c + ch) * hw..(b * c + ch + 1) * hw;
                let (a, d) = simd::sum_and_dot_f64(&gd[r.clone()], &xd[r]);
                sg += a;
                sgx += d;
            }
            (sg, inv * (sgx - stats.mean[ch] as f64 * sg))
        })
        .collect();
    Ok((c, hw, sums))
}

/// Backward of [`batch_norm_frozen`]: the statistics are constants, so
/// `dx = gamma / sigma * dy`, `dgamma = sum(dy * x_hat)`, `dbeta = sum(dy)`.
pub fn batch_norm_frozen_backward(
    x: &Tensor,
    gamma: &[f32],
    stats: &BatchNormCache,
    grad_out: &Tensor,
) -> Result<BatchNormGrads> {
    let (c, hw, sums) = bn_grad_sums("batch_norm_frozen_backward", x, gamma, stats, grad_out)?;
    let inv = |ch: usize| 1.0 / (stats.var[ch] as f64 + stats.eps as f64).sqrt();
    let mut gx = grad_out.data().to_vec();
    gx.par_chunks_mut(hw.max(1))
        .enumerate()
        .for_each(|(p, plane)| {
            let k = (gamma[p % c] as f64 * inv(p % c)) as f32;
            plane.iter_mut().for_each(|v| *v *= k);
        });
    Ok(BatchNormGrads {
        input: Tensor::new(x.shape().to_vec(), gx)?,
        gamma: sums.iter().map(|s| s.1 as f32).collect(),
        beta: sums.iter().map(|s| s.0 as f32).collect(),
    })
}

/// Backward of global average pooling: each input gets `grad / (H * W)`.
pub fn global_avg_pool_backward(x_shape: &[usize], grad_out: &Tensor) -> Result<Tensor> {
    let [n, c, h, w] = match x_shape {
        &[n, c, h, w] => [n, c, h, w],
        _ => {
            return Err(shape_err(
                "global_avg_pool_backward",
                format!("input shape {x_shape:?}"),
            ));
        }
    };
    if grad_out.len() != n * c {
        return Err(shape_err(
            "global_avg_pool_backward",
            format!("gradient {:?}", grad_out.shape()),
        ));
    }
    let hw = h * w;
    let data = grad_out
        .data()
        .iter()
        .flat_map(|&g| std::iter::repeat_n(g / hw as f32, hw))
        .collect();
    Tensor::new(x_shape.to_vec(), data)
}

/// Backward of `y = x * s` with `s` of shape `[N, C, 1, 1]`: (grad x, grad s).
pub fn scale_channels_backward(
    x: &Tensor,
    s: &Tensor,
    grad_out: &Tensor,
) -> Result<(Tensor, Tensor)> {
    check_same("scale_channels_backward", x, grad_out)?;
    let [n, c, h, w] = x.dims4("scale_channels_backward")?;
    if s.len() != n * c {
        return Err(shape_err(
            "scale_channels_backward",
            format!("scale {:?}", s.shape()),
        ));
    }
    let hw = h * w;
    let mut gx = grad_out.clone();
    gx.data_mut()
        .par_chunks_mut(hw)
        .enumerate()
        .for_each(|(p, plane)| plane.iter_mut().for_each(|v| *v *= s.data()[p]));
    let gs: Vec<f32> = (0..n * c)
        .into_par_iter()
        .map(|p| {
            let r = p * hw..(p + 1) * hw;
            x.data()[r.clone()]
                .iter()
                .zip(&grad_out.data()[r])
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>() as f32
        })
        .collect();
    Ok((gx, Tensor::new(s.shape().to_vec(), gs)?))
}

/// Backward of max pooling with TF-SAME padding (padding never wins): each output's gradient goes
/// to the first maximum in its window (row-major scan), as PyTorch's CPU kernel does.
pub fn max_pool_same_backward(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    grad_out: &Tensor,
) -> Result<Tensor> {
    let [n, c, h, w] = x.dims4("max_pool_same_backward")?;
    let (oh, pt, _) = Padding::Same.resolve(h, kernel, stride, true);
    let (ow, pl, _) = Padding::Same.resolve(w, kernel, stride, false);
    if grad_out.shape() != [n, c, oh, ow] {
        return Err(shape_err(
            "max_pool_same_backward",
            format!("gradient {:?}", grad_out.shape()),
        ));
    }
    let mut gx = vec![0f32; x.len()];
    gx.par_chunks_mut(h * w).enumerate().for_each(|(p, out)| {
        let plane = &x.data()[p * h * w..(p + 1) * h * w];
        let g = &grad_out.data()[p * oh * ow..(p + 1) * oh * ow];
        for oy in 0..oh {
            for ox in 0..ow {
                let mut best: Option<(f32, usize)> = None;
                for ky in 0..kernel {
                    let iy = (oy * stride + ky) as isize - pt as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..kernel {
                        let ix = (ox * stride + kx) as isize - pl as isize;
                        if ix < 0 || ix >= w as isize {
                            continue;
                        }
                        let i = iy as usize * w + ix as usize;
                        if best.is_none_or(|(b, _)| plane[i] > b) {
                            best = Some((plane[i], i));
                        }
                    }
                }
                if let Some((_, i)) = best {
                    out[i] += g[oy * ow + ox];
                }
            }
        }
    });
    Tensor::new(x.shape().to_vec(), gx)
}

/// Backward of nearest-neighbour resizing: each input accumulates the gradients of the outputs
/// that copied it (same index rule as the forward).
pub fn upsample_nearest_backward(x_shape: &[usize], grad_out: &Tensor) -> Result<Tensor> {
    let [n, c, h, w] = match x_shape {
        &[n, c, h, w] => [n, c, h, w],
        _ => {
            return Err(shape_err(
                "upsample_nearest_backward",
                format!("input shape {x_shape:?}"),
            ));
        }
    };
    let [gn, gc, oh, ow] = grad_out.dims4("upsample_nearest_backward")?;
    if gn != n || gc != c {
        return Err(shape_err(
            "upsample_nearest_backward",
            format!("gradient {:?}", grad_out.shape()),
        ));
    }
    let sy = h as f32 / oh as f32;
    let sx = w as f32 / ow as f32;
    let mut gx = vec![0f32; n * c * h * w];
    gx.par_chunks_mut(h * w).enumerate().for_each(|(p, out)| {
        let g = &grad_out.data()[p * oh * ow..(p + 1) * oh * ow];
        for oy in 0..oh {
            let iy = ((oy as f32 * sy).floor() as usize).min(h - 1);
            for ox in 0..ow {
                let ix = ((ox as f32 * sx).floor() as usize).min(w - 1);
                out[iy * w + ix] += g[oy * ow + ox];
            }
        }
    });
    Tensor::new(x_shape.to_vec(), gx)
}

/// Gradients of the BiFPN fast normalised fusion `y = sum_i x_i * relu(e_i) / (sum_j relu(e_j) + eps)`
/// (before its activation): per-input gradients and the gradient of the raw edge weights `e`.
pub fn weighted_sum_backward(
    xs: &[&Tensor],
    raw_weights: &[f32],
    eps: f32,
    grad_out: &Tensor,
) -> Result<(Vec<Tensor>, Vec<f32>)> {
    if xs.is_empty() || xs.len() != raw_weights.len() {
        return Err(shape_err(
            "weighted_sum_backward",
            format!("{} inputs, {} weights", xs.len(), raw_weights.len()),
        ));
    }
    for x in xs {
        check_same("weighted_sum_backward", x, grad_out)?;
    }
    let w: Vec<f64> = raw_weights.iter().map(|&e| (e as f64).max(0.0)).collect();
    let denom = w.iter().sum::<f64>() + eps as f64;
    let gxs = w
        .iter()
        .map(|&wi| {
            let f = (wi / denom) as f32;
            let mut t = grad_out.clone();
            t.data_mut().iter_mut().for_each(|v| *v *= f);
            t
        })
        .collect();
    // G_i = <dY, x_i>; dL/dw_i = G_i / D - sum_j w_j G_j / D^2; ReLU gates e_i <= 0.
    let big_g: Vec<f64> = xs
        .iter()
        .map(|x| {
            x.data()
                .par_iter()
                .zip(grad_out.data().par_iter())
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
        })
        .collect();
    let mixed: f64 = w.iter().zip(&big_g).map(|(wi, gi)| wi * gi).sum::<f64>() / (denom * denom);
    let ge = raw_weights
        .iter()
        .zip(&big_g)
        .map(|(&e, &gi)| {
            if e > 0.0 {
                (gi / denom - mixed) as f32
            } else {
                0.0
            }
        })
        .collect();
    Ok((gxs, ge))
}

/// Drop-path (stochastic depth) forward and backward share one per-sample mask: sample `b` is
/// kept (and scaled by `1 / keep_prob`) when `keep[b]`. Returns `x * mask / keep_prob`; the
/// backward is the same function applied to the output gradient.
pub fn drop_path(x: &Tensor, keep: &[bool], keep_prob: f32) -> Result<Tensor> {
    let [n, _, _, _] = x.dims4("drop_path")?;
    if keep.len() != n || !(keep_prob > 0.0 && keep_prob <= 1.0) {
        return Err(shape_err(
            "drop_path",
            format!("{} masks for batch {n}, keep_prob {keep_prob}", keep.len()),
        ));
    }
    let per = x.len() / n;
    let mut y = x.clone();
    y.data_mut().chunks_mut(per).zip(keep).for_each(|(s, &k)| {
        let f = if k { 1.0 / keep_prob } else { 0.0 };
        s.iter_mut().for_each(|v| *v *= f);
    });
    Ok(y)
}
