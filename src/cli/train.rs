//! `effdet train`: trains EfficientDet-D0 on a COCO-format dataset (see `effdet::train::trainer`
//! for the loop and `effdet::train::dataset` for validation).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use effdet::Error;
use effdet::detector::{META_IMAGE_SIZE, META_LABELS};
use effdet::model::WeightStore;
use effdet::train::checkpoint::{Checkpoint, write_atomic};
use effdet::train::dataset::{Dataset, DatasetOptions};
use effdet::train::model::TrainNet;
use effdet::train::optim::serialize_tensors_with;
use effdet::train::trainer::{
    LogRow, OptimizerKind, TrainConfig, Trainer, curves_svg, model_config, write_metrics_csv,
};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Training annotations (COCO JSON).
    #[arg(long, value_name = "FILE")]
    pub train_annotations: PathBuf,
    /// Folder the training `file_name`s are relative to.
    #[arg(long, value_name = "DIR")]
    pub train_images: PathBuf,
    /// Validation annotations (COCO JSON); evaluated with COCO AP during and after training.
    #[arg(long, value_name = "FILE", requires = "val_images")]
    pub val_annotations: Option<PathBuf>,
    /// Folder of the validation images.
    #[arg(long, value_name = "DIR", requires = "val_annotations")]
    pub val_images: Option<PathBuf>,
    /// Output folder: checkpoint, metrics.csv, curves.svg, model.safetensors, model.onnx (the
    /// same network as ONNX, see `effdet export`), labels.txt, MODEL_CARD.md.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Start from these effdet-named weights (tensors whose name and shape match are used; the
    /// rest, e.g. a class predictor for another number of classes, start fresh).
    #[arg(long, value_name = "FILE", conflicts_with = "resume")]
    pub weights: Option<PathBuf>,
    /// Continue a run from its checkpoint (same data and settings).
    #[arg(long, value_name = "FILE")]
    pub resume: Option<PathBuf>,
    /// JSON file with any training settings (field names of `TrainConfig`); flags override it.
    /// The defaults below are those of the recipe, used where neither gives a value.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Turn every skipped annotation or image into an error.
    #[arg(long)]
    pub strict: bool,
    /// Square network input size, a multiple of 128 (images are letterboxed to it)
    /// [default: 512].
    #[arg(long, value_name = "S")]
    pub size: Option<usize>,
    /// Images per update [default: 8].
    #[arg(long, value_name = "B")]
    pub batch: Option<usize>,
    /// Epochs of the cosine schedule [default: 300, the recipe's].
    #[arg(long, value_name = "N")]
    pub epochs: Option<u64>,
    /// Peak learning rate [default: 0.08 x batch / 64, the recipe's SGD rate; for
    /// --optimizer adamw give one, typically 0.001].
    #[arg(long, value_name = "LR")]
    pub lr: Option<f64>,
    /// Epochs of linear warm-up from a tenth of the peak LR [default: 1].
    #[arg(long, value_name = "N")]
    pub warmup_epochs: Option<u64>,
    /// `sgd` (the recipe: momentum 0.9, coupled weight decay) or `adamw` (decoupled weight
    /// decay; learns far faster from scratch) [default: sgd].
    #[arg(long, value_name = "NAME")]
    pub optimizer: Option<String>,
    /// Weight decay, on convolution weights only [default: 4e-5, the recipe's; typically 0.01
    /// with adamw].
    #[arg(long, value_name = "WD")]
    pub weight_decay: Option<f64>,
    /// Smallest random scale of the scale-jitter augmentation [default: 0.1].
    #[arg(long, value_name = "S")]
    pub scale_min: Option<f64>,
    /// Largest random scale of the scale-jitter augmentation [default: 2.0].
    #[arg(long, value_name = "S")]
    pub scale_max: Option<f64>,
    /// Clip the gradients' global L2 norm to this (0 = no clipping) [default: 10].
    #[arg(long, value_name = "C")]
    pub clip_grad: Option<f32>,
    /// Drop-path (stochastic depth) rate of the backbone's last block [default: 0.2].
    #[arg(long, value_name = "P")]
    pub drop_path: Option<f32>,
    /// Decay of the weights' exponential moving average (with TF's warm-up), which is what is
    /// evaluated and written [default: 0.9998].
    #[arg(long, value_name = "D")]
    pub ema_decay: Option<f64>,
    /// Data-loading worker threads (decode, augment, label) [default: 2].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Compute threads for the forward and backward passes (0 = one per core) [default: 0].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Seed of the initial weights, the shuffling and the augmentation [default: 42].
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Evaluate every N epochs (0 = at the end only) [default: 1].
    #[arg(long, value_name = "N")]
    pub eval_every: Option<u64>,
    /// Checkpoint every N updates as well as at epoch ends (0 = epoch ends only) [default: 0].
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<u64>,
    /// Stop after N updates in total [default: no limit, the epochs decide].
    #[arg(long, value_name = "N")]
    pub max_updates: Option<u64>,
    /// Normalise batch norms with their running statistics (inference mode) and keep those
    /// fixed: fine-tuning a trained model on exactly what inference computes.
    #[arg(long)]
    pub freeze_bn: bool,
    /// Also write the final weights as f16 (`model_f16.safetensors`).
    #[arg(long)]
    pub f16: bool,
}

