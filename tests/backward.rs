//! Finite-difference checks (in f64) of every backward kernel the training module builds on.
//!
//! For each op: an independent f64 reference forward, a loss `L = sum(r * y)` with random `r`
//! (so dL/dy = r), central differences of L in f64, against the f32 backward kernel fed with `r`.
//! Tolerance: relative L2 <= 1e-4 (the kernels compute in f32, accumulating in f64 or, in the
//! convolution fast paths' GEMMs, in f32 over at most a few hundred terms at these sizes; central
//! differences with h = 1e-6 in f64 are accurate to ~1e-9).
//!
//! The convolution fast paths are also compared with the f64 reference backward
//! (`conv2d_backward_reference`) on the real D0 layer shapes, scaled down spatially.

use effdet::compute::cpu::backward::*;
use effdet::compute::{Activation, ConvSpec, Padding, Tensor};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
    /// Values exactly representable in f32, so f32 and f64 forwards see the same inputs.
    fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.next() as f32 as f64).collect()
    }
}

fn t32(shape: &[usize], v: &[f64]) -> Tensor {
    Tensor::new(shape.to_vec(), v.iter().map(|&x| x as f32).collect()).unwrap()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Central differences of `f` at `p`.
fn fd(p: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let h = 1e-6;
    let mut q = p.to_vec();
    (0..p.len())
        .map(|i| {
            q[i] = p[i] + h;
            let a = f(&q);
            q[i] = p[i] - h;
            let b = f(&q);
            q[i] = p[i];
            (a - b) / (2.0 * h)
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum::<f64>().max(1e-20);
    let rel = (num / den).sqrt();
    assert!(rel <= 1e-4, "{what}: relative L2 error {rel:.3e}");
}

/// f64 reference convolution (groups, stride, SAME padding).
fn conv_ref(
    x: &[f64],
    xs: [usize; 4],
    w: &[f64],
    ws: [usize; 4],
    b: &[f64],
    stride: usize,
    groups: usize,
) -> (Vec<f64>, [usize; 4]) {
    let [n, cin, h, wd] = xs;
    let [cout, cin_g, kh, kw] = ws;
    let (oh, pt, _) = Padding::Same.resolve(h, kh, stride, true);
    let (ow, pl, _) = Padding::Same.resolve(wd, kw, stride, false);
    let opg = cout / groups;
    let mut y = vec![0.0; n * cout * oh * ow];
    for bb in 0..n {
        for co in 0..cout {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = b[co];
                    for ci in 0..cin_g {
                        let c = (co / opg) * cin_g + ci;
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * stride + ky) as isize - pt as isize;
                                let ix = (ox * stride + kx) as isize - pl as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd {
                                    acc += x[((bb * cin + c) * h + iy as usize) * wd + ix as usize]
                                        * w[((co * cin_g + ci) * kh + ky) * kw + kx];
                                }
                            }
                        }
                    }
                    y[((bb * cout + co) * oh + oy) * ow + ox] = acc;
                }
            }
        }
    }
    (y, [n, cout, oh, ow])
}

#[test]
fn conv2d_backward_matches_finite_differences() {
    // (n, cin, cout, h, w, k, stride, groups): regular, strided, depthwise, odd sizes, SAME edges.
    let cases = [
        (2, 3, 4, 5, 6, 3, 1, 1),
        (1, 3, 2, 7, 5, 3, 2, 1),
        (2, 4, 4, 6, 7, 3, 2, 4),
        (1, 3, 3, 5, 5, 5, 1, 3),
        (1, 2, 3, 4, 4, 1, 1, 1),
        (1, 2, 2, 1, 1, 3, 2, 2),
    ];
    for (ci, &(n, cin, cout, h, w, k, s, g)) in cases.iter().enumerate() {
        let mut rng = Rng(ci as u64 + 1);
        let xs = [n, cin, h, w];
        let ws = [cout, cin / g, k, k];
        let x = rng.vec(xs.iter().product());
        let wt = rng.vec(ws.iter().product());
        let b = rng.vec(cout);
        let (y0, ys) = conv_ref(&x, xs, &wt, ws, &b, s, g);
        let r = rng.vec(y0.len());
        let spec = ConvSpec {
            stride: s,
            groups: g,
            padding: Padding::Same,
            act: Activation::None,
        };
        let grads = conv2d_backward(&t32(&xs, &x), &t32(&ws, &wt), spec, &t32(&ys, &r)).unwrap();
        let what = format!("case {ci}");
        assert_close(
            grads.input.data(),
            &fd(&x, |p| dot(&conv_ref(p, xs, &wt, ws, &b, s, g).0, &r)),
            &format!("{what} dx"),
        );
        assert_close(
            grads.weight.data(),
            &fd(&wt, |p| dot(&conv_ref(&x, xs, p, ws, &b, s, g).0, &r)),
            &format!("{what} dw"),
        );
        assert_close(
            grads.bias.data(),
            &fd(&b, |p| dot(&conv_ref(&x, xs, &wt, ws, p, s, g).0, &r)),
            &format!("{what} db"),
        );
    }
}

