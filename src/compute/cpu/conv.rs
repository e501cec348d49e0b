//! Convolutions on the CPU.
//!
//! - 1x1 stride-1 convolutions are a plain GEMM per image: `Y[co, hw] = W[co, ci] * X[ci, hw]`
//!   (NCHW makes the input matrix contiguous; no copy).
//! - Depthwise convolutions run directly, one channel plane per task: the plane is copied once
//!   into a zero-padded scratch buffer, then each output row accumulates `k * k` shifted input rows,
//!   an inner loop the compiler vectorises (stride 1) and that stays in L1/L2.
//! - Anything else (the 3x3 stride-2 stem) goes through im2col + GEMM.
//!
//! Bias, activation and residual are applied in one pass over each output plane afterwards.

use rayon::prelude::*;

use super::SharedOut;
use super::simd;
use crate::compute::{Activation, ConvSpec, Tensor};
use crate::error::{Error, Result};

/// GEMMs smaller than this many multiply-adds run single-threaded.
const GEMM_PAR_MIN: usize = 1 << 18;

fn shape_err(detail: String) -> Error {
    Error::Shape {
        op: "conv2d",
        detail,
    }
}

pub(super) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    spec: ConvSpec,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let [n, cin, h, w] = x.dims4("conv2d")?;
    let [cout, cin_g, kh, kw] = weight.dims4("conv2d weight")?;
    if spec.stride == 0 || spec.groups == 0 || cin % spec.groups != 0 || cin / spec.groups != cin_g
    {
        return Err(shape_err(format!(
            "input has {cin} channels, weight {:?}, groups {}, stride {}",
            weight.shape(),
            spec.groups,
            spec.stride
        )));
    }
    if let Some(b) = bias
        && b.len() != cout
    {
        return Err(shape_err(format!(
            "bias {:?} for {cout} output channels",
            b.shape()
        )));
    }
    let (oh, pt, pb) = spec.padding.resolve(h, kh, spec.stride, true);
    let (ow, pl, pr) = spec.padding.resolve(w, kw, spec.stride, false);
    if oh == 0 || ow == 0 {
        return Err(shape_err(format!(
            "{h}x{w} input too small for a {kh}x{kw} kernel"
        )));
    }
    if let Some(r) = residual
        && r.shape() != [n, cout, oh, ow]
    {
        return Err(shape_err(format!(
            "residual {:?} does not match output [{n}, {cout}, {oh}, {ow}]",
            r.shape()
        )));
    }
    let mut y = Tensor::zeros(vec![n, cout, oh, ow]);
    let geo = Geometry {
        h,
        w,
        oh,
        ow,
        kh,
        kw,
        stride: spec.stride,
        pads: [pt, pb, pl, pr],
    };
    if spec.groups == 1 && kh == 1 && kw == 1 && spec.stride == 1 && pt + pb + pl + pr == 0 {
        // The epilogue runs per column block inside, while the block is in L2.
        pointwise(
            x,
            weight,
            bias,
            spec.act,
            residual,
            &mut y,
            n,
            cin,
            cout,
            h * w,
        );
        return Ok(y);
    } else if spec.groups == cin && cin_g == 1 && cout == cin {
        // Bias and activation are applied row by row inside, while the row is in L1.
        depthwise(x, weight, bias, spec.act, &mut y, &geo);
        if let Some(r) = residual {
            epilogue(&mut y, None, Activation::None, Some(r), cout, oh * ow);
        }
        return Ok(y);
    } else if spec.groups == 1 {
        im2col_gemm(x, weight, &mut y, n, cin, cout, &geo);
    } else {
        return Err(shape_err(format!(
            "grouped convolution with {} groups is not supported (only 1 or depthwise)",
            spec.groups
        )));
    }
    epilogue(&mut y, bias, spec.act, residual, cout, oh * ow);
    Ok(y)
}

