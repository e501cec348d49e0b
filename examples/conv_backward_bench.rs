//! Times the convolution backward on representative EfficientDet-D0 training shapes (512x512
//! input, batch 2): the forward convolution (`CpuBackend::conv2d`), the fast backward
//! (`conv2d_backward`) and the slow f64 reference (`conv2d_backward_reference`).
//!
//! ```sh
//! cargo run --release --example conv_backward_bench [-- THREADS [FILTER]]
//! ```
//!
//! `THREADS` 0 (the default) means one per core; `FILTER` keeps the shapes whose name contains it.
//!
//! Everything runs in the backend's thread pool (all cores by default). The reference is timed
//! only when a run on a 1/8-scale version of the shape predicts under 5 s for the full one.

use std::time::{Duration, Instant};

use effdet::compute::cpu::CpuBackend;
use effdet::compute::cpu::backward::{conv2d_backward, conv2d_backward_reference};
use effdet::compute::{Activation, Backend, ConvSpec, Padding, Tensor};

/// One benchmarked convolution: NCHW input dims, output channels, square kernel, stride, groups.
struct Shape {
    name: &'static str,
    input: [usize; 4],
    cout: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
}

impl Shape {
    const fn new(
        name: &'static str,
        input: [usize; 4],
        cout: usize,
        kernel: usize,
        stride: usize,
        groups: usize,
    ) -> Self {
        Shape {
            name,
            input,
            cout,
            kernel,
            stride,
            groups,
        }
    }

    fn spec(&self) -> ConvSpec {
        ConvSpec {
            stride: self.stride,
            groups: self.groups,
            padding: Padding::Same,
            act: Activation::None,
        }
    }

    /// The same convolution on an input `1/scale` the size in each spatial dimension.
    fn scaled_down(&self, scale: usize) -> Shape {
        let [n, c, h, w] = self.input;
        Shape {
            input: [n, c, (h / scale).max(1), (w / scale).max(1)],
            ..*self
        }
    }

    /// Random input, weight and output gradient.
    fn tensors(&self, seed: &mut u64) -> Result<(Tensor, Tensor, Tensor), effdet::Error> {
        let [n, c, h, w] = self.input;
        let spec = self.spec();
        let (oh, _, _) = spec.padding.resolve(h, self.kernel, self.stride, true);
        let (ow, _, _) = spec.padding.resolve(w, self.kernel, self.stride, false);
        let x = random(vec![n, c, h, w], seed)?;
        let wt = random(
            vec![self.cout, c / self.groups, self.kernel, self.kernel],
            seed,
        )?;
        let dy = random(vec![n, self.cout, oh, ow], seed)?;
        Ok((x, wt, dy))
    }
}

const SHAPES: [Shape; 7] = [
    Shape::new("stem 3->32 3x3 s2 @512", [2, 3, 512, 512], 32, 3, 2, 1),
    Shape::new("pw 32->16 @256", [2, 32, 256, 256], 16, 1, 1, 1),
    Shape::new("pw 24->144 @128", [2, 24, 128, 128], 144, 1, 1, 1),
    Shape::new("dw 144 3x3 s2 @128", [2, 144, 128, 128], 144, 3, 2, 144),
    Shape::new("dw 240 5x5 s1 @64", [2, 240, 64, 64], 240, 5, 1, 240),
    Shape::new("pw 480->80 @32", [2, 480, 32, 32], 80, 1, 1, 1),
    Shape::new("BiFPN pw 64->64 @64", [2, 64, 64, 64], 64, 1, 1, 1),
];

/// Reference runs predicted to take longer than this are skipped.
const REFERENCE_BUDGET: Duration = Duration::from_secs(5);

fn random(shape: Vec<usize>, seed: &mut u64) -> Result<Tensor, effdet::Error> {
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::new(shape, data)
}

/// Median wall time of `f` over enough runs to fill ~1 s (at least 3, after one warm-up run).
fn time<T>(mut f: impl FnMut() -> Result<T, effdet::Error>) -> Result<Duration, effdet::Error> {
    f()?;
    let mut runs = Vec::new();
    let start = Instant::now();
    while runs.len() < 3 || (start.elapsed() < Duration::from_secs(1) && runs.len() < 50) {
        let t = Instant::now();
        f()?;
        runs.push(t.elapsed());
    }
    runs.sort();
    Ok(runs[runs.len() / 2])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Relative L2 difference of `a` from `b`.
fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let (num, den) = a
        .data()
        .iter()
        .zip(b.data())
        .fold((0f64, 0f64), |(n, d), (&x, &y)| {
            (n + (x as f64 - y as f64).powi(2), d + (y as f64).powi(2))
        });
    (num / den.max(1e-30)).sqrt()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let threads = match args.next() {
        Some(a) => a.parse()?,
        None => 0,
    };
    let filter = args.next().unwrap_or_default();
    let cpu = CpuBackend::new(threads)?;
    println!(
        "conv backward, batch 2, 512x512 input, {} threads",
        cpu.threads()
    );
    println!(
        "{:<24} {:>10} {:>10} {:>7} {:>12}  ref vs fast (rel L2)",
        "shape", "fwd ms", "bwd ms", "bwd/fwd", "ref bwd ms"
    );
    let mut seed = 1u64;
    for shape in SHAPES.iter().filter(|s| s.name.contains(filter.as_str())) {
        let spec = shape.spec();
        let (x, wt, dy) = shape.tensors(&mut seed)?;
        let fwd = time(|| cpu.conv2d(&x, &wt, None, spec, None))?;
        let bwd = time(|| cpu.install(|| conv2d_backward(&x, &wt, spec, &dy)))?;

        // Predict the reference's time from a 1/8-scale run (64x fewer pixels).
        let small = shape.scaled_down(8);
        let (sx, sw, sdy) = small.tensors(&mut seed)?;
        let t = Instant::now();
        cpu.install(|| conv2d_backward_reference(&sx, &sw, spec, &sdy))?;
        let predicted = t.elapsed() * 64;
        let (reference, diff) = if predicted <= REFERENCE_BUDGET {
            let t = Instant::now();
            let slow = cpu.install(|| conv2d_backward_reference(&x, &wt, spec, &dy))?;
            let elapsed = t.elapsed();
            let fast = cpu.install(|| conv2d_backward(&x, &wt, spec, &dy))?;
            let worst = rel_l2(&fast.input, &slow.input)
                .max(rel_l2(&fast.weight, &slow.weight))
                .max(rel_l2(&fast.bias, &slow.bias));
            (format!("{:12.1}", ms(elapsed)), format!("{worst:.1e}"))
        } else {
            (
                format!("{:>12}", format!("~{:.0}s skip", predicted.as_secs_f64())),
                "-".to_string(),
            )
        };
        println!(
            "{:<24} {:>10.2} {:>10.2} {:>7.2} {}  {}",
            shape.name,
            ms(fwd),
            ms(bwd),
            bwd.as_secs_f64() / fwd.as_secs_f64(),
            reference,
            diff
        );
    }
    Ok(())
}
