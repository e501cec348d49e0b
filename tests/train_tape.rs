//! The autograd tape on a small network that uses every op the model needs, checked with
//! directional finite differences: for each leaf, (L(p + h d) - L(p - h d)) / 2h against <dL/dp, d>
//! for a random direction d. The per-op kernels are checked tightly in tests/backward.rs; this
//! checks that the tape wires them together (shapes, accumulation, fan-out, ordering). Forward
//! passes run in f32, so the tolerance is 5e-3 relative plus 2e-3 absolute: central differences
//! with h = 1e-3 on a loss of magnitude ~10 carry ~5e-4 absolute rounding error, which dominates
//! for derivatives near zero (e.g. a bias feeding batch norm, whose gradient is exactly zero).

use effdet::compute::cpu::CpuBackend;
use effdet::compute::{Activation, ConvSpec, Tensor};
use effdet::train::tape::{Tape, Var};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(
            shape.to_vec(),
            (0..n).map(|_| self.next() * scale).collect(),
        )
        .unwrap()
    }
}

const NAMES: [&str; 13] = [
    "x", "w1", "b1", "gamma", "beta", "wr", "br", "we", "be", "dw", "edges", "unused", "r",
];

fn params() -> Vec<Tensor> {
    let mut rng = Rng(42);
    vec![
        rng.tensor(&[2, 3, 9, 8], 1.0),                                    // x
        rng.tensor(&[6, 3, 3, 3], 0.5),                                    // w1: 3x3 stride 2
        rng.tensor(&[6], 0.2),                                             // b1
        Tensor::new(vec![6], vec![1.2, 0.8, 1.0, 0.7, 1.1, 0.9]).unwrap(), // gamma
        rng.tensor(&[6], 0.3),                                             // beta
        rng.tensor(&[2, 6, 1, 1], 0.5),                                    // SE reduce
        rng.tensor(&[2], 0.2),
        rng.tensor(&[6, 2, 1, 1], 0.5), // SE expand
        rng.tensor(&[6], 0.2),
        rng.tensor(&[6, 1, 3, 3], 0.5), // depthwise
        Tensor::new(vec![3], vec![0.8, 0.5, -0.4]).unwrap(), // fusion edges (one ReLU'd off)
        rng.tensor(&[4], 1.0),          // a leaf the loss does not use
        rng.tensor(&[2, 6, 5, 4], 1.0), // r: dL/dy
    ]
}

/// Builds the network on a fresh tape; returns the tape, the output, the loss and the leaves.
fn forward(p: &[Tensor]) -> (Tape, Var, f64, Vec<Var>) {
    let mut t = Tape::new(CpuBackend::new(1).unwrap());
    let v: Vec<Var> = p.iter().map(|x| t.leaf(x.clone(), true)).collect();
    let conv = ConvSpec::same(Activation::None);
    let h = t
        .conv2d(v[0], v[1], Some(v[2]), conv.with_stride(2))
        .unwrap();
    let (h, _) = t.batch_norm(h, v[3], v[4], 1e-3).unwrap();
    let a = t.activation(h, Activation::Swish).unwrap();
    let s = t.global_avg_pool(a).unwrap();
    let s = t.conv2d(s, v[5], Some(v[6]), conv).unwrap();
    let s = t.activation(s, Activation::Swish).unwrap();
    let s = t.conv2d(s, v[7], Some(v[8]), conv).unwrap();
    let s = t.activation(s, Activation::Sigmoid).unwrap();
    let se = t.scale_channels(a, s).unwrap();
    let d = t.conv2d(se, v[9], None, conv.with_groups(6)).unwrap();
    let res = t.add(d, a).unwrap(); // `a` fans out to SE, scale and this residual
    let pooled = t.max_pool_same(res, 3, 2).unwrap();
    let up = t.upsample_nearest(pooled, 5, 4).unwrap();
    let fused = t.fuse(&[up, d, res], v[10], 1e-4).unwrap();
    let y = t.activation(fused, Activation::Swish).unwrap();
    let y = t.drop_path(y, vec![true, false], 0.8).unwrap();
    let loss: f64 = t
        .value(y)
        .unwrap()
        .data()
        .iter()
        .zip(p[12].data())
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum();
    (t, y, loss, v)
}

/// Checks the gradient `g` of leaf `k` against central differences of `loss` along a random
/// direction: `(L(p + h d) - L(p - h d)) / 2h` vs `<g, d>`, with the tolerance the module
/// documentation explains.
fn check_direction(
    name: &str,
    p: &[Tensor],
    k: usize,
    g: &Tensor,
    rng: &mut Rng,
    loss: impl Fn(&[Tensor]) -> f64,
) {
    let dir: Vec<f32> = (0..p[k].len()).map(|_| rng.next()).collect();
    let analytic: f64 = g
        .data()
        .iter()
        .zip(&dir)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum();
    let h = 1e-3f32;
    let shifted = |sign: f32| {
        let mut q = p.to_vec();
        q[k].data_mut()
            .iter_mut()
            .zip(&dir)
            .for_each(|(v, d)| *v += sign * h * d);
        loss(&q)
    };
    let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * h as f64);
    assert!(
        (analytic - numeric).abs() <= 5e-3 * numeric.abs() + 2e-3,
        "{name}: analytic {analytic:.6} vs numeric {numeric:.6}"
    );
}

