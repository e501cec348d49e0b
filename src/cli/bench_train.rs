//! `effdet bench-train`: the time of a training step.

use std::time::Instant;

use effdet::{Error, Frame, PixelFormat};

use super::common::*;

#[derive(clap::Args)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Images per step.
    #[arg(long, default_value_t = 2, value_name = "B")]
    pub batch: usize,
    /// Timed steps (after warm-up).
    #[arg(long, default_value_t = 5, value_name = "K")]
    pub iters: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 1, value_name = "W")]
    pub warmup: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Boxes of the training benchmark in a 512x512 frame (`[y1, x1, y2, x2]`, class): the same
/// list as `bench/pytorch_train_step.py`, scaled to the input size (classes wrap around for
/// models with fewer than 90).
pub const BENCH_BOXES: [([f32; 4], u32); 5] = [
    ([20.0, 280.0, 108.0, 430.0], 1),
    ([0.0, 80.0, 200.0, 464.0], 3),
    ([156.0, 392.0, 262.0, 462.0], 18),
    ([334.0, 34.0, 384.0, 101.0], 44),
    ([206.0, 232.0, 216.0, 241.0], 62),
];

/// Peak resident set size of this process (Linux `VmHWM`), bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn bench_train(a: BenchTrainArgs) -> anyhow::Result<()> {
    effdet::train::keep_freed_memory();
    use effdet::compute::Tensor;
    use effdet::compute::cpu::CpuBackend;

    use effdet::train::loss::DetectionLoss;
    use effdet::train::model::TrainOptions;
    use effdet::train::optim::{Optimizer, Sgd, clip_grad_norm};

    if a.batch == 0 || a.iters == 0 {
        anyhow::bail!(Error::InvalidArgument(
            "--batch and --iters must be at least 1".into()
        ));
    }
    let (mut net, size) = train_net(&a.model)?;
    let backend = CpuBackend::new(a.model.threads)?;
    let (w, h, rgb) = synthetic_frame();
    let frame = Frame::packed(PixelFormat::Rgb, w, h, &rgb)?;
    let (chw, _) = effdet::preprocess::preprocess(&frame, size)?;
    let input = Tensor::new(
        vec![a.batch, 3, size, size],
        chw.iter()
            .copied()
            .cycle()
            .take(a.batch * chw.len())
            .collect(),
    )?;
    let labeler = net.labeler()?;
    let k = size as f32 / 512.0;
    let boxes: Vec<[f32; 4]> = BENCH_BOXES.iter().map(|(b, _)| b.map(|v| v * k)).collect();
    let nc = net.config().num_classes.max(1) as u32;
    let classes: Vec<u32> = BENCH_BOXES.iter().map(|(_, c)| 1 + (c - 1) % nc).collect();
    let targets = vec![labeler.label(&boxes, &classes)?; a.batch];
    let loss_cfg = DetectionLoss::d0().with_num_classes(net.config().num_classes);
    let opts = TrainOptions::default();
    let mut sgd = Sgd::effdet(0.01);
    let mut peak_tape = 0usize;
    let mut times = Vec::with_capacity(a.iters);
    let mut last_loss = 0f32;
    for i in 0..a.warmup + a.iters {
        let t = Instant::now();
        net.params_mut().zero_grad();
        let stats = net.forward_backward(&backend, &input, &targets, &loss_cfg, &opts, None)?;
        backend.install(|| {
            clip_grad_norm(net.params_mut(), 10.0);
            sgd.step(net.params_mut())
        })?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        peak_tape = peak_tape.max(stats.peak_bytes);
        last_loss = stats.loss;
        if i >= a.warmup {
            times.push(ms / a.batch as f64);
        }
    }
    times.sort_by(f64::total_cmp);
    let threads = effdet_threads(&a.model);
    let rss = peak_rss_bytes();
    if a.json {
        let o = serde_json::json!({
            "backend": "cpu",
            "size": size,
            "batch": a.batch,
            "threads": threads,
            "step_ms_per_image_median": percentile(&times, 0.5),
            "step_ms_per_image_min": times[0],
            "step_ms_per_image_p90": percentile(&times, 0.9),
            "peak_tape_bytes": peak_tape,
            "peak_rss_bytes": rss,
            "last_loss": last_loss,
        });
        println!("{o}");
    } else {
        println!(
            "training step | {}x{} | batch {} | threads {} | {} timed steps",
            size, size, a.batch, threads, a.iters
        );
        println!(
            "per image: median {:.1} ms, p90 {:.1} ms; peak tape memory {:.0} MiB, peak RSS {}",
            percentile(&times, 0.5),
            percentile(&times, 0.9),
            peak_tape as f64 / (1 << 20) as f64,
            rss.map_or("unknown".into(), |b| format!(
                "{:.0} MiB",
                b as f64 / (1 << 20) as f64
            ))
        );
    }
    Ok(())
}
