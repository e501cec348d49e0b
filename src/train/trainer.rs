//! The training loop behind `effdet train`: the reference recipe (SGD with momentum, or AdamW;
//! weight decay on conv weights, clipping, cosine schedule with warm-up, EMA) over
//! [`TrainNet`], fed by the [`Loader`], with periodic evaluation, atomic checkpoints and exact
//! resume.
//!
//! Exact resume: a checkpoint holds the parameters, BN statistics, EMA, optimizer state and the
//! position (epoch, batch, update); the loader's order and augmentation are pure functions of
//! (seed, epoch, sample), and drop-path masks of (seed, update). So a run resumed from a
//! checkpoint continues with bit-identical updates to one that never stopped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::compute::Tensor;
use crate::compute::cpu::CpuBackend;
use crate::error::{Error, Result};
use crate::model::EfficientDetConfig;
use crate::train::checkpoint::Checkpoint;
use crate::train::dataset::Dataset;
use crate::train::ema::{BufferPolicy, EmaConfig, EmaDecay, ModelEma};
use crate::train::loader::{Augment, Loader, LoaderConfig};
use crate::train::loss::DetectionLoss;
use crate::train::model::{TrainNet, TrainOptions};
use crate::train::optim::{AdamW, Optimizer, Sgd, clip_grad_norm};
use crate::train::schedule::{ScheduleConfig, StepOn};

/// Every knob of a training run. Defaults are the reference recipe (`../EFFICIENTDET.md`):
/// LR 0.08 per 64 images (linearly scaled), 1 warm-up epoch from 0.008, cosine to 1e-5,
/// momentum 0.9, weight decay 4e-5, clip 10, EMA 0.9998 (with TF's warm-up), drop-path 0.2,
/// flip + scale jitter 0.1..2.0. A JSON config file may set any subset of the fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub input_size: usize,
    pub batch_size: usize,
    pub epochs: u64,
    /// Peak LR; `None` = 0.08 * batch / 64.
    pub lr: Option<f64>,
    /// LR at the start of the warm-up; `None` = a tenth of the peak (0.008 at batch 64, the
    /// recipe's value, scaled like the peak so small batches do not start above their peak).
    pub warmup_lr: Option<f64>,
    pub warmup_epochs: u64,
    pub min_lr: f64,
    /// `sgd` (the recipe: momentum, coupled weight decay) or `adamw` (timm's `--opt adamw`:
    /// betas 0.9/0.999, decoupled weight decay; typical LR 1e-3 and weight decay 1e-2).
    pub optimizer: OptimizerKind,
    /// SGD momentum (unused by AdamW).
    pub momentum: f64,
    pub weight_decay: f64,
    pub clip_grad: f32,
    pub ema_decay: f64,
    /// TF-style EMA warm-up `min(decay, (1 + t) / (10 + t))` (needed for short runs).
    pub ema_warmup: bool,
    pub drop_path_rate: f32,
    /// Normalise every batch norm with its running statistics instead of the batch's and keep
    /// those statistics fixed ([`TrainOptions::frozen_bn`]): for fine-tuning a trained model
    /// so that what it learns is what inference computes.
    pub freeze_bn: bool,
    pub hflip_prob: f64,
    pub scale_min: f64,
    pub scale_max: f64,
    pub seed: u64,
    /// Data workers.
    pub workers: usize,
    pub prefetch: usize,
    /// CPU threads for the network (0 = all cores).
    pub threads: usize,
    /// Evaluate on the validation set every this many epochs (0 = only at the end).
    pub eval_every: u64,
    /// Also checkpoint every this many updates within an epoch (0 = only at epoch ends).
    pub checkpoint_every: u64,
    /// Stop after this many updates in total (for smoke tests and time-boxed runs).
    pub max_updates: Option<u64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            input_size: 512,
            batch_size: 8,
            epochs: 300,
            lr: None,
            warmup_lr: None,
            warmup_epochs: 1,
            min_lr: 1e-5,
            optimizer: OptimizerKind::Sgd,
            momentum: 0.9,
            weight_decay: 4e-5,
            clip_grad: 10.0,
            ema_decay: 0.9998,
            ema_warmup: true,
            drop_path_rate: 0.2,
            freeze_bn: false,
            hflip_prob: 0.5,
            scale_min: 0.1,
            scale_max: 2.0,
            seed: 42,
            workers: 2,
            prefetch: 4,
            threads: 0,
            eval_every: 1,
            checkpoint_every: 0,
            max_updates: None,
        }
    }
}

