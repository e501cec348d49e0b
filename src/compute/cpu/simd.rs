//! Vectorisable math for the CPU engine: an `exp` the compiler can unroll into SIMD (libm's
//! `expf` is a scalar call and was 13% of a forward pass), and slice kernels compiled twice, for
//! baseline x86-64 and for AVX2+FMA, chosen at run time.

use crate::compute::Activation;

/// `e^x` for f32, Cephes-style: range reduction by `n = round(x / ln 2)`, a degree-6 polynomial,
/// then scaling by `2^n` through the exponent bits. Max relative error ~2 ulp over the clamped
/// range [-87.3, 88.3] (outside it, results saturate at the f32 extremes, which is what swish and
/// sigmoid need). Branch-free so loops over slices vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting rounds to nearest
    let x = x.clamp(-87.3, 88.3);
    // t = round(x * log2 e) + 1.5 * 2^23: the rounded integer n sits in t's low mantissa bits,
    // so n = bits(t) - bits(1.5 * 2^23). Integer ops only: a float->int `as` cast is saturating
    // and compiles to scalar code, which made this the hottest loop of the forward pass.
    let t = x * LOG2E + ROUND;
    let fx = t - ROUND;
    let n = t.to_bits().wrapping_sub(ROUND.to_bits());
    let r = x - fx * C1 - fx * C2;
    let z = r * r;
    let mut y = 1.987_569_1e-4_f32;
    y = y * r + 1.398_2e-3;
    y = y * r + 8.333_452e-3;
    y = y * r + 4.166_579_6e-2;
    y = y * r + 1.666_666_5e-1;
    y = y * r + 0.5;
    let y = y * z + r + 1.0;
    // n + 127 lies in 1..=254 after the clamp; wrapping ops keep overflow checks out of the loop.
    f32::from_bits(n.wrapping_add(127).wrapping_shl(23)) * y
}

#[inline(always)]
pub(crate) fn activate(act: Activation, x: f32) -> f32 {
    match act {
        Activation::None => x,
        Activation::Swish => x / (1.0 + exp(-x)),
        Activation::Sigmoid => 1.0 / (1.0 + exp(-x)),
        Activation::Relu => x.max(0.0),
    }
}

/// Generates `name(args)` that runs the AVX2+FMA build of `body` when the CPU has it.
macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) -> $ret {
            #[inline(always)]
            fn generic($($a: $t),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) -> $ret { generic($($a),*) }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($a),*) };
                }
            }
            generic($($a),*)
        }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),*) $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) {
            #[inline(always)]
            fn generic($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) { generic($($a),*) }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($a),*) };
                }
            }
            generic($($a),*)
        }
    };
}

// The kernels below use plain `for` loops: iterator adaptors with closures can be outlined
// out of the `target_feature` function, which silently loses the AVX2 code path.

dispatch! {
    /// `v = act(v + bias)` over a slice.
    pub(crate) fn bias_act(v: &mut [f32], bias: f32, act: Activation) {
        bias_act_inline(v, bias, act)
    }
}

dispatch! {
    /// `v = act(v + bias) + r` over a slice.
    pub(crate) fn bias_act_residual(v: &mut [f32], bias: f32, act: Activation, r: &[f32]) {
        let n = v.len().min(r.len());
        let (v, r) = (&mut v[..n], &r[..n]);
        for i in 0..n {
            v[i] = activate(act, v[i] + bias) + r[i];
        }
    }
}

