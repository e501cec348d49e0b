//! The `effdet` command-line tool: detect objects in an image, and benchmark the engine.

mod eval_cmd;
mod eval_model;
mod train_cmd;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use effdet::image_io::{draw_boxes, load_image, save_png};
use effdet::postprocess::{NmsMethod, PostprocessConfig};
use effdet::{BackendKind, Detector, DetectorOptions, Error, Frame, PixelFormat};

mod export_cmd;
mod synth_cmd;

/// Exit status for errors in the weights file (missing, corrupt, wrong tensors).
const EXIT_WEIGHTS: u8 = 3;
/// Exit status for an unreadable, corrupt or unsupported image.
const EXIT_IMAGE: u8 = 4;
/// Exit status for anything else that went wrong at run time.
const EXIT_OTHER: u8 = 1;
/// Exit status for invalid arguments (clap uses the same for syntax errors).
const EXIT_USAGE: u8 = 2;
/// Exit status for unusable annotations (training data).
const EXIT_DATA: u8 = 5;

#[derive(Parser)]
#[command(
    name = "effdet",
    version,
    about = "EfficientDet-D0 object detection (effdet-compatible weights, CPU engine)",
    after_help = "Exit status: 0 success, 2 bad command line or argument value, \
                  3 weights file problem, 4 image problem, 5 annotations problem, \
                  1 other errors.\n\
                  Logging: set RUST_LOG=effdet=debug to see per-stage timings."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Detect objects in a PNG or JPEG image.
    Detect(DetectArgs),
    /// Measure per-image latency of the network alone and end to end.
    Bench(BenchArgs),
    /// Compute the training loss of one batch (and optionally every parameter gradient), as
    /// effdet's DetBenchTrain does: training-mode batch norm, drop-path off.
    Loss(LossArgs),
    /// Train EfficientDet-D0 on a COCO-format dataset (the reference recipe by default).
    Train(Box<train_cmd::TrainArgs>),
    /// Measure the training input pipeline alone (decode, augment, label, batch): images/s.
    BenchData(BenchDataArgs),
    /// Measure training-step time (forward, loss, backward, clipping, SGD) and peak memory.
    BenchTrain(BenchTrainArgs),
    /// Generate a synthetic shapes detection dataset (COCO train/val, labels) and a test video.
    Synth(synth_cmd::SynthArgs),
    /// Evaluate detections against COCO ground truth: AP/AR exactly as pycocotools' COCOeval.
    Eval(eval_cmd::EvalArgs),
    /// Export a model's network to ONNX (input images [N, 3, S, S], the ten raw head outputs).
    Export(export_cmd::ExportArgs),
}

#[derive(clap::Args)]
struct BenchDataArgs {
    /// Training annotations (COCO JSON).
    #[arg(long, value_name = "FILE")]
    annotations: PathBuf,
    /// Folder of the training images.
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
    #[arg(long, default_value_t = 512, value_name = "S")]
    size: usize,
    #[arg(long, default_value_t = 8, value_name = "B")]
    batch: usize,
    /// Loader worker threads.
    #[arg(long, default_value_t = 2, value_name = "N")]
    workers: usize,
    /// Batches to time.
    #[arg(long, default_value_t = 50, value_name = "K")]
    batches: usize,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct BenchTrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Images per step.
    #[arg(long, default_value_t = 2, value_name = "B")]
    batch: usize,
    /// Timed steps (after warm-up).
    #[arg(long, default_value_t = 5, value_name = "K")]
    iters: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 1, value_name = "W")]
    warmup: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct LossArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated images forming the batch (PNG or JPEG; letterboxed to the model's input
    /// size as for inference).
    #[arg(
        long,
        value_name = "A.png,B.png",
        value_delimiter = ',',
        required = true
    )]
    images: Vec<PathBuf>,
    /// COCO-format annotations; images are matched by `file_name` (boxes `[x, y, w, h]` in
    /// image pixels, COCO category ids = class ids 1..=K for the model's K classes).
    #[arg(long, value_name = "FILE")]
    annotations: PathBuf,
    /// Write d loss / d parameter for every trainable parameter (effdet key names) as
    /// safetensors (f32).
    #[arg(long, value_name = "FILE")]
    grads_out: Option<PathBuf>,
    /// Normalise batch norms with the running statistics (inference mode, PyTorch's
    /// `model.eval()`) instead of the batch's: the loss of what inference computes.
    #[arg(long)]
    freeze_bn: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Weights: effdet `tf_efficientdet_d0` state_dict as safetensors (f32, f16 or bf16).
    #[arg(long, value_name = "FILE")]
    weights: PathBuf,
    /// Compute engine: auto, cpu or cuda (cuda: not complete yet, reports why it cannot run).
    #[arg(long, default_value = "auto", value_name = "NAME")]
    backend: String,
    /// CPU worker threads (0 = one per core).
    #[arg(long, default_value_t = 0, value_name = "N")]
    threads: usize,
    /// Network input size (a multiple of 128). Default: the size the model was trained at (its
    /// `effdet.image_size` metadata; 512 for D0 as released).
    #[arg(long, value_name = "S")]
    size: Option<usize>,
}

