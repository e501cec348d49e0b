//! `effdet bench`: per-image latency of the network alone and end to end.

use std::path::PathBuf;
use std::time::Instant;

use effdet::image_io::load_image;
use effdet::postprocess::PostprocessConfig;
use effdet::{Error, Frame, PixelFormat};

use super::common::*;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Images per network pass; a comma-separated list runs each size in turn (one table row
    /// or JSON line per size), e.g. `--batch 1,8,32,64,128`.
    #[arg(
        long,
        default_value = "1",
        value_name = "B[,B...]",
        value_delimiter = ','
    )]
    pub batch: Vec<usize>,
    /// Timed iterations (after warm-up).
    #[arg(long, default_value_t = 20, value_name = "K")]
    pub iters: usize,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 3, value_name = "W")]
    pub warmup: usize,
    /// Image to use (default: a synthetic 640x480 frame).
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// After the timings, profile the network on the CPU engine at each batch size: time and
    /// share per op kind (pointwise, depthwise 5x5 s2, SE, BiFPN fusion, ...), per section
    /// (stem, stage1..7, each BiFPN node, heads) and the slowest layers, over --iters passes
    /// (JSON: one `{"profile": ...}` line per batch size).
    #[arg(long)]
    pub profile: bool,
}

pub fn bench(a: BenchArgs) -> anyhow::Result<()> {
    if a.batch.is_empty() || a.batch.contains(&0) || a.iters == 0 {
        anyhow::bail!(Error::InvalidArgument(
            "--batch sizes and --iters must be at least 1".into()
        ));
    }
    if a.profile && a.model.backend == "cuda" {
        anyhow::bail!(Error::InvalidArgument(
            "--profile times the CPU engine's ops (the CUDA engine's kernels: ncu, see \
             scripts/gpu/README.md)"
                .into()
        ));
    }
    let detector = load_detector(
        &a.model,
        options(&a.model, PostprocessConfig::default(), None)?,
    )?;
    let (w, h, rgb) = match &a.image {
        Some(p) => {
            let img = load_image(p)?;
            (img.width, img.height, img.rgb)
        }
        None => synthetic_frame(),
    };
    let frame = Frame::packed(PixelFormat::Rgb, w, h, &rgb)?;
    let threads = effdet_threads(&a.model);
    if !a.json {
        println!(
            "backend {} | threads {} | {}x{} input frame | {} iterations | per image ms (median, p90) and images/s",
            detector.backend_name(),
            threads,
            w,
            h,
            a.iters
        );
        println!(
            "{:>6} {:>12} {:>9} {:>10} {:>12} {:>9} {:>10} {:>11}",
            "batch", "network ms", "p90", "img/s", "end2end ms", "p90", "img/s", "device MiB"
        );
    }
    for &batch in &a.batch {
        let frames = vec![frame.clone(); batch];
        let (input, _) = detector.preprocess(&frames)?;
        let per_image = |v: Vec<f64>| {
            let mut v: Vec<f64> = v.into_iter().map(|t| t / batch as f64).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        // The network alone: input already on the engine's device, outputs left there.
        let network = per_image(detector.time_network(&input, a.warmup, a.iters)?);
        // End to end: host frames in, detections on the host.
        let mut e2e = Vec::with_capacity(a.iters);
        for i in 0..a.warmup + a.iters {
            let t = Instant::now();
            std::hint::black_box(detector.detect_batch(&frames)?);
            if i >= a.warmup {
                e2e.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        let e2e = per_image(e2e);
        let memory = detector.device_memory_in_use()?;
        let engine = detector.engine_report()?;
        let (n50, n90) = (percentile(&network, 0.5), percentile(&network, 0.9));
        let (e50, e90) = (percentile(&e2e, 0.5), percentile(&e2e, 0.9));
        if a.json {
            let o = serde_json::json!({
                "backend": detector.backend_name(),
                "batch": batch,
                "threads": threads,
                "network_ms_median": n50,
                "network_ms_p90": n90,
                "network_images_per_s": 1000.0 / n50,
                "end_to_end_ms_median": e50,
                "end_to_end_ms_p90": e90,
                "end_to_end_images_per_s": 1000.0 / e50,
                "device_memory_bytes": memory,
                "engine": engine,
            });
            println!("{o}");
        } else {
            let mem = memory.map_or("-".to_string(), |b| format!("{:.0}", b as f64 / 1048576.0));
            println!(
                "{batch:>6} {n50:>12.3} {n90:>9.3} {:>10.1} {e50:>12.3} {e90:>9.3} {:>10.1} {mem:>11}",
                1000.0 / n50,
                1000.0 / e50
            );
        }
    }
    if a.profile {
        let store = effdet::model::WeightStore::open(&a.model.weights)?;
        let config = effdet::detector::config_for_weights(
            &store,
            effdet::model::EfficientDetConfig::d0(),
            a.model.size,
        )?;
        for &batch in &a.batch {
            let (input, _) = detector.preprocess(&vec![frame.clone(); batch])?;
            let p = effdet::compute::profile::profile_cpu(
                &store,
                config.clone(),
                a.model.threads,
                &input,
                a.iters,
            )?;
            if a.json {
                println!("{}", serde_json::json!({ "profile": p.to_json() }));
            } else {
                println!("\n{}", p.table(25));
            }
        }
    }
    Ok(())
}
