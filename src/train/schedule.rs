//! Learning-rate schedules: timm's `CosineLRScheduler` (cosine decay with linear warm-up, as
//! effdet's `train.py` uses it) and the linear LR scaling rule, value for value.
//!
//! timm's scheduler is stateless: the training loop passes it a time `t` and it sets the LR. In
//! effdet's `train.py` (`--sched cosine`, built by timm's `create_scheduler`), `t` is the epoch:
//! the LR is set once per epoch (`lr_scheduler.step(epoch + 1)` after each epoch; the
//! `step_update` call per batch is a no-op). timm can also step per optimizer update
//! (`sched_on_updates`): then `t` is the global update count and the warm-up and cosine lengths
//! are multiplied by the updates per epoch. [`Schedule`] does both; [`CosineSchedule::lr_at`] is
//! timm's `_get_lr` in f64, so the values equal timm's bit for bit (same libm `cos`/`pow`).
//!
//! The official EfficientDet recipe (automl) is per-update: LR 0.08 per 64 images, linear warm-up
//! over the first epoch from 0.008, cosine to 300 epochs ([`ScheduleConfig::effdet_recipe`]).
//! [`ScheduleConfig::effdet_recipe`] expresses it with timm's cosine, which is what effdet's
//! PyTorch training uses. automl's own cosine differs slightly: no floor (it decays to 0 instead
//! of `min_lr`) and `0.5 * lr * (1 + cos(pi * step / (total - warmup)))` with `step` counted
//! from 0 rather than from the end of the warm-up, so it reaches 0 one warm-up length before the
//! end and rises slightly after.

#![warn(missing_docs)]

use crate::error::{Error, Result};

/// The batch size the EfficientDet recipe's learning rate is quoted for (automl's
/// `_DEFAULT_BATCH_SIZE`).
pub const EFFDET_LR_BATCH: usize = 64;
/// The recipe's learning rate per 64 images.
pub const EFFDET_LR_PER_64: f64 = 0.08;
/// The recipe's warm-up starting learning rate.
pub const EFFDET_WARMUP_LR: f64 = 0.008;

/// The linear scaling rule: `lr_per_reference * global_batch / reference_batch`
/// (`global_batch` = per-rank batch x world size x accumulation steps).
///
/// automl scales only the peak LR this way and keeps `lr_warmup_init` as given; NVIDIA's TF2
/// port scales the warm-up LR too. Apply it to whichever values the run should scale.
pub fn linear_scaled_lr(lr_per_reference: f64, reference_batch: usize, global_batch: usize) -> f64 {
    lr_per_reference * global_batch as f64 / reference_batch as f64
}

/// timm's `CosineLRScheduler` with one parameter group, in units of `t` (epochs or updates).
/// Noise (`noise_range_t`) is not supported.
#[derive(Clone, Debug, PartialEq)]
pub struct CosineSchedule {
    /// Peak learning rate (the optimizer's initial LR in timm).
    pub base_lr: f64,
    /// Floor of the cosine (`lr_min`).
    pub min_lr: f64,
    /// Length of the first cosine cycle (`t_initial`), > 0.
    pub t_initial: u64,
    /// Warm-up length (`warmup_t`); 0 for none.
    pub warmup_t: u64,
    /// LR at `t = 0` of the warm-up (`warmup_lr_init`).
    pub warmup_lr_init: f64,
    /// If true the cosine starts after the warm-up (`warmup_prefix`); timm's default (false)
    /// runs the cosine from `t = 0`, so the warm-up overlays its first `warmup_t` steps.
    pub warmup_prefix: bool,
    /// Each cycle is this much longer than the previous (`cycle_mul`, 1 = equal lengths).
    pub cycle_mul: f64,
    /// Peak LR factor per cycle (`cycle_decay`).
    pub cycle_decay: f64,
    /// Number of cycles before the LR stays at `min_lr` (`cycle_limit`, effdet: 1).
    pub cycle_limit: u32,
    /// k-decay exponent (`k_decay`, 1 = plain cosine).
    pub k_decay: f64,
}