#[test]
fn activation_backward_matches_finite_differences() {
    let mut rng = Rng(7);
    // Keep ReLU inputs away from its kink.
    let x: Vec<f64> = rng
        .vec(40)
        .iter()
        .map(|v| v * 6.0)
        .map(|v: f64| if v.abs() < 0.01 { 0.5 } else { v } as f32 as f64)
        .collect();
    let r = rng.vec(40);
    for act in [
        Activation::Swish,
        Activation::Sigmoid,
        Activation::Relu,
        Activation::None,
    ] {
        let f = |v: f64| match act {
            Activation::Swish => v / (1.0 + (-v).exp()),
            Activation::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            Activation::Relu => v.max(0.0),
            Activation::None => v,
        };
        let got =
            activation_backward(&t32(&[1, 2, 4, 5], &x), act, &t32(&[1, 2, 4, 5], &r)).unwrap();
        let want = fd(&x, |p| p.iter().zip(&r).map(|(v, ri)| f(*v) * ri).sum());
        assert_close(got.data(), &want, &format!("{act:?}"));
    }
}

fn bn_ref(x: &[f64], s: [usize; 4], gamma: &[f64], beta: &[f64], eps: f64) -> Vec<f64> {
    let [n, c, h, w] = s;
    let hw = h * w;
    let mut y = vec![0.0; x.len()];
    for ch in 0..c {
        let idx: Vec<usize> = (0..n)
            .flat_map(|b| ((b * c + ch) * hw)..((b * c + ch + 1) * hw))
            .collect();
        let mean = idx.iter().map(|&i| x[i]).sum::<f64>() / idx.len() as f64;
        let var = idx.iter().map(|&i| (x[i] - mean).powi(2)).sum::<f64>() / idx.len() as f64;
        for &i in &idx {
            y[i] = (x[i] - mean) / (var + eps).sqrt() * gamma[ch] + beta[ch];
        }
    }
    y
}

#[test]
fn batch_norm_train_matches_reference_and_finite_differences() {
    let mut rng = Rng(11);
    let s = [3, 2, 3, 4];
    let x = rng.vec(s.iter().product());
    let gamma = rng.vec(2);
    let beta = rng.vec(2);
    let r = rng.vec(x.len());
    let eps = 1e-3;
    let g32: Vec<f32> = gamma.iter().map(|&v| v as f32).collect();
    let b32: Vec<f32> = beta.iter().map(|&v| v as f32).collect();
    let (y, cache) = batch_norm_train(&t32(&s, &x), &g32, &b32, eps as f32).unwrap();
    assert_close(y.data(), &bn_ref(&x, s, &gamma, &beta, eps), "forward");
    let grads = batch_norm_train_backward(&t32(&s, &x), &g32, &cache, &t32(&s, &r)).unwrap();
    assert_close(
        grads.input.data(),
        &fd(&x, |p| dot(&bn_ref(p, s, &gamma, &beta, eps), &r)),
        "dx",
    );
    assert_close(
        &grads.gamma,
        &fd(&gamma, |p| dot(&bn_ref(&x, s, p, &beta, eps), &r)),
        "dgamma",
    );
    assert_close(
        &grads.beta,
        &fd(&beta, |p| dot(&bn_ref(&x, s, &gamma, p, eps), &r)),
        "dbeta",
    );
}