impl TrainConfig {
    /// Reads a JSON config (any subset of the fields; unknown fields are an error).
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::InvalidArgument(format!("config {}: {e}", path.display())))
    }

    /// The peak learning rate.
    pub fn peak_lr(&self) -> f64 {
        self.lr.unwrap_or(0.08 * self.batch_size as f64 / 64.0)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("training config: {m}")));
        if self.input_size == 0 || !self.input_size.is_multiple_of(128) {
            return bad(format!(
                "input_size {} must be a positive multiple of 128",
                self.input_size
            ));
        }
        if self.batch_size == 0 || self.epochs == 0 || self.workers == 0 {
            return bad("batch_size, epochs and workers must be at least 1".into());
        }
        if !(self.scale_min > 0.0 && self.scale_min <= self.scale_max) {
            return bad(format!(
                "scale range {}..{} is invalid",
                self.scale_min, self.scale_max
            ));
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return bad(format!(
                "drop_path_rate {} is outside [0, 1)",
                self.drop_path_rate
            ));
        }
        if self.peak_lr().is_nan() || self.peak_lr() <= 0.0 {
            return bad(format!("lr {} must be positive", self.peak_lr()));
        }
        Ok(())
    }
}

/// Which optimizer a run uses ([`TrainConfig::optimizer`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with momentum (effdet's recipe).
    #[default]
    Sgd,
    /// AdamW with torch's defaults.
    AdamW,
}

impl OptimizerKind {
    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::AdamW => "adamw",
        }
    }

    /// Parses `sgd` or `adamw`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "sgd" | "momentum" => Ok(OptimizerKind::Sgd),
            "adamw" => Ok(OptimizerKind::AdamW),
            other => Err(Error::InvalidArgument(format!(
                "unknown optimizer `{other}` (expected sgd or adamw)"
            ))),
        }
    }

    fn build(self, cfg: &TrainConfig) -> Box<dyn Optimizer + Send> {
        match self {
            OptimizerKind::Sgd => {
                let mut sgd = Sgd::new(cfg.peak_lr(), cfg.weight_decay);
                sgd.momentum = cfg.momentum;
                Box::new(sgd)
            }
            OptimizerKind::AdamW => Box::new(AdamW::new(cfg.peak_lr(), cfg.weight_decay)),
        }
    }
}

/// One line of the training log (also a row of `metrics.csv`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LogRow {
    pub epoch: u64,
    pub update: u64,
    pub lr: f64,
    pub loss: f64,
    pub class_loss: f64,
    pub box_loss: f64,
    pub images_per_s: f64,
    /// COCO AP@[.5:.95] of the EMA weights on the validation set, when evaluated.
    pub val_ap: Option<f64>,
    pub val_ap50: Option<f64>,
}

/// Evaluates weights (an effdet state dict) and returns `(AP, AP50)`; supplied by the caller so
/// the loop does not depend on how evaluation is done.
pub type Evaluator<'a> = dyn FnMut(&BTreeMap<String, Tensor>) -> Result<(f64, f64)> + 'a;

/// Where a run writes, and what it starts from.
pub struct RunPaths {
    /// Output directory: `checkpoint.safetensors`, `metrics.csv`, final weights, model card.
    pub out: PathBuf,
    /// Resume from this checkpoint.
    pub resume: Option<PathBuf>,
}

/// The state of a run between updates.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub net: TrainNet,
    pub ema: ModelEma,
    /// The optimizer [`TrainConfig::optimizer`] names.
    pub opt: Box<dyn Optimizer + Send>,
    /// Next epoch to run and next batch within it.
    pub epoch: u64,
    pub batch_in_epoch: u64,
    /// Optimizer updates done.
    pub update: u64,
    pub history: Vec<LogRow>,
    /// Category ids in class order (travels with checkpoints and the final model).
    pub categories: Vec<(u64, String)>,
}