impl CosineSchedule {
    /// A single-cycle cosine from `base_lr` to `min_lr` over `t_initial`, warm-up from
    /// `warmup_lr_init` over `warmup_t` (timm's defaults for everything else).
    pub fn new(
        base_lr: f64,
        min_lr: f64,
        t_initial: u64,
        warmup_t: u64,
        warmup_lr_init: f64,
    ) -> Result<Self> {
        let s = CosineSchedule {
            base_lr,
            min_lr,
            t_initial,
            warmup_t,
            warmup_lr_init,
            warmup_prefix: false,
            cycle_mul: 1.0,
            cycle_decay: 1.0,
            cycle_limit: 1,
            k_decay: 1.0,
        };
        s.validate()?;
        Ok(s)
    }

    /// Checks the values timm asserts (`t_initial > 0`, `lr_min >= 0`) plus finiteness and a
    /// positive cycle multiplier.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidArgument(format!("LR schedule: {what}")));
        if self.t_initial == 0 {
            return bad("t_initial must be > 0".into());
        }
        for (name, v) in [
            ("base_lr", self.base_lr),
            ("min_lr", self.min_lr),
            ("warmup_lr_init", self.warmup_lr_init),
            ("cycle_decay", self.cycle_decay),
            ("k_decay", self.k_decay),
        ] {
            if !v.is_finite() || v < 0.0 {
                return bad(format!("{name} must be finite and >= 0, got {v}"));
            }
        }
        if !(self.cycle_mul.is_finite() && self.cycle_mul > 0.0) {
            return bad(format!("cycle_mul must be > 0, got {}", self.cycle_mul));
        }
        Ok(())
    }

    /// The learning rate at time `t` (timm's `CosineLRScheduler._get_lr(t)`).
    pub fn lr_at(&self, t: u64) -> f64 {
        if t < self.warmup_t {
            let step = (self.base_lr - self.warmup_lr_init) / self.warmup_t as f64;
            return self.warmup_lr_init + t as f64 * step;
        }
        let t = if self.warmup_prefix {
            t - self.warmup_t
        } else {
            t
        };
        let t_initial = self.t_initial as f64;
        let (i, t_i, t_curr) = if self.cycle_mul != 1.0 {
            let tf = t as f64;
            let m = self.cycle_mul;
            let i = ((1.0 - tf / t_initial * (1.0 - m)).ln() / m.ln()).floor();
            let t_i = m.powf(i) * t_initial;
            let t_curr = tf - (1.0 - m.powf(i)) / (1.0 - m) * t_initial;
            (i, t_i, t_curr)
        } else {
            let i = t / self.t_initial;
            let t_curr = t - self.t_initial * i;
            (i as f64, t_initial, t_curr as f64)
        };
        if i < self.cycle_limit as f64 {
            let gamma = self.cycle_decay.powf(i);
            let lr_max = self.base_lr * gamma;
            let k = self.k_decay;
            self.min_lr
                + 0.5
                    * (lr_max - self.min_lr)
                    * (1.0 + (std::f64::consts::PI * t_curr.powf(k) / t_i.powf(k)).cos())
        } else {
            self.min_lr
        }
    }

    /// The schedule's length in `t` units over `cycles` cycles (0 = `cycle_limit`), plus the
    /// warm-up when it is a prefix (timm's `get_cycle_length`).
    pub fn cycle_length(&self, cycles: u32) -> u64 {
        let cycles = if cycles == 0 {
            self.cycle_limit
        } else {
            cycles
        }
        .max(1);
        let t = if self.cycle_mul == 1.0 {
            self.t_initial * cycles as u64
        } else {
            let m = self.cycle_mul;
            (-(self.t_initial as f64) * (m.powf(cycles as f64) - 1.0) / (1.0 - m)).floor() as u64
        };
        if self.warmup_prefix {
            t + self.warmup_t
        } else {
            t
        }
    }
}

/// When the schedule advances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOn {
    /// Once per epoch (timm's `t_in_epochs=True`; effdet's `train.py` default).
    Epochs,
    /// Before every optimizer update (timm's `sched_on_updates`; the automl recipe).
    Updates {
        /// Optimizer updates per epoch (batches per epoch on one rank / accumulation steps).
        updates_per_epoch: u64,
    },
}

