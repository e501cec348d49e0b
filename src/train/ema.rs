//! Exponential moving average of the model's weights (and BN running statistics), the copy
//! EfficientDet is evaluated and exported with.
//!
//! Two conventions are in use and both are supported ([`EmaDecay`]):
//!
//! - **Constant decay** — timm's `ModelEmaV2` (and `ModelEma`, which effdet's `train.py
//!   --model-ema --model-ema-decay 0.9998` uses; NVIDIA's PyTorch port's `ModelEma` is the same
//!   formula): `ema = decay * ema + (1 - decay) * model` over *every* floating-point entry of the
//!   `state_dict`, so BN `running_mean` / `running_var` are averaged too. timm multiplies f32
//!   tensors by the Python floats `decay` and `1 - decay` (each rounded to f32, the second
//!   computed in f64 first) and adds, so this module does exactly that and matches it bit for bit.
//! - **Warm-up decay** `min(decay, (1 + t) / (10 + t))` — TensorFlow's
//!   `ExponentialMovingAverage(decay, num_updates=global_step)` as the official automl
//!   EfficientDet uses it (decay 0.9998, BN moving statistics included) and
//!   `tfa.optimizers.MovingAverage(dynamic_decay=True)` in NVIDIA's TF2 port (0.999). It keeps
//!   the average from being dominated by the random initial weights early on. `t` is the global
//!   step after the optimizer's increment, i.e. 1 at the first update. (timm's `ModelEmaV3`
//!   warm-up is a different formula, `1 - (1 + t / gamma)^-power`, not implemented.)
//!
//! BN running statistics are recognised by their key (`*.running_mean`, `*.running_var`);
//! [`BufferPolicy`] says whether they are averaged (timm V2, TF) or copied from the model (timm
//! V3's `exclude_buffers`). Integer bookkeeping (`num_batches_tracked`) is not tracked: effdet-rs
//! never loads it, and timm's average truncates it back to an integer anyway.

#![warn(missing_docs)]

use std::collections::{BTreeMap, HashMap};

use crate::compute::Tensor;
use crate::error::{Error, Result};

/// effdet `train.py`'s `--model-ema-decay` (and automl's `moving_average_decay`).
pub const EFFDET_EMA_DECAY: f64 = 0.9998;

/// How the decay of each update is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EmaDecay {
    /// The same decay at every update (timm `ModelEmaV2`, effdet `train.py`).
    Constant(f64),
    /// `min(decay, (1 + t) / (10 + t))` at global step `t` (TensorFlow / automl / NVIDIA TF2).
    Warmup(f64),
}

impl EmaDecay {
    /// The decay used at global step `t` (1 at the first update).
    pub fn at(self, t: u64) -> f64 {
        match self {
            EmaDecay::Constant(d) => d,
            EmaDecay::Warmup(d) => {
                let t = t as f64;
                d.min((1.0 + t) / (10.0 + t))
            }
        }
    }

    fn nominal(self) -> f64 {
        match self {
            EmaDecay::Constant(d) | EmaDecay::Warmup(d) => d,
        }
    }
}

/// What happens to BN running statistics at each update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferPolicy {
    /// Averaged like the weights (timm `ModelEmaV2`, TF `ExponentialMovingAverage` over
    /// automl's EMA variables, NVIDIA).
    Average,
    /// Copied from the model (timm `ModelEmaV3(exclude_buffers=True)`).
    Copy,
}

/// The EMA's configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmaConfig {
    /// The decay rule.
    pub decay: EmaDecay,
    /// The BN running-statistics rule.
    pub buffers: BufferPolicy,
}

impl EmaConfig {
    /// effdet `train.py --model-ema`: constant 0.9998, BN statistics averaged (timm ModelEmaV2).
    pub fn effdet() -> Self {
        EmaConfig {
            decay: EmaDecay::Constant(EFFDET_EMA_DECAY),
            buffers: BufferPolicy::Average,
        }
    }