#[test]
fn pooling_scaling_and_resampling_backward() {
    let mut rng = Rng(13);
    // Global average pool.
    let s = [2, 3, 3, 5];
    let x = rng.vec(s.iter().product());
    let r = rng.vec(6);
    let gap =
        |p: &[f64]| -> Vec<f64> { p.chunks(15).map(|c| c.iter().sum::<f64>() / 15.0).collect() };
    let got = global_avg_pool_backward(&s, &t32(&[2, 3, 1, 1], &r)).unwrap();
    assert_close(got.data(), &fd(&x, |p| dot(&gap(p), &r)), "global_avg_pool");

    // Channel scaling (SE).
    let sc = rng.vec(6);
    let r2 = rng.vec(x.len());
    let scale = |xv: &[f64], sv: &[f64]| -> Vec<f64> {
        xv.iter().enumerate().map(|(i, v)| v * sv[i / 15]).collect()
    };
    let (gx, gs) =
        scale_channels_backward(&t32(&s, &x), &t32(&[2, 3, 1, 1], &sc), &t32(&s, &r2)).unwrap();
    assert_close(gx.data(), &fd(&x, |p| dot(&scale(p, &sc), &r2)), "scale dx");
    assert_close(gs.data(), &fd(&sc, |p| dot(&scale(&x, p), &r2)), "scale ds");

    // Max pool 3x3/2 SAME on odd and even sizes (distinct values: no ties for the FD step to flip).
    for &(h, w) in &[(5usize, 5usize), (4, 6), (1, 3)] {
        let s = [1, 2, h, w];
        let x: Vec<f64> = (0..2 * h * w)
            .map(|i| ((i * 7919) % 101) as f64 / 10.0 - 5.0)
            .collect();
        let pool = |p: &[f64]| -> Vec<f64> {
            let (oh, pt, _) = Padding::Same.resolve(h, 3, 2, true);
            let (ow, pl, _) = Padding::Same.resolve(w, 3, 2, false);
            let mut y = vec![];
            for c in 0..2 {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut m = f64::NEG_INFINITY;
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let iy = (oy * 2 + ky) as isize - pt as isize;
                                let ix = (ox * 2 + kx) as isize - pl as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    m = m.max(p[(c * h + iy as usize) * w + ix as usize]);
                                }
                            }
                        }
                        y.push(m);
                    }
                }
            }
            y
        };
        let y0 = pool(&x);
        let r = rng.vec(y0.len());
        let oh = y0.len() / 2;
        let (ohh, _, _) = Padding::Same.resolve(h, 3, 2, true);
        let got =
            max_pool_same_backward(&t32(&s, &x), 3, 2, &t32(&[1, 2, ohh, oh / ohh], &r)).unwrap();
        assert_close(
            got.data(),
            &fd(&x, |p| dot(&pool(p), &r)),
            &format!("max_pool {h}x{w}"),
        );
    }

    // Nearest upsampling x2 and to an odd size.
    for &(oh, ow) in &[(6usize, 8usize), (5, 7)] {
        let s = [1, 2, 3, 4];
        let x = rng.vec(24);
        let up = |p: &[f64]| -> Vec<f64> {
            let mut y = vec![];
            for c in 0..2 {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let iy = ((oy as f32 * (3.0 / oh as f32)).floor() as usize).min(2);
                        let ix = ((ox as f32 * (4.0 / ow as f32)).floor() as usize).min(3);
                        y.push(p[(c * 3 + iy) * 4 + ix]);
                    }
                }
            }
            y
        };
        let r = rng.vec(2 * oh * ow);
        let got = upsample_nearest_backward(&s, &t32(&[1, 2, oh, ow], &r)).unwrap();
        assert_close(
            got.data(),
            &fd(&x, |p| dot(&up(p), &r)),
            &format!("upsample to {oh}x{ow}"),
        );
    }
}

#[test]
fn fusion_backward_matches_finite_differences_including_relu_gates() {
    let mut rng = Rng(17);
    let s = [1, 2, 3, 3];
    let xs: Vec<Vec<f64>> = (0..3).map(|_| rng.vec(18)).collect();
    let e = vec![0.7f32 as f64, -0.3f32 as f64, 1.2f32 as f64]; // the middle edge is ReLU'd off
    let eps = 1e-4;
    let r = rng.vec(18);
    let fuse = |xv: &[Vec<f64>], ev: &[f64]| -> Vec<f64> {
        let w: Vec<f64> = ev.iter().map(|v| v.max(0.0)).collect();
        let d = w.iter().sum::<f64>() + eps;
        (0..18)
            .map(|i| (0..3).map(|k| xv[k][i] * w[k]).sum::<f64>() / d)
            .collect()
    };
    let t: Vec<Tensor> = xs.iter().map(|x| t32(&s, x)).collect();
    let refs: Vec<&Tensor> = t.iter().collect();
    let e32: Vec<f32> = e.iter().map(|&v| v as f32).collect();
    let (gxs, ge) = weighted_sum_backward(&refs, &e32, eps as f32, &t32(&s, &r)).unwrap();
    for k in 0..3 {
        let want = fd(&xs[k], |p| {
            let mut xv = xs.clone();
            xv[k] = p.to_vec();
            dot(&fuse(&xv, &e), &r)
        });
        assert_close(gxs[k].data(), &want, &format!("dx{k}"));
    }
    assert_close(&ge, &fd(&e, |p| dot(&fuse(&xs, p), &r)), "d edge weights");
    assert_eq!(ge[1], 0.0);
}