/// A training run's LR schedule in epochs, as timm's `create_scheduler` takes it.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleConfig {
    /// Peak learning rate (already linearly scaled, see [`linear_scaled_lr`]).
    pub lr: f64,
    /// Warm-up starting learning rate (`--warmup-lr`).
    pub warmup_lr: f64,
    /// Floor of the cosine (`--min-lr`).
    pub min_lr: f64,
    /// Cosine length in epochs (`--epochs`).
    pub epochs: u64,
    /// Warm-up epochs (`--warmup-epochs`).
    pub warmup_epochs: u64,
    /// Epochs trained at `min_lr` after the cosine (`--cooldown-epochs`).
    pub cooldown_epochs: u64,
    /// Per-epoch or per-update stepping.
    pub step_on: StepOn,
}

impl ScheduleConfig {
    /// The official EfficientDet recipe for `global_batch` images per update: LR
    /// `0.08 * global_batch / 64`, linear warm-up over 1 epoch from 0.008 (unscaled, as automl),
    /// cosine over 300 epochs down to 1e-5 (timm's `--min-lr`; automl decays to 0), stepped per
    /// update.
    pub fn effdet_recipe(global_batch: usize, updates_per_epoch: u64) -> Self {
        ScheduleConfig {
            lr: linear_scaled_lr(EFFDET_LR_PER_64, EFFDET_LR_BATCH, global_batch),
            warmup_lr: EFFDET_WARMUP_LR,
            min_lr: 1e-5,
            epochs: 300,
            warmup_epochs: 1,
            cooldown_epochs: 0,
            step_on: StepOn::Updates { updates_per_epoch },
        }
    }

    /// effdet `train.py`'s argument defaults: `--lr 0.01 --warmup-lr 1e-4 --warmup-epochs 5
    /// --min-lr 1e-5 --epochs 300 --cooldown-epochs 10`, stepped per epoch.
    pub fn effdet_train_py() -> Self {
        ScheduleConfig {
            lr: 0.01,
            warmup_lr: 1e-4,
            min_lr: 1e-5,
            epochs: 300,
            warmup_epochs: 5,
            cooldown_epochs: 10,
            step_on: StepOn::Epochs,
        }
    }

    /// Epochs to train: the cosine plus the cool-down (timm's returned `num_epochs`).
    pub fn total_epochs(&self) -> u64 {
        self.epochs + self.cooldown_epochs
    }

    /// The schedule, in updates or epochs as configured (timm's `create_scheduler_v2`).
    pub fn build(&self) -> Result<Schedule> {
        let mult = match self.step_on {
            StepOn::Epochs => 1,
            StepOn::Updates { updates_per_epoch } => {
                if updates_per_epoch == 0 {
                    return Err(Error::InvalidArgument(
                        "LR schedule: updates_per_epoch must be > 0 to step per update".into(),
                    ));
                }
                updates_per_epoch
            }
        };
        let cosine = CosineSchedule::new(
            self.lr,
            self.min_lr,
            self.epochs.saturating_mul(mult),
            self.warmup_epochs.saturating_mul(mult),
            self.warmup_lr,
        )?;
        Ok(Schedule {
            cosine,
            step_on: self.step_on,
        })
    }
}

/// A cosine schedule bound to its stepping unit: the LR for any (epoch, update) of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// The underlying timm cosine, in epochs or updates.
    pub cosine: CosineSchedule,
    /// What `t` counts.
    pub step_on: StepOn,
}

impl Schedule {
    /// The LR for the update `update_in_epoch` (0-based) of epoch `epoch` (0-based): timm's value
    /// after `step(epoch)` when stepping per epoch, after `step_update(epoch * updates_per_epoch
    /// + update_in_epoch)` when stepping per update.
    pub fn lr(&self, epoch: u64, update_in_epoch: u64) -> f64 {
        match self.step_on {
            StepOn::Epochs => self.cosine.lr_at(epoch),
            StepOn::Updates { updates_per_epoch } => self
                .cosine
                .lr_at(epoch.saturating_mul(updates_per_epoch) + update_in_epoch),
        }
    }

    /// The LR for the optimizer update with global index `update` (0-based, counted over all
    /// epochs); per-epoch schedules need `updates_per_epoch` to locate the epoch.
    pub fn lr_at_update(&self, update: u64, updates_per_epoch: u64) -> f64 {
        match self.step_on {
            StepOn::Epochs => self.cosine.lr_at(update / updates_per_epoch.max(1)),
            StepOn::Updates { .. } => self.cosine.lr_at(update),
        }
    }
}