fn config(a: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let mut c = match &a.config {
        Some(p) => TrainConfig::from_json_file(p)?,
        None => TrainConfig::default(),
    };
    macro_rules! set {
        ($($flag:ident => $field:ident),*) => { $( if let Some(v) = a.$flag { c.$field = v; } )* };
    }
    set!(size => input_size, batch => batch_size, epochs => epochs, warmup_epochs => warmup_epochs,
         drop_path => drop_path_rate, ema_decay => ema_decay, workers => workers, threads => threads,
         seed => seed, eval_every => eval_every, checkpoint_every => checkpoint_every,
         weight_decay => weight_decay, scale_min => scale_min, scale_max => scale_max,
         clip_grad => clip_grad);
    if let Some(name) = &a.optimizer {
        c.optimizer = OptimizerKind::parse(name)?;
    }
    if a.lr.is_some() {
        c.lr = a.lr;
    }
    if a.max_updates.is_some() {
        c.max_updates = a.max_updates;
    }
    if a.freeze_bn {
        c.freeze_bn = true;
    }
    c.validate()?;
    Ok(c)
}

/// Copies every tensor of `path` whose name and shape match into `net`; returns how many.
fn load_pretrained(net: &mut TrainNet, path: &Path) -> anyhow::Result<usize> {
    let store = WeightStore::open(path)?;
    let mut used = 0;
    let names: Vec<(String, Vec<usize>)> = store
        .names()
        .map(|(k, s)| (k.to_string(), s.to_vec()))
        .collect();
    let mut params = std::mem::take(net.params_mut());
    let mut buffers = net.buffers().clone();
    for (name, shape) in names {
        if let Some(p) = params.get_mut(&name) {
            if p.value.shape() == shape.as_slice() {
                p.value = store.take(&name, &shape)?;
                used += 1;
            }
        } else if let Some(b) = buffers.get_mut(&name)
            && b.shape() == shape.as_slice()
        {
            *b = store.take(&name, &shape)?;
            used += 1;
        }
    }
    if used == 0 {
        anyhow::bail!(Error::WeightsFormat {
            path: path.to_path_buf(),
            reason: "no tensor matches this model by name and shape (not effdet D0 weights?)"
                .into()
        });
    }
    *net = TrainNet::from_parts(net.config().clone(), params, buffers)?;
    Ok(used)
}

/// `[=====>    ] 37%` style progress on a terminal, a log line every 50 updates otherwise.
fn progress_printer() -> impl FnMut(&LogRow, u64, u64) {
    let tty = std::io::stderr().is_terminal();
    move |r: &LogRow, done: u64, total: u64| {
        let frac = done as f64 / total.max(1) as f64;
        let line = format!(
            "epoch {} | update {done}/{total} | loss {:.4} (class {:.4}, box {:.5}) | lr {:.2e} | {:.1} img/s",
            r.epoch, r.loss, r.class_loss, r.box_loss, r.lr, r.images_per_s
        );
        if tty {
            let width = 24;
            let filled = (frac * width as f64) as usize;
            eprint!(
                "\r[{}{}] {:>3.0}% {line}   ",
                "=".repeat(filled),
                " ".repeat(width - filled.min(width)),
                frac * 100.0
            );
            let _ = std::io::stderr().flush();
        } else if done.is_multiple_of(50) || done == total {
            eprintln!("{line}");
        }
    }
}