#[derive(clap::Args)]
struct DetectArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Input image (PNG or JPEG, any size).
    #[arg(long, value_name = "FILE")]
    image: PathBuf,
    /// Drop detections scoring below this (0 keeps all 100, as effdet does).
    #[arg(long, default_value_t = 0.3, value_name = "T")]
    score_threshold: f32,
    /// IoU above which hard NMS suppresses a box of the same class.
    #[arg(long, default_value_t = 0.5, value_name = "U")]
    iou_threshold: f32,
    /// Keep at most this many detections (best first).
    #[arg(long, default_value_t = 100, value_name = "N")]
    max_detections: usize,
    /// Use Gaussian soft-NMS (sigma 0.5, as the automl evaluation) instead of hard NMS.
    #[arg(long)]
    soft_nms: bool,
    /// Label file ("<id> <name>" per line, or one name per line); default: COCO names.
    #[arg(long, value_name = "FILE")]
    labels: Option<PathBuf>,
    /// Print exactly one JSON array of detections to stdout.
    #[arg(long)]
    json: bool,
    /// Write a copy of the image with the boxes drawn (PNG).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Images per network pass; a comma-separated list runs each size in turn (one table row
    /// or JSON line per size), e.g. `--batch 1,8,32,64,128`.
    #[arg(
        long,
        default_value = "1",
        value_name = "B[,B...]",
        value_delimiter = ','
    )]
    batch: Vec<usize>,
    /// Timed iterations (after warm-up).
    #[arg(long, default_value_t = 20, value_name = "K")]
    iters: usize,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 3, value_name = "W")]
    warmup: usize,
    /// Image to use (default: a synthetic 640x480 frame).
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn exit_code(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<Error>() {
        Some(
            Error::WeightsFormat { .. }
            | Error::MissingTensor { .. }
            | Error::UnexpectedTensors { .. }
            | Error::ShapeMismatch { .. }
            | Error::UnsupportedDtype { .. },
        ) => EXIT_WEIGHTS,
        Some(Error::Image { .. } | Error::InvalidFrame(_)) => EXIT_IMAGE,
        // Images map their read errors to Error::Image, so a plain I/O error is the weights file.
        Some(Error::Io { .. }) => EXIT_WEIGHTS,
        Some(Error::InvalidArgument(_)) => EXIT_USAGE,
        Some(Error::Annotations { .. }) => EXIT_DATA,
        _ => EXIT_OTHER,
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Detect(a) => detect(a),
        Command::Bench(a) => bench(a),
        Command::Loss(a) => loss(a),
        Command::BenchTrain(a) => bench_train(a),
        Command::BenchData(a) => bench_data(a),
        Command::Synth(a) => synth_cmd::run(a),
        Command::Train(a) => train_cmd::train(*a),
        Command::Eval(a) => eval_cmd::eval(a),
        Command::Export(a) => export_cmd::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("effdet: error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn options(
    m: &ModelArgs,
    post: PostprocessConfig,
    labels: Option<PathBuf>,
) -> anyhow::Result<DetectorOptions> {
    Ok(DetectorOptions {
        backend: m.backend.parse::<BackendKind>()?,
        threads: m.threads,
        postprocess: post,
        labels,
        input_size: m.size,
        ..DetectorOptions::default()
    })
}

fn load_detector(m: &ModelArgs, opts: DetectorOptions) -> anyhow::Result<Detector> {
    // Keep the library error as the root so exit_code() can classify it.
    Ok(Detector::new(&m.weights, opts)?)
}

fn detect(a: DetectArgs) -> anyhow::Result<()> {
    let post = PostprocessConfig {
        score_threshold: a.score_threshold,
        iou_threshold: a.iou_threshold,
        max_detections: a.max_detections,
        nms: if a.soft_nms {
            NmsMethod::SoftGaussian {
                sigma: 0.5,
                min_score: 0.001,
            }
        } else {
            NmsMethod::Hard
        },
        ..PostprocessConfig::default()
    };
    if !(0.0..=1.0).contains(&a.score_threshold) || !(0.0..=1.0).contains(&a.iou_threshold) {
        anyhow::bail!(Error::InvalidArgument(
            "--score-threshold and --iou-threshold must lie in [0, 1]".into()
        ));
    }
    let detector = load_detector(&a.model, options(&a.model, post, a.labels.clone())?)?;
    let mut img = load_image(&a.image)?;
    let detections = detector.detect(&img.frame()?)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&detections).context("serialising detections")?
        );
    } else {
        println!(
            "{} detection(s) in {} ({}x{}):",
            detections.len(),
            a.image.display(),
            img.width,
            img.height
        );
        for d in &detections {
            println!(
                "  {:<16} {:.3}  [{:.1}, {:.1}, {:.1}, {:.1}]",
                d.label, d.score, d.x1, d.y1, d.x2, d.y2
            );
        }
    }
    if let Some(out) = &a.out {
        draw_boxes(&mut img, &detections, 2);
        save_png(&img, out)?;
        if !a.json {
            println!("annotated image written to {}", out.display());
        }
    }
    Ok(())
}

