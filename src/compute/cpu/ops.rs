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

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: Vec<usize>, f: impl Fn(usize) -> f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(shape, (0..n).map(f).collect()).unwrap()
    }

    #[test]
    fn channel_affine_is_per_channel_batch_norm() {
        let x = t(vec![2, 3, 2, 2], |i| i as f32 - 10.0);
        let scale = t(vec![3], |c| 1.0 + c as f32);
        let shift = t(vec![3], |c| -(c as f32));
        let y = channel_affine(&x, &scale, &shift, Activation::Relu).unwrap();
        for (i, (&yv, &xv)) in y.data().iter().zip(x.data()).enumerate() {
            let c = (i / 4) % 3;
            assert_eq!(yv, (xv * (1.0 + c as f32) - c as f32).max(0.0));
        }
        assert!(channel_affine(&x, &t(vec![2], |_| 1.0), &shift, Activation::None).is_err());
    }

    #[test]
    fn global_pool_and_channel_scaling() {
        let x = t(vec![2, 2, 3, 3], |i| i as f32);
        let m = global_avg_pool(&x).unwrap();
        assert_eq!(m.shape(), &[2, 2, 1, 1]);
        assert_eq!(m.data(), &[4.0, 13.0, 22.0, 31.0]);
        let s = t(vec![2, 2, 1, 1], |i| i as f32);
        let y = scale_channels(&x, &s).unwrap();
        for (i, (&yv, &xv)) in y.data().iter().zip(x.data()).enumerate() {
            assert_eq!(yv, xv * (i / 9) as f32);
        }
        assert!(scale_channels(&x, &t(vec![3], |_| 1.0)).is_err());
    }

    #[test]
    fn max_pool_same_pads_with_minus_infinity() {
        // All-negative input: zero padding would leak 0 into border outputs; -inf must not.
        let x = t(vec![1, 1, 5, 5], |i| -100.0 - i as f32);
        let y = max_pool_same(&x, 3, 2).unwrap();
        assert_eq!(y.shape(), &[1, 1, 3, 3]);
        // SAME for 5 -> 3 with k3 s2: total pad 2, one each side. Output (0,0) covers rows/cols 0..1.
        assert_eq!(y.data()[0], -100.0);
        // Output (2,2) covers rows/cols 3..4 (5 is padding): max is element (3,3).
        assert_eq!(y.data()[8], -100.0 - 18.0);
        // Even size: 4 -> 2, total pad 1, all of it bottom/right.
        let x = t(vec![1, 1, 4, 4], |i| i as f32);
        let y = max_pool_same(&x, 3, 2).unwrap();
        assert_eq!(y.data(), &[10.0, 11.0, 14.0, 15.0]);
    }

    #[test]
    fn nearest_upsampling_follows_pytorch() {
        let x = t(vec![1, 1, 2, 3], |i| i as f32);
        let y = upsample_nearest(&x, 4, 6).unwrap();
        assert_eq!(&y.data()[..6], &[0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
        assert_eq!(&y.data()[18..], &[3.0, 3.0, 4.0, 4.0, 5.0, 5.0]);
        // Non-integer ratio: src = floor(dst * in / out).
        let y = upsample_nearest(&x, 2, 5).unwrap();
        assert_eq!(&y.data()[..5], &[0.0, 0.0, 1.0, 1.0, 2.0]);
    }

    #[test]
    fn weighted_sum_fuses_and_activates() {
        let a = t(vec![1, 2, 70, 70], |i| (i % 13) as f32 - 6.0);
        let b = t(vec![1, 2, 70, 70], |i| (i % 7) as f32);
        let y = weighted_sum(&[&a, &b], &[0.25, 0.5], Activation::Swish).unwrap();
        for ((&yv, &av), &bv) in y.data().iter().zip(a.data()).zip(b.data()) {
            let s = 0.25 * av + 0.5 * bv;
            let want = s / (1.0 + (-s as f64).exp() as f32);
            assert!(
                (yv - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{yv} vs {want}"
            );
        }
    }
}
