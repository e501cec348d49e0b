//! Backward (gradient) kernels of the CPU engine: for every forward op the model uses, the
//! vector-Jacobian product given the gradient of the loss with respect to the op's output.
//!
//! These are the CPU reference the training tape calls and a CUDA backend must match. They are
//! written as direct loops that mirror the forward definitions (clarity first; the GEMM-based fast
//! paths come with training performance work) and checked against f64 finite differences.
//!
//! Conventions: activations NCHW, conv weights `[out, in / groups, kh, kw]`, TF-SAME padding
//! resolved exactly as the forward does ([`Padding::resolve`]).

use rayon::prelude::*;

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

/// Backward of `conv2d(x, w) + b` (no activation or residual: apply [`activation_backward`] to
/// the output gradient first; a residual's gradient is the output gradient itself).
/// Regular and depthwise (`groups == in_channels`) convolutions, any stride, TF-SAME or explicit
/// padding.
pub fn conv2d_backward(
    x: &Tensor,
    weight: &Tensor,
    spec: ConvSpec,
    grad_out: &Tensor,
) -> Result<ConvGrads> {
    let [n, cin, h, w] = x.dims4("conv2d_backward")?;
    let [cout, cin_g, kh, kw] = weight.dims4("conv2d_backward weight")?;
    let g = spec.groups;
    if g == 0 || cin % g != 0 || cout % g != 0 || cin / g != cin_g || spec.stride == 0 {
        return Err(shape_err(
            "conv2d_backward",
            format!(
                "input {cin} channels, weight {:?}, groups {g}",
                weight.shape()
            ),
        ));
    }
    let (oh, pt, _) = spec.padding.resolve(h, kh, spec.stride, true);
    let (ow, pl, _) = spec.padding.resolve(w, kw, spec.stride, false);
    if grad_out.shape() != [n, cout, oh, ow] {
        return Err(shape_err(
            "conv2d_backward",
            format!(
                "output gradient {:?}, expected [{n}, {cout}, {oh}, {ow}]",
                grad_out.shape()
            ),
        ));
    }
    let s = spec.stride;
    let opg = cout / g;
    let (xd, wd, gd) = (x.data(), weight.data(), grad_out.data());
    // Input position of output (oy, ox) and tap (ky, kx), if inside the image.
    let at = |oy: usize, ox: usize, ky: usize, kx: usize| -> Option<(usize, usize)> {
        let iy = (oy * s + ky) as isize - pt as isize;
        let ix = (ox * s + kx) as isize - pl as isize;
        (iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w)
            .then_some((iy as usize, ix as usize))
    };

    // dW[co, ci, ky, kx] = sum_{n, oy, ox} dY[n, co, oy, ox] * X[n, group(co) * cin_g + ci, iy, ix]
    let mut gw = vec![0f32; weight.len()];
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
                                        acc += dy[oy * ow + ox] as f64 * plane[iy * w + ix] as f64;
                                    }
                                }
                            }
                            out[(ci * kh + ky) * kw + kx] += acc as f32;
                        }
                    }
                }
            }
        });

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
    let mut gx = vec![0f32; x.len()];
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

    Ok(ConvGrads {
        input: Tensor::new(x.shape().to_vec(), gx)?,
        weight: Tensor::new(weight.shape().to_vec(), gw)?,
        bias: Tensor::new(vec![cout], gb)?,
    })
}