/// A deterministic 640x480 test frame with structure (gradients and blocks), so timings are not
/// taken on an all-zero input.
fn synthetic_frame() -> (usize, usize, Vec<u8>) {
    let (w, h) = (640usize, 480usize);
    let mut rgb = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let i = (y * w + x) * 3;
            let block = ((x / 80) + (y / 60)) % 3;
            rgb[i] = (x * 255 / w) as u8;
            rgb[i + 1] = (y * 255 / h) as u8;
            rgb[i + 2] = [40u8, 140, 240][block];
        }
    }
    (w, h, rgb)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn bench(a: BenchArgs) -> anyhow::Result<()> {
    if a.batch.is_empty() || a.batch.contains(&0) || a.iters == 0 {
        anyhow::bail!(Error::InvalidArgument(
            "--batch sizes and --iters must be at least 1".into()
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
    Ok(())
}

fn loss(a: LossArgs) -> anyhow::Result<()> {
    use effdet::compute::Tensor;
    use effdet::compute::cpu::CpuBackend;
    use effdet::model::{EfficientDetConfig, WeightStore};
    use effdet::train::coco::{CocoAnnotations, load_batch};
    use effdet::train::loss::DetectionLoss;
    use effdet::train::model::{TrainNet, TrainOptions};

    if a.model.backend != "auto" && a.model.backend != "cpu" {
        anyhow::bail!(Error::InvalidArgument(format!(
            "--backend {}: training runs on the cpu backend only",
            a.model.backend
        )));
    }
    effdet::train::keep_freed_memory();
    let store = WeightStore::open(&a.model.weights)?;
    let config =
        effdet::detector::config_for_weights(&store, EfficientDetConfig::d0(), a.model.size)?;
    let size = config.image_size.0;
    let mut net = TrainNet::from_store(&store, config)?;
    drop(store);
    let anns = CocoAnnotations::open(&a.annotations)?;
    let labeler = net.labeler()?;
    let num_classes = net.config().num_classes;
    let batch = load_batch(&a.images, &anns, size, &labeler)?;
    let n = a.images.len();
    let backend = CpuBackend::new(a.model.threads)?;
    let opts = TrainOptions {
        update_running_stats: false,
        frozen_bn: a.freeze_bn,
        ..TrainOptions::default()
    };
    let stats = net.forward_backward(
        &backend,
        &batch.input,
        &batch.labels,
        &DetectionLoss::d0().with_num_classes(num_classes),
        &opts,
        None,
    )?;
    if let Some(out) = &a.grads_out {
        let grads: std::collections::BTreeMap<String, Tensor> = net
            .params()
            .iter()
            .map(|p| {
                let g = p
                    .grad
                    .clone()
                    .unwrap_or_else(|| Tensor::zeros(p.value.shape().to_vec()));
                (p.name.clone(), g)
            })
            .collect();
        effdet::train::optim::save_tensors(out, &grads)?;
    }
    if a.json {
        let o = serde_json::json!({
            "loss": stats.loss,
            "class_loss": stats.class_loss,
            "box_loss": stats.box_loss,
            "num_positives": stats.num_positives,
        });
        println!("{o}");
    } else {
        println!(
            "{} image(s), {} box(es): loss {:.6} = class {:.6} + 50 x box {:.6}; {} positive anchors; peak tape memory {:.1} MiB",
            n,
            batch.targets.iter().map(|t| t.boxes.len()).sum::<usize>(),
            stats.loss,
            stats.class_loss,
            stats.box_loss,
            stats.num_positives,
            stats.peak_bytes as f64 / (1 << 20) as f64
        );
        if let Some(out) = &a.grads_out {
            println!("gradients written to {}", out.display());
        }
    }
    Ok(())
}

fn bench_data(a: BenchDataArgs) -> anyhow::Result<()> {
    use effdet::train::dataset::{Dataset, DatasetOptions};
    use effdet::train::loader::{Augment, Loader, LoaderConfig};
    use effdet::train::model::TrainNet;
    use std::sync::Arc;

    let ds = Arc::new(Dataset::open(
        &a.annotations,
        &a.images,
        DatasetOptions::default(),
    )?);
    let mut cfg = effdet::model::EfficientDetConfig::d0();
    cfg.num_classes = ds.num_classes();
    cfg.image_size = (a.size, a.size);
    let labeler = Arc::new(TrainNet::init(cfg, 0)?.labeler()?);
    let lc = LoaderConfig {
        input_size: a.size,
        batch_size: a.batch,
        augment: Augment::effdet(),
        workers: a.workers,
        prefetch: 4,
        seed: 0,
        shuffle: true,
        drop_last: true,
        rank: 0,
        world: 1,
    };
    let mut epoch = 0;
    let mut done = 0usize;
    // The first batch includes thread start-up; time the rest.
    let mut start: Option<Instant> = None;
    while done < a.batches + 1 {
        for b in Loader::new(Arc::clone(&ds), Arc::clone(&labeler), &lc, epoch)? {
            std::hint::black_box(b?);
            done += 1;
            if done == 1 {
                start = Some(Instant::now());
            }
            if done == a.batches + 1 {
                break;
            }
        }
        epoch += 1;
    }
    let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    let ips = (a.batches * a.batch) as f64 / secs.max(1e-9);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"size": a.size, "batch": a.batch, "workers": a.workers,
                "batches": a.batches, "images_per_s": ips})
        );
    } else {
        println!(
            "input pipeline: {ips:.1} images/s ({} workers, {}x{}, batch {}, {} batches)",
            a.workers, a.size, a.size, a.batch, a.batches
        );
    }
    Ok(())
}