fn ema_state(net: &TrainNet) -> Vec<(String, Tensor)> {
    net.params()
        .iter()
        .map(|p| (p.name.clone(), p.value.clone()))
        .chain(net.buffers().iter().map(|(k, v)| (k.clone(), v.clone())))
        .collect()
}

impl Trainer {
    /// A new run on `net` (freshly initialised or loaded from pretrained weights).
    pub fn new(cfg: TrainConfig, net: TrainNet, categories: Vec<(u64, String)>) -> Result<Self> {
        cfg.validate()?;
        let ema = ModelEma::new(
            EmaConfig {
                decay: if cfg.ema_warmup {
                    EmaDecay::Warmup(cfg.ema_decay)
                } else {
                    EmaDecay::Constant(cfg.ema_decay)
                },
                buffers: BufferPolicy::Average,
            },
            ema_state(&net),
        )?;
        let opt = cfg.optimizer.build(&cfg);
        Ok(Trainer {
            cfg,
            net,
            ema,
            opt,
            epoch: 0,
            batch_in_epoch: 0,
            update: 0,
            history: Vec::new(),
            categories,
        })
    }

    /// Everything needed to continue the run exactly.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let mut ck = Checkpoint::default();
        for p in self.net.params().iter() {
            ck.tensors
                .insert(format!("model.{}", p.name), p.value.clone());
        }
        for (k, v) in self.net.buffers() {
            ck.tensors.insert(format!("model.{k}"), v.clone());
        }
        ck.tensors.extend(self.ema.state_dict("ema."));
        for (k, v) in self.opt.state_dict() {
            ck.tensors.insert(format!("optim.{k}"), v);
        }
        let json = |v: serde_json::Value| v.to_string();
        ck.metadata.insert(
            "config".into(),
            json(serde_json::to_value(&self.cfg).map_err(to_err)?),
        );
        ck.metadata.insert(
            "progress".into(),
            json(serde_json::json!({
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "update": self.update,
            })),
        );
        ck.metadata.insert(
            "num_classes".into(),
            self.net.config().num_classes.to_string(),
        );
        ck.metadata.insert(
            "categories".into(),
            json(serde_json::to_value(&self.categories).map_err(to_err)?),
        );
        ck.metadata.insert(
            "history".into(),
            json(serde_json::to_value(&self.history).map_err(to_err)?),
        );
        Ok(ck)
    }

    /// Restores a run from `ck` into a trainer built with the same config and dataset. Errors
    /// name the mismatch: classes, input size, a parameter's shape, a missing tensor.
    pub fn restore(&mut self, ck: &Checkpoint, path: &Path) -> Result<()> {
        let bad = |reason: String| {
            Error::InvalidArgument(format!("cannot resume from {}: {reason}", path.display()))
        };
        let classes = self.net.config().num_classes;
        if ck.metadata.get("num_classes").map(String::as_str) != Some(classes.to_string().as_str())
        {
            return Err(bad(format!(
                "the checkpoint has {} classes, this run {classes}",
                ck.metadata.get("num_classes").map_or("?", String::as_str)
            )));
        }
        let saved: TrainConfig = ck
            .metadata
            .get("config")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("no readable training config in the checkpoint".into()))?;
        if saved.input_size != self.cfg.input_size {
            return Err(bad(format!(
                "the checkpoint was trained at input size {}, this run uses {}",
                saved.input_size, self.cfg.input_size
            )));
        }
        if saved.optimizer != self.cfg.optimizer {
            return Err(bad(format!(
                "the checkpoint was trained with {}, this run uses {}",
                saved.optimizer.name(),
                self.cfg.optimizer.name()
            )));
        }
        if let Some(cats) = ck.metadata.get("categories") {
            let saved: Vec<(u64, String)> =
                serde_json::from_str(cats).map_err(|e| bad(e.to_string()))?;
            if saved != self.categories {
                return Err(bad(format!(
                    "the checkpoint's categories {:?} differ from the dataset's {:?}",
                    saved.iter().map(|c| c.0).collect::<Vec<_>>(),
                    self.categories.iter().map(|c| c.0).collect::<Vec<_>>()
                )));
            }
        }
        let model = ck.section("model.");
        for p in self.net.params_mut().iter_mut() {
            let t = model
                .get(&p.name)
                .ok_or_else(|| bad(format!("tensor `{}` is missing", p.name)))?;
            if t.shape() != p.value.shape() {
                return Err(bad(format!(
                    "`{}` has shape {:?} in the checkpoint, {:?} in this model",
                    p.name,
                    t.shape(),
                    p.value.shape()
                )));
            }
            p.value = t.clone();
            p.grad = None;
        }
        let buffers: Vec<String> = self.net.buffers().keys().cloned().collect();
        let mut restored = BTreeMap::new();
        for k in buffers {
            let t = model
                .get(&k)
                .ok_or_else(|| bad(format!("tensor `{k}` is missing")))?;
            restored.insert(k, t.clone());
        }
        let params = std::mem::take(self.net.params_mut());
        self.net = TrainNet::from_parts(self.net.config().clone(), params, restored)?;
        self.ema.load_state_dict("ema.", &ck.tensors)?;
        self.opt
            .load_state_dict(self.net.params(), &ck.section("optim."))?;
        let progress: serde_json::Value = ck
            .metadata
            .get("progress")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("no progress record".into()))?;
        let get = |k: &str| {
            progress[k]
                .as_u64()
                .ok_or_else(|| bad(format!("progress has no `{k}`")))
        };
        self.epoch = get("epoch")?;
        self.batch_in_epoch = get("batch_in_epoch")?;
        self.update = get("update")?;
        self.history = ck
            .metadata
            .get("history")
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        Ok(())
    }

    /// The EMA weights as an effdet state dict.
    pub fn ema_weights(&self) -> BTreeMap<String, Tensor> {
        self.ema
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    /// Trains until `cfg.epochs` (or `max_updates`), checkpointing to `out` and evaluating with
    /// `eval` (if any) every `eval_every` epochs and at the end. `progress` receives each
    /// update's row (for a progress bar).
    pub fn run(
        &mut self,
        dataset: Arc<Dataset>,
        out: &Path,
        mut eval: Option<&mut Evaluator<'_>>,
        progress: &mut dyn FnMut(&LogRow, u64, u64),
    ) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| Error::Write {
            path: out.to_path_buf(),
            source: e,
        })?;
        let backend = CpuBackend::new(self.cfg.threads)?;
        let labeler = Arc::new(self.net.labeler()?);
        let loader_cfg = LoaderConfig {
            input_size: self.cfg.input_size,
            batch_size: self.cfg.batch_size,
            augment: Augment::Train {
                hflip_prob: self.cfg.hflip_prob,
                scale_min: self.cfg.scale_min,
                scale_max: self.cfg.scale_max,
            },
            workers: self.cfg.workers,
            prefetch: self.cfg.prefetch,
            seed: self.cfg.seed,
            shuffle: true,
            drop_last: true,
            rank: 0,
            world: 1,
        };
        let updates_per_epoch = (dataset.samples.len() / self.cfg.batch_size) as u64;
        if updates_per_epoch == 0 {
            return Err(Error::InvalidArgument(format!(
                "{} usable images cannot fill one batch of {}",
                dataset.samples.len(),
                self.cfg.batch_size
            )));
        }
        let schedule = ScheduleConfig {
            lr: self.cfg.peak_lr(),
            warmup_lr: self.cfg.warmup_lr.unwrap_or(self.cfg.peak_lr() / 10.0),
            min_lr: self.cfg.min_lr,
            epochs: self.cfg.epochs,
            warmup_epochs: self.cfg.warmup_epochs,
            cooldown_epochs: 0,
            step_on: StepOn::Updates { updates_per_epoch },
        }
        .build()?;
        let loss_cfg = DetectionLoss::d0().with_num_classes(self.net.config().num_classes);
        let total = self.cfg.epochs * updates_per_epoch;
        let ck_path = out.join("checkpoint.safetensors");
        let mut window = (0.0f64, 0.0f64, 0.0f64, 0usize, Instant::now());
        while self.epoch < self.cfg.epochs {
            if self.cfg.max_updates.is_some_and(|m| self.update >= m) {
                break;
            }
            let loader = Loader::new(
                Arc::clone(&dataset),
                Arc::clone(&labeler),
                &loader_cfg,
                self.epoch,
            )?;
            for batch in loader.skip(self.batch_in_epoch as usize) {
                let batch = batch?;
                let lr = schedule.lr(self.epoch, self.batch_in_epoch);
                self.opt.set_lr(lr);
                self.net.params_mut().zero_grad();
                let opts = TrainOptions {
                    drop_path_rate: self.cfg.drop_path_rate,
                    frozen_bn: self.cfg.freeze_bn,
                    seed: self.cfg.seed ^ self.update.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    ..TrainOptions::default()
                };
                let stats = self.net.forward_backward(
                    &backend,
                    &batch.input,
                    &batch.labels,
                    &loss_cfg,
                    &opts,
                    None,
                )?;
                if !stats.loss.is_finite() {
                    return Err(Error::InvalidArgument(format!(
                        "the loss became {} at update {} (epoch {}): lower the learning rate",
                        stats.loss, self.update, self.epoch
                    )));
                }
                let (net, opt) = (&mut self.net, &mut self.opt);
                backend.install(|| {
                    clip_grad_norm(net.params_mut(), self.cfg.clip_grad);
                    opt.step(net.params_mut())
                })?;
                let state = ema_state(&self.net);
                self.ema
                    .update(state.iter().map(|(k, v)| (k.as_str(), v)))?;
                self.update += 1;
                self.batch_in_epoch += 1;
                window.0 += stats.loss as f64;
                window.1 += stats.class_loss as f64;
                window.2 += stats.box_loss as f64;
                window.3 += 1;
                let secs = window.4.elapsed().as_secs_f64();
                let row = LogRow {
                    epoch: self.epoch,
                    update: self.update,
                    lr,
                    loss: window.0 / window.3 as f64,
                    class_loss: window.1 / window.3 as f64,
                    box_loss: window.2 / window.3 as f64,
                    images_per_s: (window.3 * self.cfg.batch_size) as f64 / secs.max(1e-9),
                    val_ap: None,
                    val_ap50: None,
                };
                progress(&row, self.update, total);
                if window.3 >= 20 {
                    self.history.push(row);
                    window = (0.0, 0.0, 0.0, 0, Instant::now());
                }
                if self.cfg.checkpoint_every > 0
                    && self.update.is_multiple_of(self.cfg.checkpoint_every)
                {
                    self.checkpoint()?.save(&ck_path)?;
                }
                if self.cfg.max_updates.is_some_and(|m| self.update >= m) {
                    break;
                }
            }
            if window.3 > 0 {
                self.history.push(LogRow {
                    epoch: self.epoch,
                    update: self.update,
                    lr: self.opt.lr(),
                    loss: window.0 / window.3 as f64,
                    class_loss: window.1 / window.3 as f64,
                    box_loss: window.2 / window.3 as f64,
                    images_per_s: (window.3 * self.cfg.batch_size) as f64
                        / window.4.elapsed().as_secs_f64().max(1e-9),
                    val_ap: None,
                    val_ap50: None,
                });
                window = (0.0, 0.0, 0.0, 0, Instant::now());
            }
            let epoch_done = self.batch_in_epoch >= updates_per_epoch;
            if epoch_done {
                self.epoch += 1;
                self.batch_in_epoch = 0;
            }
            let last = self.epoch >= self.cfg.epochs
                || self.cfg.max_updates.is_some_and(|m| self.update >= m);
            let due = epoch_done
                && self.cfg.eval_every > 0
                && self.epoch.is_multiple_of(self.cfg.eval_every);
            if let Some(ev) = eval.as_deref_mut()
                && (due || last)
            {
                let (ap, ap50) = ev(&self.ema_weights())?;
                tracing::info!(
                    epoch = self.epoch,
                    update = self.update,
                    ap,
                    ap50,
                    "validation"
                );
                self.history.push(LogRow {
                    epoch: self.epoch,
                    update: self.update,
                    lr: self.opt.lr(),
                    val_ap: Some(ap),
                    val_ap50: Some(ap50),
                    ..LogRow::default()
                });
            }
            self.checkpoint()?.save(&ck_path)?;
            write_metrics_csv(&out.join("metrics.csv"), &self.history)?;
            if last {
                break;
            }
        }
        Ok(())
    }
}

