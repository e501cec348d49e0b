//! Elementwise, pooling and resampling ops of the CPU backend. NCHW planes are the unit of
//! parallel work: each is contiguous, so every op streams memory front to back.

use rayon::prelude::*;

use super::simd;
use crate::compute::{Activation, Padding, Tensor};
use crate::error::{Error, Result};

/// Work below this many elements runs on the calling thread (rayon's overhead would dominate).
const PAR_MIN: usize = 1 << 14;

pub(super) fn apply_activation(data: &mut [f32], act: Activation) {
    if act == Activation::None {
        return;
    }
    if data.len() < PAR_MIN {
        data.iter_mut().for_each(|v| *v = act.apply(*v));
    } else {
        data.par_chunks_mut(4096)
            .for_each(|c| simd::bias_act(c, 0.0, act));
    }
}

fn channel_vec(op: &'static str, t: &Tensor, n: usize, c: usize) -> Result<()> {
    let ok = t.len() == c || t.len() == n * c;
    if !ok {
        return Err(Error::Shape {
            op,
            detail: format!(
                "per-channel tensor of shape {:?} does not fit {n}x{c}",
                t.shape()
            ),
        });
    }
    Ok(())
}

pub(super) fn channel_affine(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    act: Activation,
) -> Result<Tensor> {
    let [n, c, h, w] = x.dims4("channel_affine")?;
    if scale.len() != c || shift.len() != c {
        return Err(Error::Shape {
            op: "channel_affine",
            detail: format!(
                "{c} channels but scale {:?} and shift {:?}",
                scale.shape(),
                shift.shape()
            ),
        });
    }
    let mut y = x.clone();
    let (sc, sh) = (scale.data(), shift.data());
    y.data_mut()
        .par_chunks_mut(h * w)
        .enumerate()
        .for_each(|(i, plane)| {
            let ch = i % c;
            plane
                .iter_mut()
                .for_each(|v| *v = act.apply(*v * sc[ch] + sh[ch]));
        });
    let _ = n;
    Ok(y)
}

pub(super) fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let [n, c, h, w] = x.dims4("global_avg_pool")?;
    let hw = h * w;
    // Accumulate in f64: a sequential f32 sum over a 256x256 plane loses ~1e-5 relative, which
    // the SE gates feed through the whole backbone (it cost 1e-4 in the golden outputs).
    let data = x
        .data()
        .par_chunks(hw)
        .map(|p| (p.iter().map(|&v| v as f64).sum::<f64>() / hw as f64) as f32)
        .collect();
    Tensor::new(vec![n, c, 1, 1], data)
}

pub(super) fn scale_channels(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    let [n, c, h, w] = x.dims4("scale_channels")?;
    channel_vec("scale_channels", s, n, c)?;
    let per_image = s.len() == n * c;
    let mut y = x.clone();
    let sd = s.data();
    y.data_mut()
        .par_chunks_mut(h * w)
        .enumerate()
        .for_each(|(i, plane)| {
            let f = if per_image { sd[i] } else { sd[i % c] };
            plane.iter_mut().for_each(|v| *v *= f);
        });
    Ok(y)
}

pub(super) fn weighted_sum(xs: &[&Tensor], weights: &[f32], act: Activation) -> Result<Tensor> {
    let mut y = Tensor::zeros(xs[0].shape().to_vec());
    let len = y.len();
    let chunk = 4096;
    y.data_mut()
        .par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(ci, out)| {
            let start = ci * chunk;
            let end = (start + chunk).min(len);
            for (x, &wgt) in xs.iter().zip(weights) {
                simd::scale_add(out, &x.data()[start..end], wgt);
            }
            if act != Activation::None {
                simd::bias_act(out, 0.0, act);
            }
        });
    Ok(y)
}

pub(super) fn max_pool_same(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let [n, c, h, w] = x.dims4("max_pool_same")?;
    if kernel == 0 || stride == 0 {
        return Err(Error::Shape {
            op: "max_pool_same",
            detail: format!("kernel {kernel} and stride {stride} must be positive"),
        });
    }
    let (oh, pt, _) = Padding::Same.resolve(h, kernel, stride, true);
    let (ow, pl, _) = Padding::Same.resolve(w, kernel, stride, false);
    let mut y = Tensor::zeros(vec![n, c, oh, ow]);
    let src = x.data();
    y.data_mut()
        .par_chunks_mut(oh * ow)
        .enumerate()
        .for_each(|(p, out)| {
            let plane = &src[p * h * w..(p + 1) * h * w];
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut m = f32::NEG_INFINITY;
                    for ky in 0..kernel {
                        let iy = (oy * stride + ky) as isize - pt as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        let row = &plane[iy as usize * w..(iy as usize + 1) * w];
                        for kx in 0..kernel {
                            let ix = (ox * stride + kx) as isize - pl as isize;
                            if ix >= 0 && ix < w as isize {
                                m = m.max(row[ix as usize]);
                            }
                        }
                    }
                    out[oy * ow + ox] = m;
                }
            }
        });
    Ok(y)
}

pub(super) fn upsample_nearest(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let [n, c, h, w] = x.dims4("upsample_nearest")?;
    if oh == 0 || ow == 0 {
        return Err(Error::Shape {
            op: "upsample_nearest",
            detail: format!("target size {oh}x{ow} must be positive"),
        });
    }
    // PyTorch 'nearest': src = min(floor(dst * (in / out)), in - 1), scale in f32.
    let sy = h as f32 / oh as f32;
    let sx = w as f32 / ow as f32;
    let xmap: Vec<usize> = (0..ow)
        .map(|ox| ((ox as f32 * sx).floor() as usize).min(w - 1))
        .collect();
    let mut y = Tensor::zeros(vec![n, c, oh, ow]);
    let src = x.data();
    y.data_mut()
        .par_chunks_mut(oh * ow)
        .enumerate()
        .for_each(|(p, out)| {
            let plane = &src[p * h * w..(p + 1) * h * w];
            for oy in 0..oh {
                let iy = ((oy as f32 * sy).floor() as usize).min(h - 1);
                let row = &plane[iy * w..(iy + 1) * w];
                for (o, &ix) in out[oy * ow..(oy + 1) * ow].iter_mut().zip(&xmap) {
                    *o = row[ix];
                }
            }
        });
    Ok(y)
}