/// Backward of `y = act(x)` given the pre-activation `x`.
pub fn activation_backward(x: &Tensor, act: Activation, grad_out: &Tensor) -> Result<Tensor> {
    check_same("activation_backward", x, grad_out)?;
    let data = x
        .data()
        .par_iter()
        .zip(grad_out.data().par_iter())
        .map(|(&v, &g)| {
            let d = match act {
                Activation::None => 1.0,
                Activation::Relu => {
                    if v > 0.0 {
                        1.0
                    } else {
                        0.0
                    }
                }
                Activation::Sigmoid => {
                    let s = Activation::Sigmoid.apply(v);
                    s * (1.0 - s)
                }
                // d/dx [x * s(x)] = s + x * s * (1 - s)
                Activation::Swish => {
                    let s = Activation::Sigmoid.apply(v);
                    s * (1.0 + v * (1.0 - s))
                }
            };
            g * d
        })
        .collect();
    Tensor::new(x.shape().to_vec(), data)
}

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
    let plane_sum = |ch: usize, f: &(dyn Fn(f64) -> f64 + Sync)| -> f64 {
        (0..n)
            .map(|b| {
                xd[(b * c + ch) * hw..(b * c + ch + 1) * hw]
                    .iter()
                    .map(|&v| f(v as f64))
                    .sum::<f64>()
            })
            .sum()
    };
    // Pass 1: sums and the element count -> mean.
    let mut sums: Vec<f64> = (0..c)
        .into_par_iter()
        .map(|ch| plane_sum(ch, &|v| v))
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
        .map(|ch| {
            let m = mean[ch];
            plane_sum(ch, &move |v| (v - m) * (v - m))
        })
        .collect();
    reduce(&mut sq)?;
    let stats: Vec<(f64, f64)> = mean
        .iter()
        .zip(&sq)
        .map(|(&m, &s)| (m, s / count))
        .collect();
    let mut y = x.clone();
    y.data_mut()
        .par_chunks_mut(hw.max(1))
        .enumerate()
        .for_each(|(p, plane)| {
            let ch = p % c;
            let (mean, var) = stats[ch];
            let inv = 1.0 / (var + eps as f64).sqrt();
            for v in plane.iter_mut() {
                *v = ((*v as f64 - mean) * inv * gamma[ch] as f64 + beta[ch] as f64) as f32;
            }
        });
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
    check_same("batch_norm_train_backward", x, grad_out)?;
    let [n, c, h, w] = x.dims4("batch_norm_train_backward")?;
    if gamma.len() != c || cache.mean.len() != c || cache.var.len() != c {
        return Err(shape_err(
            "batch_norm_train_backward",
            format!(
                "{c} channels, gamma {} / statistics {}",
                gamma.len(),
                cache.mean.len()
            ),
        ));
    }
    let hw = h * w;
    let count = cache.count as f64;
    let (xd, gd) = (x.data(), grad_out.data());
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let inv = 1.0 / (cache.var[ch] as f64 + cache.eps as f64).sqrt();
            let (mut sg, mut sgx) = (0f64, 0f64);
            for b in 0..n {
                let r = (b * c + ch) * hw..(b * c + ch + 1) * hw;
                for (&xv, &g) in xd[r.clone()].iter().zip(&gd[r]) {
                    let xh = (xv as f64 - cache.mean[ch] as f64) * inv;
                    sg += g as f64;
                    sgx += g as f64 * xh;
                }
            }
            (sg, sgx)
        })
        .collect();
    let mut global: Vec<f64> = sums.iter().flat_map(|&(a, b)| [a, b]).collect();
    reduce(&mut global)?;
    let mut gx = vec![0f32; x.len()];
    gx.par_chunks_mut(hw.max(1))
        .enumerate()
        .for_each(|(p, out)| {
            let ch = p % c;
            let inv = 1.0 / (cache.var[ch] as f64 + cache.eps as f64).sqrt();
            let (sg, sgx) = (global[2 * ch], global[2 * ch + 1]);
            let r = p * hw..(p + 1) * hw;
            for ((o, &xv), &g) in out.iter_mut().zip(&xd[r.clone()]).zip(&gd[r]) {
                let xh = (xv as f64 - cache.mean[ch] as f64) * inv;
                *o = (gamma[ch] as f64 * inv * (g as f64 - sg / count - xh * sgx / count)) as f32;
            }
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