pub fn train(a: TrainArgs) -> anyhow::Result<()> {
    effdet::train::keep_freed_memory();
    let cfg = config(&a)?;
    let dataset = Dataset::open(
        &a.train_annotations,
        &a.train_images,
        DatasetOptions { strict: a.strict },
    )?;
    eprint!("training data: {}", dataset.report);
    let categories: Vec<(u64, String)> = dataset
        .categories
        .iter()
        .map(|c| (c.id, c.name.clone()))
        .collect();
    let net = TrainNet::init(model_config(&cfg, dataset.num_classes()), cfg.seed)?;
    let mut trainer = Trainer::new(cfg.clone(), net, categories)?;
    if let Some(w) = &a.weights {
        let n = load_pretrained(&mut trainer.net, w)?;
        eprintln!("initialised {n} tensors from {}", w.display());
        trainer = Trainer::new(cfg.clone(), trainer.net, trainer.categories)?;
    }
    if let Some(r) = &a.resume {
        let ck = Checkpoint::load(r)?;
        trainer.restore(&ck, r)?;
        eprintln!(
            "resuming from {} at epoch {}, update {}",
            r.display(),
            trainer.epoch,
            trainer.update
        );
    }
    let labels = dataset.labels_file();
    let dataset = Arc::new(dataset);
    let mut evaluator = match (&a.val_annotations, &a.val_images) {
        (Some(ann), Some(dir)) => Some(super::eval_model::evaluator(ann, dir, &trainer)?),
        _ => None,
    };
    let t0 = std::time::Instant::now();
    trainer.run(
        Arc::clone(&dataset),
        &a.out,
        evaluator.as_deref_mut(),
        &mut progress_printer(),
    )?;
    eprintln!();
    finish(
        &a,
        &trainer,
        &labels,
        dataset.samples.len(),
        t0.elapsed().as_secs_f64(),
    )
}

/// Final artefacts: EMA weights, labels, metrics, curves, model card.
fn finish(
    a: &TrainArgs,
    t: &Trainer,
    labels: &str,
    n_images: usize,
    secs: f64,
) -> anyhow::Result<()> {
    let out = &a.out;
    let weights = t.ema_weights();
    // The input size and class names travel in the file, so the detector and the GStreamer
    // element need no extra settings.
    let meta = BTreeMap::from([
        (META_IMAGE_SIZE.to_string(), t.cfg.input_size.to_string()),
        (META_LABELS.to_string(), labels.to_string()),
    ]);
    write_atomic(
        &out.join("model.safetensors"),
        &serialize_tensors_with(&weights, meta.clone(), false)?,
    )?;
    if a.f16 {
        write_atomic(
            &out.join("model_f16.safetensors"),
            &serialize_tensors_with(&weights, meta, true)?,
        )?;
    }
    // The deploy bundle: the same network as ONNX (what TensorRT and ONNX Runtime load).
    let onnx = effdet::onnx::export(
        &out.join("model.safetensors"),
        &out.join("model.onnx"),
        &effdet::onnx::ExportOptions::default(),
    )
    .context("exporting model.onnx")?;
    write_atomic(&out.join("labels.txt"), labels.as_bytes())?;
    write_metrics_csv(&out.join("metrics.csv"), &t.history)?;
    write_atomic(&out.join("curves.svg"), curves_svg(&t.history).as_bytes())?;
    let last_val = t.history.iter().rev().find(|r| r.val_ap.is_some());
    let last_train = t.history.iter().rev().find(|r| r.val_ap.is_none());
    let cmd: Vec<String> = std::env::args().collect();
    let card = format!(
        "# EfficientDet-D0 trained with effdet-rs\n\n\
         - command: `{}`\n\
         - training data: {} ({} usable images), validation: {}\n\
         - classes ({}): see labels.txt\n\
         - input {}x{}, batch {}, {} updates ({} epochs planned), {:.0} s on the CPU\n\
         - settings: `{}`\n\
         - final training loss (last window): {}\n\
         - validation COCO AP@[.5:.95] / AP50 of the EMA weights: {}\n\
         - files: model.safetensors (EMA weights, f32, effdet names){}, model.onnx (the same \
         network, opset {}, dynamic batch: images [N, 3, {}, {}] -> class_3..7, box_3..7), \
         labels.txt, metrics.csv, curves.svg\n\n\
         Use: `effdet detect --weights model.safetensors --image IMG`: the number of classes,\n\
         the class names and the input size ({}x{}) are read from the weights file.\n",
        cmd.join(" "),
        a.train_annotations.display(),
        n_images,
        a.val_annotations
            .as_ref()
            .map_or("none".to_string(), |p| p.display().to_string()),
        t.net.config().num_classes,
        t.cfg.input_size,
        t.cfg.input_size,
        t.cfg.batch_size,
        t.update,
        t.cfg.epochs,
        secs,
        serde_json::to_string(&t.cfg).context("settings")?,
        last_train.map_or("n/a".into(), |r| format!("{:.4}", r.loss)),
        last_val.map_or("not evaluated".into(), |r| format!(
            "{:.4} / {:.4}",
            r.val_ap.unwrap_or(0.0),
            r.val_ap50.unwrap_or(0.0)
        )),
        if a.f16 { ", model_f16.safetensors" } else { "" },
        effdet::onnx::OPSET,
        onnx.image_size,
        onnx.image_size,
        t.cfg.input_size,
        t.cfg.input_size,
    );
    write_atomic(&out.join("MODEL_CARD.md"), card.as_bytes())?;
    eprintln!(
        "weights, labels, metrics and model card written to {}",
        out.display()
    );
    Ok(())
}