#[test]
fn drop_path_scales_kept_samples_and_zeroes_dropped_ones() {
    let x = Tensor::new(vec![3, 1, 1, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let y = drop_path(&x, &[true, false, true], 0.8).unwrap();
    assert_eq!(y.data(), &[1.25, 2.5, 0.0, 0.0, 6.25, 7.5]);
    assert!(drop_path(&x, &[true], 0.8).is_err());
    assert!(drop_path(&x, &[true, true, true], 0.0).is_err());
}

#[test]
fn bad_shapes_are_errors() {
    let x = Tensor::zeros(vec![1, 2, 4, 4]);
    let w = Tensor::zeros(vec![3, 2, 3, 3]);
    let wrong = Tensor::zeros(vec![1, 3, 5, 5]);
    assert!(conv2d_backward(&x, &w, ConvSpec::same(Activation::None), &wrong).is_err());
    assert!(conv2d_backward_reference(&x, &w, ConvSpec::same(Activation::None), &wrong).is_err());
    assert!(activation_backward(&x, Activation::Swish, &wrong).is_err());
    assert!(max_pool_same_backward(&x, 3, 2, &wrong).is_err());
}

/// Relative L2 error and largest absolute error of `got` against `want`.
fn errors(got: &[f32], want: &[f32]) -> (f64, f64) {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den, mut max_abs) = (0f64, 0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        let d = (g as f64 - w as f64).abs();
        num += d * d;
        den += (w as f64).powi(2);
        max_abs = max_abs.max(d);
    }
    ((num / den.max(1e-30)).sqrt(), max_abs)
}

/// Runs the fast [`conv2d_backward`] and [`conv2d_backward_reference`] on one shape with random
/// inputs and output gradient, and compares the three gradients.
///
/// Tolerances: the reference accumulates in f64 and rounds once; the fast paths accumulate GEMM
/// dot products in f32 (as PyTorch does) over up to `batch * H * W` terms for dW (2048 here).
/// For random data the f32 rounding error of such sums grows like `sqrt(terms) * 2^-24` relative
/// to their scale: the worst case measured over these shapes is 4e-7 relative L2 and 7e-7 max-abs
/// (relative to the largest magnitude), both for dW. A bound of 1e-5 on both leaves a >10x margin
/// (other thread counts and GEMM kernels round differently) while any indexing or padding mistake
/// gives errors of order 1; the max-abs check makes sure a few wrong elements (say, one border
/// pixel) cannot hide in the L2 norm of a large tensor.
fn check_fast_against_reference(
    what: &str,
    [n, cin, cout, h, w]: [usize; 5],
    k: usize,
    stride: usize,
    groups: usize,
    padding: Padding,
) {
    let mut rng = Rng((n * 7 + cin * 131 + h * 17 + w + k * 5 + stride) as u64);
    let x = t32(&[n, cin, h, w], &rng.vec(n * cin * h * w));
    let wt = t32(
        &[cout, cin / groups, k, k],
        &rng.vec(cout * cin / groups * k * k),
    );
    let spec = ConvSpec {
        stride,
        groups,
        padding,
        act: Activation::None,
    };
    let (oh, _, _) = padding.resolve(h, k, stride, true);
    let (ow, _, _) = padding.resolve(w, k, stride, false);
    let dy = t32(&[n, cout, oh, ow], &rng.vec(n * cout * oh * ow));
    let fast = conv2d_backward(&x, &wt, spec, &dy).unwrap();
    let slow = conv2d_backward_reference(&x, &wt, spec, &dy).unwrap();
    for (name, got, want) in [
        ("dx", &fast.input, &slow.input),
        ("dw", &fast.weight, &slow.weight),
        ("db", &fast.bias, &slow.bias),
    ] {
        assert_eq!(got.shape(), want.shape(), "{what} {name}: shapes");
        let (rel, max_abs) = errors(got.data(), want.data());
        let scale = want.data().iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        assert!(rel <= 1e-5, "{what} {name}: relative L2 error {rel:.3e}");
        assert!(
            max_abs <= 1e-5 * scale,
            "{what} {name}: max abs error {max_abs:.3e} (largest magnitude {scale:.3e})"
        );
    }
}

#[test]
fn pointwise_backward_fast_path_matches_reference() {
    // D0 channel counts (stage-1 project, stage-2 project, BiFPN), batch 2, 32x32 and odd 17x23.
    for (cin, cout) in [(32, 16), (96, 24), (64, 64)] {
        for (h, w) in [(32, 32), (17, 23)] {
            check_fast_against_reference(
                &format!("1x1 {cin}->{cout} {h}x{w}"),
                [2, cin, cout, h, w],
                1,
                1,
                1,
                Padding::Same,
            );
        }
    }
}

#[test]
fn stem_backward_fast_path_matches_reference() {
    // The stem: 3 -> 32, 3x3 stride 2, TF-SAME (pads 0/1 on even sizes, 1/1 on odd ones).
    for (h, w) in [(64, 64), (63, 63), (31, 48)] {
        check_fast_against_reference(
            &format!("stem {h}x{w}"),
            [2, 3, 32, h, w],
            3,
            2,
            1,
            Padding::Same,
        );
    }
}

#[test]
fn depthwise_backward_fast_path_matches_reference() {
    // D0 depthwise layers: (channels, kernel, stride), on even and odd sizes.
    for (c, k, s) in [(32, 3, 1), (96, 3, 2), (240, 5, 1), (144, 5, 2)] {
        for (h, w) in [(16, 16), (17, 17), (9, 14), (1, 1), (2, 3)] {
            check_fast_against_reference(
                &format!("dw {c} {k}x{k} s{s} {h}x{w}"),
                [2, c, c, h, w],
                k,
                s,
                c,
                Padding::Same,
            );
        }
    }
}

#[test]
fn other_conv_backward_shapes_match_reference() {
    let explicit = Padding::Explicit {
        top: 2,
        bottom: 0,
        left: 1,
        right: 3,
    };
    let cases = [
        // Dense 3x3 stride 1 (im2col path), more channels than the stem.
        ("dense 3x3 s1", [2, 8, 12, 11, 10], 3, 1, 1, Padding::Same),
        // 1x1 stride 2 and a padded 1x1: not pointwise, take the im2col path.
        ("1x1 s2", [2, 6, 5, 9, 8], 1, 2, 1, Padding::Same),
        ("1x1 padded", [1, 4, 3, 5, 6], 1, 1, 1, explicit),
        // Explicit asymmetric padding and stride 3.
        ("dense explicit s2", [2, 3, 4, 9, 7], 3, 2, 1, explicit),
        ("dense 5x5 s3", [1, 2, 3, 13, 11], 5, 3, 1, Padding::Same),
        ("dw explicit s2", [2, 5, 5, 9, 7], 3, 2, 5, explicit),
        ("dw 3x3 s3", [2, 4, 4, 10, 11], 3, 3, 4, Padding::Same),
        // Grouped but not depthwise: the reference fallback.
        ("grouped", [2, 6, 4, 7, 6], 3, 1, 2, Padding::Same),
    ];
    for (what, dims, k, s, g, padding) in cases {
        check_fast_against_reference(what, dims, k, s, g, padding);
    }
}

#[test]
fn conv_backward_is_deterministic() {
    let mut rng = Rng(23);
    let x = t32(&[2, 32, 40, 40], &rng.vec(2 * 32 * 1600));
    let wt = t32(&[16, 32, 1, 1], &rng.vec(16 * 32));
    let dy = t32(&[2, 16, 40, 40], &rng.vec(2 * 16 * 1600));
    let spec = ConvSpec::same(Activation::None);
    let a = conv2d_backward(&x, &wt, spec, &dy).unwrap();
    let b = conv2d_backward(&x, &wt, spec, &dy).unwrap();
    assert_eq!(a.input.data(), b.input.data());
    assert_eq!(a.weight.data(), b.weight.data());
    assert_eq!(a.bias.data(), b.bias.data());
}