#[derive(Clone, Copy)]
struct Geometry {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    /// top, bottom, left, right
    pads: [usize; 4],
}

/// `dst[m, n] = lhs[m, k] * rhs[k, n]`, all row-major and contiguous.
fn gemm(dst: &mut [f32], lhs: &[f32], rhs: &[f32], m: usize, k: usize, n: usize) {
    debug_assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= k * n);
    let par = if m * n * k >= GEMM_PAR_MIN {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the three slices are at least m*n, m*k and k*n long (checked by the callers'
    // shape validation and asserted above in debug builds); strides describe row-major layouts
    // inside those bounds; dst does not alias lhs or rhs (it is a fresh output buffer).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `Y[b] = act(W * X[b] + bias) + R[b]`, tiled over blocks of output columns: each task computes
/// a `cout x block` tile with a single-threaded GEMM and applies the epilogue to it at once, so
/// the tile is still in cache (a separate pass over a 25 MB activation costs as much as the GEMM).
#[allow(clippy::too_many_arguments)]
fn pointwise(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    act: Activation,
    residual: Option<&Tensor>,
    y: &mut Tensor,
    n: usize,
    cin: usize,
    cout: usize,
    hw: usize,
) {
    // Aim for ~256 KB of output per tile, in multiples of 16 columns.
    let block = ((65_536 / cout.max(1)).max(16) / 16 * 16).min(hw).max(1);
    let blocks = hw.div_ceil(block);
    let xd = x.data();
    let wd = weight.data();
    let bd = bias.map(|b| b.data());
    let rd = residual.map(|r| r.data());
    let out = SharedOut(y.data_mut().as_mut_ptr());
    let task = |t: usize| {
        let (b, blk) = (t / blocks, t % blocks);
        let c0 = blk * block;
        let cols = block.min(hw - c0);
        let img = &xd[b * cin * hw..(b + 1) * cin * hw];
        // SAFETY: tile (b, blk) covers rows 0..cout, columns c0..c0+cols of image b's output:
        // in bounds of `y` ([n, cout, hw]) and disjoint from every other task's tile.
        unsafe {
            let dst = out.ptr().add(b * cout * hw + c0);
            gemm::gemm(
                cout,
                cols,
                cin,
                dst,
                1,
                hw as isize,
                false,
                wd.as_ptr(),
                1,
                cin as isize,
                img.as_ptr().add(c0),
                1,
                hw as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
            if bd.is_some() || act != Activation::None || rd.is_some() {
                for co in 0..cout {
                    let row = std::slice::from_raw_parts_mut(dst.add(co * hw), cols);
                    let bv = bd.map_or(0.0, |bd| bd[co]);
                    match rd {
                        Some(r) => {
                            let at = b * cout * hw + co * hw + c0;
                            simd::bias_act_residual(row, bv, act, &r[at..at + cols]);
                        }
                        None => simd::bias_act(row, bv, act),
                    }
                }
            }
        }
    };
    let tasks = n * blocks;
    if tasks == 1 || cout * cin * hw * n < GEMM_PAR_MIN {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

fn depthwise(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    act: Activation,
    y: &mut Tensor,
    g: &Geometry,
) {
    let Geometry {
        h,
        w,
        oh,
        ow,
        kh,
        kw,
        stride,
        pads: [pt, pb, pl, pr],
    } = *g;
    let c = weight.shape()[0];
    let (ph, pw) = (h + pt + pb, w + pl + pr);
    let layout = simd::PaddedPlane {
        row: pw,
        even: pw.div_ceil(2),
    };
    let xd = x.data();
    let wd = weight.data();
    let bd = bias.map(|b| b.data());
    y.data_mut()
        .par_chunks_mut(oh * ow)
        .enumerate()
        .for_each_init(
            || vec![0.0f32; ph * pw],
            |padded, (p, out)| {
                let plane = &xd[p * h * w..(p + 1) * h * w];
                let k = &wd[(p % c) * kh * kw..(p % c + 1) * kh * kw];
                let b = bd.map_or(0.0, |b| b[p % c]);
                // Borders stay zero across reuse: only interior positions are ever written.
                for (r, src) in plane.chunks_exact(w).enumerate() {
                    let row = &mut padded[(r + pt) * pw..(r + pt + 1) * pw];
                    if stride == 2 {
                        for (col, &v) in src.iter().enumerate() {
                            row[layout.column(col + pl, 2)] = v;
                        }
                    } else {
                        row[pl..pl + w].copy_from_slice(src);
                    }
                }
                simd::depthwise_plane(padded, layout, k, kh, kw, stride, out, ow, b, act);
            },
        );
}

fn im2col_gemm(
    x: &Tensor,
    weight: &Tensor,
    y: &mut Tensor,
    n: usize,
    cin: usize,
    cout: usize,
    g: &Geometry,
) {
    let Geometry {
        h,
        w,
        oh,
        ow,
        kh,
        kw,
        stride,
        pads: [pt, _, pl, _],
    } = *g;
    let kdim = cin * kh * kw;
    let ohw = oh * ow;
    let mut cols = vec![0.0f32; kdim * ohw];
    let xd = x.data();
    for b in 0..n {
        let img = &xd[b * cin * h * w..(b + 1) * cin * h * w];
        cols.par_chunks_mut(ohw).enumerate().for_each(|(row, col)| {
            let ci = row / (kh * kw);
            let ky = (row / kw) % kh;
            let kx = row % kw;
            let plane = &img[ci * h * w..(ci + 1) * h * w];
            for oy in 0..oh {
                let iy = (oy * stride + ky) as isize - pt as isize;
                let dst = &mut col[oy * ow..(oy + 1) * ow];
                if iy < 0 || iy >= h as isize {
                    dst.fill(0.0);
                    continue;
                }
                let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                for (ox, d) in dst.iter_mut().enumerate() {
                    let ix = (ox * stride + kx) as isize - pl as isize;
                    *d = if ix >= 0 && ix < w as isize {
                        src[ix as usize]
                    } else {
                        0.0
                    };
                }
            }
        });
        let out = &mut y.data_mut()[b * cout * ohw..(b + 1) * cout * ohw];
        gemm(out, weight.data(), &cols, cout, kdim, ohw);
    }
}

fn epilogue(
    y: &mut Tensor,
    bias: Option<&Tensor>,
    act: Activation,
    residual: Option<&Tensor>,
    cout: usize,
    hw: usize,
) {
    if bias.is_none() && act == Activation::None && residual.is_none() {
        return;
    }
    let bd = bias.map(|b| b.data());
    let rd = residual.map(|r| r.data());
    y.data_mut()
        .par_chunks_mut(hw)
        .enumerate()
        .for_each(|(p, plane)| {
            let b = bd.map_or(0.0, |b| b[p % cout]);
            match rd {
                Some(r) => simd::bias_act_residual(plane, b, act, &r[p * hw..(p + 1) * hw]),
                None => simd::bias_act(plane, b, act),
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::Padding;

    /// Direct 7-loop convolution in f64: the reference every fast path is checked against.
    fn reference(x: &Tensor, wt: &Tensor, bias: Option<&Tensor>, spec: ConvSpec) -> Vec<f64> {
        let [n, cin, h, w] = x.dims4("t").unwrap();
        let [cout, cin_g, kh, kw] = wt.dims4("t").unwrap();
        let (oh, pt, _) = spec.padding.resolve(h, kh, spec.stride, true);
        let (ow, pl, _) = spec.padding.resolve(w, kw, spec.stride, false);
        let opg = cout / spec.groups;
        let mut out = vec![0.0f64; n * cout * oh * ow];
        for b in 0..n {
            for co in 0..cout {
                let gi = co / opg;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias.map_or(0.0, |bb| bb.data()[co] as f64);
                        for ci in 0..cin_g {
                            let cin_idx = gi * cin_g + ci;
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * spec.stride + ky) as isize - pt as isize;
                                    let ix = (ox * spec.stride + kx) as isize - pl as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xv = x.data()
                                        [((b * cin + cin_idx) * h + iy as usize) * w + ix as usize];
                                    let wv = wt.data()[((co * cin_g + ci) * kh + ky) * kw + kx];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[((b * cout + co) * oh + oy) * ow + ox] =
                            spec.act.apply(acc as f32) as f64;
                    }
                }
            }
        }
        out
    }

    fn rand_tensor(shape: Vec<usize>, seed: &mut u64) -> Tensor {
        let n = shape.iter().product();
        let data = (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::new(shape, data).unwrap()
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        n: usize,
        cin: usize,
        cout: usize,
        h: usize,
        w: usize,
        k: usize,
        stride: usize,
        groups: usize,
    ) {
        let mut seed = (n * 1000 + cin * 100 + h * 10 + k + stride) as u64;
        let x = rand_tensor(vec![n, cin, h, w], &mut seed);
        let wt = rand_tensor(vec![cout, cin / groups, k, k], &mut seed);
        let b = rand_tensor(vec![cout], &mut seed);
        let spec = ConvSpec {
            stride,
            groups,
            padding: Padding::Same,
            act: Activation::Swish,
        };
        let got = conv2d(&x, &wt, Some(&b), spec, None).unwrap();
        let want = reference(&x, &wt, Some(&b), spec);
        assert_eq!(got.len(), want.len());
        for (i, (g, r)) in got.data().iter().zip(&want).enumerate() {
            assert!(
                (*g as f64 - r).abs() <= 1e-4 * (1.0 + r.abs()),
                "n{n} cin{cin} cout{cout} {h}x{w} k{k} s{stride} g{groups}: element {i}: {g} vs {r}"
            );
        }
    }

    #[test]
    fn pointwise_matches_reference() {
        check(2, 7, 5, 9, 11, 1, 1, 1);
        check(1, 64, 810, 4, 4, 1, 1, 1);
    }

    #[test]
    fn depthwise_matches_reference_with_same_padding_edges() {
        for &(h, w) in &[(1, 1), (2, 3), (7, 8), (9, 9), (16, 15)] {
            for &k in &[3, 5] {
                for &s in &[1, 2] {
                    check(2, 6, 6, h, w, k, s, 6);
                }
            }
        }
    }

    #[test]
    fn general_conv_matches_reference() {
        check(2, 3, 8, 17, 12, 3, 2, 1);
        check(1, 4, 3, 5, 5, 3, 1, 1);
        check(1, 5, 4, 6, 7, 1, 2, 1);
    }

    #[test]
    fn residual_is_added_after_activation() {
        let mut seed = 3;
        let x = rand_tensor(vec![1, 4, 5, 5], &mut seed);
        let wt = rand_tensor(vec![4, 4, 1, 1], &mut seed);
        let r = rand_tensor(vec![1, 4, 5, 5], &mut seed);
        let spec = ConvSpec::same(Activation::Relu);
        let plain = conv2d(&x, &wt, None, spec, None).unwrap();
        let with_res = conv2d(&x, &wt, None, spec, Some(&r)).unwrap();
        for ((a, b), rv) in plain.data().iter().zip(with_res.data()).zip(r.data()) {
            assert!((a + rv - b).abs() < 1e-6);
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = Tensor::zeros(vec![1, 3, 4, 4]);
        let wt = Tensor::zeros(vec![8, 4, 3, 3]);
        assert!(conv2d(&x, &wt, None, ConvSpec::same(Activation::None), None).is_err());
        let wt = Tensor::zeros(vec![8, 3, 3, 3]);
        let b = Tensor::zeros(vec![7]);
        assert!(conv2d(&x, &wt, Some(&b), ConvSpec::same(Activation::None), None).is_err());
    }
}