/// `v = act(v + bias)`, the activation hoisted out of the loop.
#[inline(always)]
fn bias_act_inline(v: &mut [f32], bias: f32, act: Activation) {
    match act {
        Activation::None => {
            for x in v.iter_mut() {
                *x += bias;
            }
        }
        Activation::Swish => {
            for x in v.iter_mut() {
                let y = *x + bias;
                *x = y / (1.0 + exp(-y));
            }
        }
        Activation::Sigmoid => {
            for x in v.iter_mut() {
                *x = 1.0 / (1.0 + exp(-(*x + bias)));
            }
        }
        Activation::Relu => {
            for x in v.iter_mut() {
                *x = (*x + bias).max(0.0);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Training kernels (backward of activations, batch-norm statistics and normalisation)
// ------------------------------------------------------------------------------------------------

dispatch! {
    /// `g[i] *= act'(x[i])`: the backward of an activation, in place on the output gradient.
    pub(crate) fn act_backward(g: &mut [f32], x: &[f32], act: Activation) {
        let n = g.len().min(x.len());
        let (g, x) = (&mut g[..n], &x[..n]);
        match act {
            Activation::None => {}
            Activation::Relu => {
                for i in 0..n {
                    g[i] = if x[i] > 0.0 { g[i] } else { 0.0 };
                }
            }
            Activation::Sigmoid => {
                for i in 0..n {
                    let s = 1.0 / (1.0 + exp(-x[i]));
                    g[i] *= s * (1.0 - s);
                }
            }
            // d/dx [x s(x)] = s + x s (1 - s)
            Activation::Swish => {
                for i in 0..n {
                    let v = x[i];
                    let s = 1.0 / (1.0 + exp(-v));
                    g[i] *= s * (1.0 + v * (1.0 - s));
                }
            }
        }
    }
}

dispatch! {
    /// `sum(v)` accumulated in f64 (eight partial sums so the loop vectorises).
    pub(crate) fn sum_f64(v: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let chunks = v.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for k in 0..8 {
                acc[k] += c[k] as f64;
            }
        }
        let mut s: f64 = acc.iter().sum();
        for &x in rest {
            s += x as f64;
        }
        s
    }
}

dispatch! {
    /// `sum((v - mean)^2)` in f64.
    pub(crate) fn sq_dev_f64(v: &[f32], mean: f64) -> f64 {
        let mut acc = [0f64; 8];
        let chunks = v.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for k in 0..8 {
                let d = c[k] as f64 - mean;
                acc[k] += d * d;
            }
        }
        let mut s: f64 = acc.iter().sum();
        for &x in rest {
            let d = x as f64 - mean;
            s += d * d;
        }
        s
    }
}

dispatch! {
    /// `(sum(g), sum(g * x))` in f64 (each f32 product is exact in f64).
    pub(crate) fn sum_and_dot_f64(g: &[f32], x: &[f32]) -> (f64, f64) {
        let n = g.len().min(x.len());
        let (g, x) = (&g[..n], &x[..n]);
        let (mut sg, mut sgx) = ([0f64; 8], [0f64; 8]);
        let full = n / 8 * 8;
        for i in (0..full).step_by(8) {
            for k in 0..8 {
                let gv = g[i + k] as f64;
                sg[k] += gv;
                sgx[k] += gv * x[i + k] as f64;
            }
        }
        let (mut a, mut b): (f64, f64) = (sg.iter().sum(), sgx.iter().sum());
        for i in full..n {
            a += g[i] as f64;
            b += g[i] as f64 * x[i] as f64;
        }
        (a, b)
    }
}

dispatch! {
    /// `v = (v - mean) * scale + shift` in f64 (batch-norm normalisation with per-channel
    /// constants). f64 because f32 rounding here, although within an ulp per element, moved
    /// ill-conditioned gradients downstream (BiFPN fusion weights) by 1e-3; AVX2 does four
    /// lanes of f64 and the loop stays memory-bound.
    pub(crate) fn centered_affine(v: &mut [f32], mean: f64, scale: f64, shift: f64) {
        for x in v.iter_mut() {
            *x = ((*x as f64 - mean) * scale + shift) as f32;
        }
    }
}

dispatch! {
    /// `out = k1 * g + k2 * (x - mean) + k3` (the batch-norm input gradient).
    pub(crate) fn bn_input_grad(out: &mut [f32], g: &[f32], x: &[f32], mean: f32, k: [f32; 3]) {
        let n = out.len().min(g.len()).min(x.len());
        let (out, g, x) = (&mut out[..n], &g[..n], &x[..n]);
        for i in 0..n {
            out[i] = k[0] * g[i] + (k[1] * (x[i] - mean) + k[2]);
        }
    }
}

/// Layout of the padded input plane handed to [`depthwise_plane`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct PaddedPlane {
    /// Elements per padded row.
    pub row: usize,
    /// For stride 2, each row is stored de-interleaved: the even columns (`even` of them) first,
    /// then the odd ones, so every tap reads a contiguous run.
    pub even: usize,
}

impl PaddedPlane {
    /// Where padded column `col` of a row lives, for the given stride.
    #[inline(always)]
    pub(crate) fn column(self, col: usize, stride: usize) -> usize {
        if stride == 2 {
            if col.is_multiple_of(2) {
                col / 2
            } else {
                self.even + col / 2
            }
        } else {
            col
        }
    }
}

dispatch! {
    /// One depthwise-convolution output plane from a zero-padded input plane: each output row
    /// accumulates `kh * kw` shifted input rows, then gets `act(. + bias)` while it is still in
    /// L1. Strides 1 and 2 read contiguous runs (see [`PaddedPlane`]); one dispatch per plane keeps
    /// the row loops inlined in the AVX2 build.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn depthwise_plane(
        padded: &[f32],
        layout: PaddedPlane,
        k: &[f32],
        kh: usize,
        kw: usize,
        stride: usize,
        out: &mut [f32],
        ow: usize,
        bias: f32,
        act: Activation
    ) {
        for (oy, orow) in out.chunks_exact_mut(ow).enumerate() {
            for ky in 0..kh {
                let start = (oy * stride + ky) * layout.row;
                let irow = &padded[start..start + layout.row];
                for kx in 0..kw {
                    let wv = k[ky * kw + kx];
                    if stride <= 2 {
                        let at = layout.column(kx, stride);
                        let src = &irow[at..at + ow];
                        for (o, &v) in orow.iter_mut().zip(src) {
                            *o += wv * v;
                        }
                    } else {
                        for (i, o) in orow.iter_mut().enumerate() {
                            *o += wv * irow[i * stride + kx];
                        }
                    }
                }
            }
            bias_act_inline(orow, bias, act);
        }
    }
}

dispatch! {
    /// `out += w * src` elementwise with `out` starting from zero or a previous sum.
    pub(crate) fn scale_add(out: &mut [f32], src: &[f32], w: f32) {
        let n = out.len().min(src.len());
        let (out, src) = (&mut out[..n], &src[..n]);
        for i in 0..n {
            out[i] += src[i] * w;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_to_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.013;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert!(exp(-1000.0) < 1e-37 && exp(1000.0) > 1e38 && exp(1000.0).is_finite());
    }

    #[test]
    fn activations_saturate_without_nan() {
        for x in [-1e30f32, -100.0, -10.0, 0.0, 10.0, 100.0, 1e30] {
            for act in [Activation::Swish, Activation::Sigmoid] {
                assert!(activate(act, x).is_finite(), "{act:?}({x})");
            }
        }
        assert!((activate(Activation::Swish, 100.0) - 100.0).abs() < 1e-3);
        assert!(activate(Activation::Sigmoid, -100.0) < 1e-30);
    }
}