#[test]
fn tape_gradients_match_directional_finite_differences() {
    let p = params();
    let (mut tape, y, _, leaves) = forward(&p);
    let peak_forward = tape.peak_bytes();
    let grads = tape.backward(y, p[12].clone()).unwrap();
    assert!(tape.peak_bytes() >= peak_forward && peak_forward > 0);
    // Intermediate values are freed by the backward pass; leaves stay.
    assert!(tape.value(y).is_err());
    assert!(tape.value(leaves[0]).is_ok());
    // A leaf the output does not depend on gets no gradient.
    assert!(grads.get(leaves[11]).is_none());

    let mut rng = Rng(7);
    for (k, name) in NAMES.iter().enumerate().take(11) {
        let g = grads
            .get(leaves[k])
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        check_direction(name, &p, k, g, &mut rng, |q| forward(q).2);
    }
    // Batch norm removes any per-channel constant: the conv bias before it has zero gradient.
    let gb1 = grads.get(leaves[2]).unwrap();
    assert!(
        gb1.data().iter().all(|v| v.abs() < 1e-5),
        "{:?}",
        gb1.data()
    );
    // The ReLU'd-off edge weight gets exactly zero gradient.
    assert_eq!(grads.get(leaves[10]).unwrap().data()[2], 0.0);
}

#[test]
fn misuse_is_an_error() {
    let p = params();
    let (mut tape, y, _, leaves) = forward(&p);
    assert!(tape.backward(y, Tensor::zeros(vec![1, 2, 3, 4])).is_err());
    let mut t = Tape::new(CpuBackend::new(1).unwrap());
    let x = t.leaf(Tensor::zeros(vec![1, 1, 2, 2]), true);
    let w = t.leaf(Tensor::zeros(vec![1, 1, 1, 1]), true);
    assert!(
        t.conv2d(x, w, None, ConvSpec::same(Activation::Swish))
            .is_err()
    );
    let e = t.leaf(Tensor::zeros(vec![3]), true);
    assert!(t.fuse(&[x, x], e, 1e-4).is_err());
    let _ = leaves;
}

/// Frozen (inference-mode) batch norm on the tape: the output is `gamma (x - mean) / sigma +
/// beta` with the given statistics, and the gradients of x, gamma and beta (the statistics are
/// constants) match finite differences with the tolerance of the test above.
#[test]
fn frozen_batch_norm_matches_its_formula_and_finite_differences() {
    use effdet::compute::cpu::backward::BatchNormCache;
    let mut rng = Rng(11);
    let p = vec![
        rng.tensor(&[2, 4, 5, 3], 2.0),                           // x
        Tensor::new(vec![4], vec![1.3, 0.6, -0.9, 1.0]).unwrap(), // gamma
        rng.tensor(&[4], 0.5),                                    // beta
        rng.tensor(&[2, 4, 5, 3], 1.0),                           // r: dL/dy
    ];
    let stats = BatchNormCache {
        mean: vec![0.3, -0.2, 0.1, 0.5],
        var: vec![0.5, 2.0, 1.5, 0.25],
        eps: 1e-3,
        count: 0,
    };
    let forward = |p: &[Tensor]| {
        let mut t = Tape::new(CpuBackend::new(1).unwrap());
        let v: Vec<Var> = p[..3].iter().map(|x| t.leaf(x.clone(), true)).collect();
        let y = t
            .batch_norm_frozen(v[0], v[1], v[2], stats.clone())
            .unwrap();
        let y = t.activation(y, Activation::Swish).unwrap();
        let loss: f64 = t
            .value(y)
            .unwrap()
            .data()
            .iter()
            .zip(p[3].data())
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        (t, y, loss, v)
    };
    // The formula, before the swish.
    {
        let mut t = Tape::new(CpuBackend::new(1).unwrap());
        let v: Vec<Var> = p[..3].iter().map(|x| t.leaf(x.clone(), false)).collect();
        let y = t
            .batch_norm_frozen(v[0], v[1], v[2], stats.clone())
            .unwrap();
        for (i, (&got, &x)) in t
            .value(y)
            .unwrap()
            .data()
            .iter()
            .zip(p[0].data())
            .enumerate()
        {
            let c = (i / 15) % 4;
            let want = p[1].data()[c] * (x - stats.mean[c]) / (stats.var[c] + 1e-3).sqrt()
                + p[2].data()[c];
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{i}: {got} vs {want}"
            );
        }
    }
    let (mut tape, y, _, leaves) = forward(&p);
    let grads = tape.backward(y, p[3].clone()).unwrap();
    let mut dirs = Rng(5);
    for (k, name) in ["x", "gamma", "beta"].iter().enumerate() {
        let g = grads.get(leaves[k]).unwrap();
        check_direction(name, &p, k, g, &mut dirs, |q| forward(q).2);
    }
}