    /// NVIDIA's TF2 port: 0.999 with the warm-up rule, BN statistics averaged.
    pub fn nvidia_tf2() -> Self {
        EmaConfig {
            decay: EmaDecay::Warmup(0.999),
            buffers: BufferPolicy::Average,
        }
    }

    fn validate(&self) -> Result<()> {
        let d = self.decay.nominal();
        if !(0.0..=1.0).contains(&d) {
            return Err(Error::InvalidArgument(format!(
                "EMA decay must be in [0, 1], got {d}"
            )));
        }
        Ok(())
    }
}

/// Whether `name` is a BN running statistic (a buffer, not a trainable parameter).
pub fn is_bn_buffer(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// The moving average of a model's named tensors.
#[derive(Clone, Debug)]
pub struct ModelEma {
    config: EmaConfig,
    num_updates: u64,
    names: Vec<String>,
    values: Vec<Tensor>,
    index: HashMap<String, usize>,
}

impl ModelEma {
    /// The key under which [`ModelEma::state_dict`] stores the update count.
    pub const NUM_UPDATES_KEY: &'static str = "num_updates";

    /// Starts the average at the model's current tensors (timm deep-copies the model).
    /// `state` holds every tensor to average: the parameters and, typically, the BN running
    /// statistics. Errors on a duplicate name or an invalid decay.
    pub fn new(
        config: EmaConfig,
        state: impl IntoIterator<Item = (String, Tensor)>,
    ) -> Result<Self> {
        config.validate()?;
        let mut names = Vec::new();
        let mut values = Vec::new();
        let mut index = HashMap::new();
        for (name, t) in state {
            if index.insert(name.clone(), names.len()).is_some() {
                return Err(Error::InvalidArgument(format!(
                    "EMA: tensor `{name}` given twice"
                )));
            }
            names.push(name);
            values.push(t);
        }
        Ok(ModelEma {
            config,
            num_updates: 0,
            names,
            values,
            index,
        })
    }

    /// The configuration.
    pub fn config(&self) -> EmaConfig {
        self.config
    }

    /// Updates applied so far.
    pub fn num_updates(&self) -> u64 {
        self.num_updates
    }

    /// The decay the next [`ModelEma::update`] will use.
    pub fn next_decay(&self) -> f64 {
        self.config.decay.at(self.num_updates + 1)
    }

    /// Number of averaged tensors.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether no tensor is averaged.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The averaged tensor `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.values[i])
    }

    /// `(name, averaged tensor)` in the order given to [`ModelEma::new`].
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.names.iter().map(String::as_str).zip(&self.values)
    }

    /// Matches `model` against the averaged tensors: every one must appear exactly once with its
    /// shape; nothing else may appear. Returns the model tensor for each slot.
    fn collect<'a>(
        &self,
        model: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    ) -> Result<Vec<&'a Tensor>> {
        let mut slots: Vec<Option<&'a Tensor>> = vec![None; self.names.len()];
        for (name, t) in model {
            let Some(&i) = self.index.get(name) else {
                return Err(Error::InvalidArgument(format!(
                    "EMA: the model has tensor `{name}`, which the average does not track"
                )));
            };
            if slots[i].is_some() {
                return Err(Error::InvalidArgument(format!(
                    "EMA: tensor `{name}` given twice"
                )));
            }
            if t.shape() != self.values[i].shape() {
                return Err(Error::InvalidArgument(format!(
                    "EMA: tensor `{name}` has shape {:?}, the average has {:?}",
                    t.shape(),
                    self.values[i].shape()
                )));
            }
            slots[i] = Some(t);
        }
        slots
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                s.ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "EMA: the model did not provide tensor `{}`",
                        self.names[i]
                    ))
                })
            })
            .collect()
    }

    /// One update with the decay of global step `num_updates + 1`; see [`ModelEma::update_at`].
    pub fn update<'a>(
        &mut self,
        model: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    ) -> Result<()> {
        self.update_at(model, self.num_updates + 1)
    }

    /// One update with the decay of global step `step` (only the warm-up rule looks at it):
    /// `ema = decay * ema + (1 - decay) * model` per element in f32, BN statistics averaged or
    /// copied per [`BufferPolicy`]. `model` must provide every tracked tensor exactly once, with
    /// its shape; on error nothing changes. The update count becomes `step`.
    pub fn update_at<'a>(
        &mut self,
        model: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
        step: u64,
    ) -> Result<()> {
        let model = self.collect(model)?;
        let decay = self.config.decay.at(step);
        let d = decay as f32;
        let one_minus = (1.0 - decay) as f32;
        for ((name, ema), m) in self.names.iter().zip(&mut self.values).zip(model) {
            if self.config.buffers == BufferPolicy::Copy && is_bn_buffer(name) {
                ema.data_mut().copy_from_slice(m.data());
                continue;
            }
            for (e, &x) in ema.data_mut().iter_mut().zip(m.data()) {
                *e = d * *e + one_minus * x;
            }
        }
        self.num_updates = step;
        Ok(())
    }

    /// Copies the model into the average (timm's `ModelEmaV2.set`); the update count is kept.
    pub fn set<'a>(
        &mut self,
        model: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    ) -> Result<()> {
        let model = self.collect(model)?;
        for (ema, m) in self.values.iter_mut().zip(model) {
            ema.data_mut().copy_from_slice(m.data());
        }
        Ok(())
    }

    /// The averaged tensors under `prefix` + their names, plus `prefix + "num_updates"` (a
    /// 1-element tensor), for a checkpoint. The averaged tensors alone, without prefix, are an
    /// effdet `state_dict` (minus `num_batches_tracked`) that loads as inference weights.
    pub fn state_dict(&self, prefix: &str) -> BTreeMap<String, Tensor> {
        let mut out: BTreeMap<String, Tensor> = self
            .iter()
            .map(|(n, t)| (format!("{prefix}{n}"), t.clone()))
            .collect();
        let mut count = Tensor::zeros(vec![1]);
        // f32 holds update counts exactly up to 2^24 (~16.7 M updates, ~18000 COCO epochs at 925
        // updates each).
        count.data_mut()[0] = self.num_updates as f32;
        out.insert(format!("{prefix}{}", Self::NUM_UPDATES_KEY), count);
        out
    }

    /// Restores [`ModelEma::state_dict`] output saved under `prefix`. Every tracked tensor must
    /// be present with its shape; keys outside `prefix` are ignored, so a whole checkpoint map
    /// can be passed. A missing update count means 0.
    pub fn load_state_dict(
        &mut self,
        prefix: &str,
        state: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let mut values = Vec::with_capacity(self.values.len());
        for (name, cur) in self.names.iter().zip(&self.values) {
            let key = format!("{prefix}{name}");
            let t = state
                .get(&key)
                .ok_or_else(|| Error::InvalidArgument(format!("EMA state: `{key}` is missing")))?;
            if t.shape() != cur.shape() {
                return Err(Error::InvalidArgument(format!(
                    "EMA state: `{key}` has shape {:?}, expected {:?}",
                    t.shape(),
                    cur.shape()
                )));
            }
            values.push(t.clone());
        }
        let count_key = format!("{prefix}{}", Self::NUM_UPDATES_KEY);
        let num_updates = match state.get(&count_key).map(Tensor::data) {
            None => 0,
            Some([v]) if *v >= 0.0 && v.fract() == 0.0 => *v as u64,
            Some(_) => {
                return Err(Error::InvalidArgument(format!(
                    "EMA state: `{count_key}` must hold one whole non-negative number"
                )));
            }
        };
        self.values = values;
        self.num_updates = num_updates;
        Ok(())
    }
}