/// Boxes of the training benchmark in a 512x512 frame (`[y1, x1, y2, x2]`, class): the same
/// list as `bench/pytorch_train_step.py`, scaled to the input size (classes wrap around for
/// models with fewer than 90).
const BENCH_BOXES: [([f32; 4], u32); 5] = [
    ([20.0, 280.0, 108.0, 430.0], 1),
    ([0.0, 80.0, 200.0, 464.0], 3),
    ([156.0, 392.0, 262.0, 462.0], 18),
    ([334.0, 34.0, 384.0, 101.0], 44),
    ([206.0, 232.0, 216.0, 241.0], 62),
];

/// Peak resident set size of this process (Linux `VmHWM`), bytes.
fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn bench_train(a: BenchTrainArgs) -> anyhow::Result<()> {
    effdet::train::keep_freed_memory();
    use effdet::compute::Tensor;
    use effdet::compute::cpu::CpuBackend;
    use effdet::model::{EfficientDetConfig, WeightStore};
    use effdet::train::loss::DetectionLoss;
    use effdet::train::model::{TrainNet, TrainOptions};
    use effdet::train::optim::{Optimizer, Sgd, clip_grad_norm};

    if a.batch == 0 || a.iters == 0 {
        anyhow::bail!(Error::InvalidArgument(
            "--batch and --iters must be at least 1".into()
        ));
    }
    let store = WeightStore::open(&a.model.weights)?;
    let config =
        effdet::detector::config_for_weights(&store, EfficientDetConfig::d0(), a.model.size)?;
    let size = config.image_size.0;
    let mut net = TrainNet::from_store(&store, config)?;
    drop(store);
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

fn effdet_threads(m: &ModelArgs) -> usize {
    if m.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        m.threads
    }
}