fn to_err(e: serde_json::Error) -> Error {
    Error::InvalidArgument(format!("cannot serialise training state: {e}"))
}

/// Writes the log as CSV (`epoch,update,lr,loss,class_loss,box_loss,images_per_s,val_ap,val_ap50`).
pub fn write_metrics_csv(path: &Path, rows: &[LogRow]) -> Result<()> {
    let mut s =
        String::from("epoch,update,lr,loss,class_loss,box_loss,images_per_s,val_ap,val_ap50\n");
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    for r in rows {
        // Validation rows carry only the metrics; training rows only the losses.
        let train = if r.val_ap.is_some() {
            ",,,".to_string()
        } else {
            format!(
                "{:.6},{:.6},{:.6},{:.3}",
                r.loss, r.class_loss, r.box_loss, r.images_per_s
            )
        };
        s.push_str(&format!(
            "{},{},{:.6e},{train},{},{}\n",
            r.epoch,
            r.update,
            r.lr,
            opt(r.val_ap),
            opt(r.val_ap50)
        ));
    }
    crate::train::checkpoint::write_atomic(path, s.as_bytes())
}

/// The loss curve (training rows) and validation AP as an SVG line chart.
pub fn curves_svg(rows: &[LogRow]) -> String {
    let (w, h, m) = (720.0, 360.0, 48.0);
    let train: Vec<&LogRow> = rows.iter().filter(|r| r.val_ap.is_none()).collect();
    let val: Vec<&LogRow> = rows.iter().filter(|r| r.val_ap.is_some()).collect();
    let max_u = rows.iter().map(|r| r.update).max().unwrap_or(1).max(1) as f64;
    let max_loss = train
        .iter()
        .map(|r| r.loss)
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let x = |u: u64| m + (w - 2.0 * m) * u as f64 / max_u;
    let y = |v: f64, top: f64| h - m - (h - 2.0 * m) * (v / top).clamp(0.0, 1.0);
    let path = |pts: Vec<(f64, f64)>| {
        pts.iter()
            .enumerate()
            .map(|(i, (px, py))| format!("{}{px:.1},{py:.1}", if i == 0 { "M" } else { " L" }))
            .collect::<String>()
    };
    let loss_path = path(
        train
            .iter()
            .map(|r| (x(r.update), y(r.loss, max_loss)))
            .collect(),
    );
    let ap_path = path(
        val.iter()
            .map(|r| (x(r.update), y(r.val_ap.unwrap_or(0.0), 1.0)))
            .collect(),
    );
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<line x1="{m}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{m}" y1="{m}" x2="{m}" y2="{b}" stroke="black"/>
<text x="{m}" y="{t}">training loss (blue, max {max_loss:.3}) and validation AP@[.5:.95] (orange, 0..1) vs update (max {max_u})</text>
<path d="{loss_path}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>
<path d="{ap_path}" fill="none" stroke="#ff7f0e" stroke-width="2"/>
</svg>
"##,
        b = h - m,
        r = w - m,
        t = m - 12.0,
    )
}

/// The training settings as an [`EfficientDetConfig`] for `num_classes` classes.
pub fn model_config(cfg: &TrainConfig, num_classes: usize) -> EfficientDetConfig {
    let mut c = EfficientDetConfig::d0();
    c.num_classes = num_classes;
    c.image_size = (cfg.input_size, cfg.input_size);
    c
}
