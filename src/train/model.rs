//! EfficientDet in training mode, built on the autograd [`Tape`]: the same network as
//! [`crate::model`] (same wiring tables, same effdet key names) but with batch norms left
//! unfolded and normalising with batch statistics, activations as separate tape ops, optional
//! drop-path in the backbone, and the running statistics updated after each forward pass, as
//! `model.train()` does in PyTorch.
//!
//! One training step on one rank:
//!
//! ```text
//! input [B, 3, H, W] --forward on a Tape--> class/box outputs per level
//!        targets (AnchorLabeler) ---------> detection_loss: loss + d loss / d outputs
//! tape.backward_seeds(outputs, grads) ----> parameter gradients (accumulated into the ParamSet)
//! ```
//!
//! Parameters live in a [`ParamSet`] under their effdet `state_dict` names (so gradients,
//! optimizer state and checkpoints use those names); the running statistics are buffers beside
//! them. Data parallel: gradients are averaged by [`crate::train::dist::average_gradients`]
//! after the step; with [`TrainOptions::sync_bn`] every batch norm takes its statistics over all
//! ranks (PyTorch's `SyncBatchNorm`), and with [`TrainOptions::global_normalizer`] the loss is
//! normalised by the positives of all ranks, so that R ranks with batch B compute the update of
//! one rank with batch R * B.

use std::collections::{BTreeMap, HashMap};

use crate::compute::cpu::CpuBackend;
use crate::compute::cpu::backward::BatchNormCache;
use crate::compute::{Activation, ConvSpec, Padding, Tensor};
use crate::error::{Error, Result};
use crate::model::config::{BIFPN_NODES, EfficientDetConfig};
use crate::model::{EfficientDet, WeightStore};
use crate::postprocess::{AnchorConfig, Anchors};
use crate::train::dist::Communicator;
use crate::train::labeler::{AnchorLabeler, LevelTargets};
use crate::train::loss::{DetectionLoss, detection_loss_batched};
use crate::train::optim::{Param, ParamSet};
use crate::train::tape::{Tape, Var};

/// effdet's batch-norm momentum of the BiFPN and heads (`norm_kwargs=dict(eps=.001,
/// momentum=.01)`, PyTorch convention: `running = (1 - m) * running + m * batch`).
pub const EFFDET_BN_MOMENTUM: f32 = 0.01;
/// The backbone's batch-norm momentum: timm's `tf_efficientnet_b0` changes only the epsilon, so
/// its batch norms keep PyTorch's default 0.1 (measured on effdet 0.4.1 / timm 1.0.31).
pub const EFFDET_BACKBONE_BN_MOMENTUM: f32 = 0.1;
/// effdet's backbone stochastic-depth rate for D0 (`backbone_args=dict(drop_path_rate=0.2)`).
pub const EFFDET_D0_DROP_PATH_RATE: f32 = 0.2;
/// effdet's `DetBenchTrain` anchor matching threshold.
pub const EFFDET_MATCH_THRESHOLD: f32 = 0.5;

/// How a training step runs.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOptions {
    /// Backbone stochastic depth (timm's `drop_path_rate`, scaled linearly with the block index
    /// as timm does); 0 disables it, as `effdet loss` does.
    pub drop_path_rate: f32,
    /// Seed of the drop-path masks (mixed with the step number by the caller for new masks).
    pub seed: u64,
    /// Running-statistics momentum of the BiFPN and head batch norms.
    pub bn_momentum: f32,
    /// Running-statistics momentum of the backbone batch norms.
    pub backbone_bn_momentum: f32,
    /// Update the BN running statistics from this batch (PyTorch's training mode does).
    /// Ignored when `frozen_bn` is set (nothing is measured then).
    pub update_running_stats: bool,
    /// Normalise every batch norm with its running statistics, as inference does, instead of
    /// the batch's (PyTorch's `model.eval()` BN with trainable affine; Detectron's frozen BN).
    /// The statistics stay as they are; gamma and beta still learn. Fine-tuning this way
    /// trains exactly the function the folded inference network computes, which batch
    /// statistics of small batches do not: a model trained only with them can fire on every
    /// anchor of an image whose own statistics are far from the running ones.
    pub frozen_bn: bool,
    /// Batch statistics over all ranks of the communicator (PyTorch's `SyncBatchNorm`).
    /// Nothing to synchronise with `frozen_bn`, which takes precedence.
    pub sync_bn: bool,
    /// Normalise the loss by the positives of all ranks instead of this rank's (TF EfficientDet
    /// sums `num_positives` across replicas); the rank's loss is scaled by the world size so
    /// that averaging gradients over ranks gives the gradient of the whole global batch.
    pub global_normalizer: bool,
}

impl Default for TrainOptions {
    /// effdet's training forward without stochastic depth, single process.
    fn default() -> Self {
        TrainOptions {
            drop_path_rate: 0.0,
            seed: 0,
            bn_momentum: EFFDET_BN_MOMENTUM,
            backbone_bn_momentum: EFFDET_BACKBONE_BN_MOMENTUM,
            update_running_stats: true,
            frozen_bn: false,
            sync_bn: false,
            global_normalizer: false,
        }
    }
}

/// What one forward/backward pass measured.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    /// `class_loss + box_loss_weight * box_loss` (this rank's, scaled as the gradient is).
    pub loss: f32,
    pub class_loss: f32,
    pub box_loss: f32,
    /// Positive anchors in this rank's batch.
    pub num_positives: f32,
    /// Most tensor memory the tape held (forward and backward), bytes.
    pub peak_bytes: usize,
}

/// A trainable EfficientDet: parameters, running statistics and the config.
#[derive(Clone, Debug)]
pub struct TrainNet {
    config: EfficientDetConfig,
    params: ParamSet,
    index: HashMap<String, usize>,
    buffers: BTreeMap<String, Tensor>,
}

fn is_buffer(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

impl TrainNet {
    /// The network from effdet-named weights (f32, f16 or bf16). The file is checked exactly as
    /// for inference: every tensor the model needs, with its shape, and nothing else.
    pub fn from_store(store: &WeightStore, config: EfficientDetConfig) -> Result<Self> {
        // The inference loader is the schema: it errors on any missing, misshapen or unused
        // tensor. Its (folded) result is dropped.
        let backend = CpuBackend::new(1)?;
        EfficientDet::load(&backend, store, config.clone())?;
        let mut params = Vec::new();
        let mut buffers = BTreeMap::new();
        for (name, shape) in store.names() {
            let t = store.take(name, shape)?;
            if is_buffer(name) {
                buffers.insert(name.to_string(), t);
            } else {
                params.push(Param::new(name, t));
            }
        }
        Self::from_parts(config, ParamSet::new(params)?, buffers)
    }

    /// A freshly initialised network for `config` (any `num_classes`), as effdet initialises
    /// one for training from scratch: the timm backbone with its TF "goog" init (normal, std
    /// `sqrt(2 / fan_out)`), BiFPN convolutions Glorot-uniform, head convolutions variance
    /// scaling (normal, std `sqrt(1 / fan_in)`), BN weight 1 / bias 0 / running mean 0 / var 1,
    /// fusion edge weights 1, biases 0 except the class predictor's `-ln(99)` (prior 0.01).
    /// Deterministic from `seed`.
    pub fn init(config: EfficientDetConfig, seed: u64) -> Result<Self> {
        let schema = WeightStore::recording();
        EfficientDet::load(&CpuBackend::new(1)?, &schema, config.clone())?;
        let mut rng = crate::rng::Rng::new(seed);
        let mut params = Vec::new();
        let mut buffers = BTreeMap::new();
        let mut seen = std::collections::HashSet::new();
        // The inference loader reads the shared head convolutions once per level.
        for (name, shape) in schema.recorded() {
            if !seen.insert(name.clone()) {
                continue;
            }
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with(".running_var") {
                vec![1.0; n]
            } else if name.ends_with(".running_mean") {
                vec![0.0; n]
            } else if name.ends_with("edge_weights")
                || (shape.len() == 1 && name.ends_with(".weight"))
            {
                vec![1.0; n] // fusion weights and batch-norm scales
            } else if shape.len() == 1 {
                let prior = if name.starts_with("class_net.predict") {
                    -(99f32.ln())
                } else {
                    0.0
                };
                vec![prior; n]
            } else {
                let (out_ch, in_per_group) = (shape[0], shape[1]);
                let k: usize = shape[2..].iter().product();
                // Depthwise convolutions have one input channel per group.
                let groups = if in_per_group == 1 && !name.contains("conv_stem") && k > 1 {
                    out_ch
                } else {
                    1
                };
                let fan_in = (in_per_group * k) as f64;
                let fan_out = (out_ch * k / groups) as f64;
                if name.starts_with("backbone.") {
                    let std = (2.0 / fan_out.max(1.0)).sqrt();
                    (0..n).map(|_| (rng.normal() * std) as f32).collect()
                } else if name.starts_with("class_net.") || name.starts_with("box_net.") {
                    let std = (1.0 / fan_in.max(1.0)).sqrt();
                    (0..n).map(|_| (rng.normal() * std) as f32).collect()
                } else {
                    let limit = (3.0 / ((fan_in + fan_out) / 2.0).max(1.0)).sqrt();
                    (0..n)
                        .map(|_| rng.range_f64(-limit, limit) as f32)
                        .collect()
                }
            };
            let t = Tensor::new(shape, data)?;
            if is_buffer(&name) {
                buffers.insert(name, t);
            } else {
                params.push(Param::new(name, t));
            }
        }
        Self::from_parts(config, ParamSet::new(params)?, buffers)
    }

    /// A network from parameters and running statistics already in memory (e.g. a checkpoint).
    pub fn from_parts(
        config: EfficientDetConfig,
        params: ParamSet,
        buffers: BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        let index = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        Ok(TrainNet {
            config,
            params,
            index,
            buffers,
        })
    }

    pub fn config(&self) -> &EfficientDetConfig {
        &self.config
    }

    /// The trainable parameters (effdet names), with their gradients.
    pub fn params(&self) -> &ParamSet {
        &self.params
    }

    /// The parameters, mutably (optimizer steps, gradient averaging, zeroing).
    pub fn params_mut(&mut self) -> &mut ParamSet {
        &mut self.params
    }

    /// BN running means and variances by effdet name.
    pub fn buffers(&self) -> &BTreeMap<String, Tensor> {
        &self.buffers
    }

    /// Parameters and buffers together: an effdet `state_dict` (without `num_batches_tracked`)
    /// that [`crate::Detector`] and effdet load.
    pub fn state_dict(&self) -> BTreeMap<String, Tensor> {
        let mut sd: BTreeMap<String, Tensor> = self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.value.clone()))
            .collect();
        sd.extend(self.buffers.iter().map(|(k, v)| (k.clone(), v.clone())));
        sd
    }

    /// A labeler for this network's anchors and classes.
    pub fn labeler(&self) -> Result<AnchorLabeler> {
        let c = &self.config;
        let anchors = Anchors::new(&AnchorConfig {
            min_level: c.min_level,
            max_level: c.max_level,
            num_scales: c.num_scales,
            aspect_ratios: c.aspect_ratios.clone(),
            anchor_scale: c.anchor_scale,
            image_size: c.image_size,
        })?;
        AnchorLabeler::new(&anchors, c.num_classes, EFFDET_MATCH_THRESHOLD)
    }

    /// One forward and backward pass on `input` (`[B, 3, H, W]`, normalised, H x W the
    /// config's image size) with one target per image: adds the gradient of the loss to every
    /// parameter's gradient (so successive calls accumulate; zero them first for a fresh step)
    /// and, if asked, updates the running statistics.
    ///
    /// `comm` is required by [`TrainOptions::sync_bn`] and [`TrainOptions::global_normalizer`]
    /// (every rank of its group must make the same call); gradient averaging over ranks is the
    /// caller's next step. Runs in `backend`'s thread pool.
    pub fn forward_backward(
        &mut self,
        backend: &CpuBackend,
        input: &Tensor,
        targets: &[LevelTargets],
        loss_cfg: &DetectionLoss,
        opts: &TrainOptions,
        mut comm: Option<&mut dyn Communicator>,
    ) -> Result<StepStats> {
        let shape = input.shape();
        let (h, w) = self.config.image_size;
        if shape.len() != 4 || shape[1] != 3 || shape[2] != h || shape[3] != w {
            return Err(Error::Shape {
                op: "TrainNet::forward_backward",
                detail: format!("input shape {shape:?}, expected [N, 3, {h}, {w}]"),
            });
        }
        if shape[0] != targets.len() {
            return Err(Error::InvalidArgument(format!(
                "training step: {} images but {} targets",
                shape[0],
                targets.len()
            )));
        }
        if (opts.sync_bn || opts.global_normalizer) && comm.is_none() {
            return Err(Error::InvalidArgument(
                "synchronised batch norm and a global loss normaliser need a communicator".into(),
            ));
        }
        if !(0.0..1.0).contains(&opts.drop_path_rate) {
            return Err(Error::InvalidArgument(format!(
                "drop_path_rate {} is outside [0, 1)",
                opts.drop_path_rate
            )));
        }
        backend.install(|| {
            let mut g = Graph {
                tape: Tape::new(backend.clone()),
                net: self,
                leaves: HashMap::new(),
                bn: Vec::new(),
                comm: comm.take(),
                sync_bn: opts.sync_bn,
                frozen_bn: opts.frozen_bn,
                eps: self.config.bn_eps as f32,
                drop: DropPath::new(
                    opts,
                    self.config.backbone.stages.iter().map(|s| s.repeats).sum(),
                ),
                batch: shape[0],
            };
            let x = g.tape.leaf(input.clone(), false);
            let outputs = g.network(x)?;
            let Graph {
                mut tape,
                leaves,
                bn,
                comm,
                ..
            } = g;
            let mut comm = comm;

            let (class_vals, box_vals): (Vec<&[f32]>, Vec<&[f32]>) = {
                let mut c = Vec::with_capacity(outputs.len());
                let mut b = Vec::with_capacity(outputs.len());
                for &(cv, bv) in &outputs {
                    c.push(tape.value(cv)?.data());
                    b.push(tape.value(bv)?.data());
                }
                (c, b)
            };
            let mut loss = detection_loss_batched(&class_vals, &box_vals, targets, loss_cfg)?;
            // Global normaliser: rescale this rank's loss and gradients from (P_r + 1) to
            // (P_all + 1) / world (every term of the loss is divided by the same normaliser).
            if opts.global_normalizer
                && let Some(c) = comm.as_deref_mut()
            {
                let mut p = [loss.num_positives];
                c.all_reduce_sum(&mut p)?;
                let world = c.world_size() as f64;
                let local = (loss.num_positives + 1.0) as f64;
                let global = (p[0] + 1.0) as f64;
                let f = local * world / global;
                let ff = f as f32;
                loss.loss = (loss.loss as f64 * f) as f32;
                loss.class_loss = (loss.class_loss as f64 * f) as f32;
                loss.box_loss = (loss.box_loss as f64 * f) as f32;
                for lg in &mut loss.grads {
                    lg.class.iter_mut().for_each(|v| *v *= ff);
                    lg.boxes.iter_mut().for_each(|v| *v *= ff);
                }
            }
            let mut seeds = Vec::with_capacity(outputs.len() * 2);
            for (&(cv, bv), lg) in outputs.iter().zip(std::mem::take(&mut loss.grads)) {
                let cs = tape.value(cv)?.shape().to_vec();
                let bs = tape.value(bv)?.shape().to_vec();
                seeds.push((cv, Tensor::new(cs, lg.class)?));
                seeds.push((bv, Tensor::new(bs, lg.boxes)?));
            }
            let mut grads = tape.backward_seeds(seeds, if opts.sync_bn { comm } else { None })?;
            for (name, v) in &leaves {
                if let Some(gt) = grads.take(*v) {
                    let i = self.index[name.as_str()];
                    self.params[i].accumulate_grad(&gt)?;
                }
            }
            if opts.update_running_stats && !opts.frozen_bn {
                self.update_running_stats(&bn, opts)?;
            }
            Ok(StepStats {
                loss: loss.loss,
                class_loss: loss.class_loss,
                box_loss: loss.box_loss,
                num_positives: loss.num_positives,
                peak_bytes: tape.peak_bytes(),
            })
        })
    }

    /// PyTorch's update: `running = (1 - m) running + m batch`, the variance unbiased.
    fn update_running_stats(
        &mut self,
        bn: &[(String, BatchNormCache)],
        opts: &TrainOptions,
    ) -> Result<()> {
        for (prefix, cache) in bn {
            let m = if prefix.starts_with("backbone.") {
                opts.backbone_bn_momentum
            } else {
                opts.bn_momentum
            } as f64;
            let n = cache.count as f64;
            let unbias = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
            for (suffix, batch, scale) in [
                ("running_mean", &cache.mean, 1.0),
                ("running_var", &cache.var, unbias),
            ] {
                let key = format!("{prefix}.{suffix}");
                let buf = self
                    .buffers
                    .get_mut(&key)
                    .ok_or_else(|| Error::MissingTensor {
                        key: key.clone(),
                        expected: vec![batch.len()],
                    })?;
                for (r, &b) in buf.data_mut().iter_mut().zip(batch) {
                    *r = (m * b as f64 * scale + (1.0 - m) * *r as f64) as f32;
                }
            }
        }
        Ok(())
    }
}

/// Per-block stochastic depth: block `i` of `total` drops with probability `rate * i / total`
/// (timm's linear rule), one Bernoulli draw per sample from a seeded generator.
struct DropPath {
    rate: f32,
    total: usize,
    block: usize,
    rng: crate::rng::Rng,
}

impl DropPath {
    fn new(opts: &TrainOptions, total: usize) -> Self {
        DropPath {
            rate: opts.drop_path_rate,
            total,
            block: 0,
            rng: crate::rng::Rng::new(opts.seed),
        }
    }

    /// The keep probability and per-sample mask of the next block, `None` when it keeps all.
    fn next_block(&mut self, batch: usize) -> Option<(f32, Vec<bool>)> {
        let p = self.rate * self.block as f32 / self.total.max(1) as f32;
        self.block += 1;
        if p <= 0.0 {
            return None;
        }
        let keep_prob = 1.0 - p;
        let keep = (0..batch).map(|_| self.rng.f32() < keep_prob).collect();
        Some((keep_prob, keep))
    }
}

/// Builds the training graph of one forward pass on a tape.
struct Graph<'a, 'c> {
    tape: Tape,
    net: &'a TrainNet,
    /// Parameter leaves created so far (a parameter used at several levels is one leaf).
    leaves: HashMap<String, Var>,
    /// Batch statistics per BN prefix, for the running-statistics update.
    bn: Vec<(String, BatchNormCache)>,
    comm: Option<&'c mut dyn Communicator>,
    /// Whether batch norms synchronise their statistics through `comm`.
    sync_bn: bool,
    /// Whether batch norms use the running statistics ([`TrainOptions::frozen_bn`]).
    frozen_bn: bool,
    eps: f32,
    drop: DropPath,
    batch: usize,
}

impl Graph<'_, '_> {
    fn param(&mut self, name: &str) -> Result<Var> {
        if let Some(v) = self.leaves.get(name) {
            return Ok(*v);
        }
        let i = *self
            .net
            .index
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                key: name.to_string(),
                expected: Vec::new(),
            })?;
        let v = self.tape.leaf(self.net.params[i].value.clone(), true);
        self.leaves.insert(name.to_string(), v);
        Ok(v)
    }

    fn channels(&self, x: Var) -> Result<usize> {
        Ok(self.tape.value(x)?.shape()[1])
    }

    /// `{prefix}.weight` (and `{prefix}.bias` when `bias`), TF-SAME padding.
    fn conv(
        &mut self,
        x: Var,
        prefix: &str,
        stride: usize,
        depthwise: bool,
        bias: bool,
    ) -> Result<Var> {
        let w = self.param(&format!("{prefix}.weight"))?;
        let b = if bias {
            Some(self.param(&format!("{prefix}.bias"))?)
        } else {
            None
        };
        let groups = if depthwise { self.channels(x)? } else { 1 };
        let spec = ConvSpec {
            stride,
            groups,
            padding: Padding::Same,
            act: Activation::None,
        };
        self.tape.conv2d(x, w, b, spec)
    }

    /// Training-mode batch norm `{prefix}.weight/.bias`, statistics recorded under `prefix`;
    /// with frozen BN, normalised by `{prefix}.running_mean/_var` instead.
    fn bn(&mut self, x: Var, prefix: &str) -> Result<Var> {
        let gamma = self.param(&format!("{prefix}.weight"))?;
        let beta = self.param(&format!("{prefix}.bias"))?;
        if self.frozen_bn {
            let stat =
                |suffix: &str| {
                    let key = format!("{prefix}.{suffix}");
                    self.net.buffers.get(&key).map(|t| t.data().to_vec()).ok_or(
                        Error::MissingTensor {
                            key,
                            expected: Vec::new(),
                        },
                    )
                };
            let stats = BatchNormCache {
                mean: stat("running_mean")?,
                var: stat("running_var")?,
                eps: self.eps,
                count: 0,
            };
            return self.tape.batch_norm_frozen(x, gamma, beta, stats);
        }
        let (y, cache) = match self.comm.as_deref_mut() {
            Some(c) if self.sync_bn => self.tape.batch_norm_synced(x, gamma, beta, self.eps, c)?,
            _ => self.tape.batch_norm(x, gamma, beta, self.eps)?,
        };
        self.bn.push((prefix.to_string(), cache));
        Ok(y)
    }

    fn swish(&mut self, x: Var) -> Result<Var> {
        self.tape.activation(x, Activation::Swish)
    }

    /// conv -> BN -> optional swish.
    fn conv_bn(
        &mut self,
        x: Var,
        conv: &str,
        bn: &str,
        stride: usize,
        depthwise: bool,
        act: bool,
    ) -> Result<Var> {
        let y = self.conv(x, conv, stride, depthwise, false)?;
        let y = self.bn(y, bn)?;
        if act { self.swish(y) } else { Ok(y) }
    }

    /// effdet's `SeparableConv2d`: depthwise 3x3 (no bias), pointwise 1x1 with bias.
    fn separable(&mut self, x: Var, prefix: &str) -> Result<Var> {
        let y = self.conv(x, &format!("{prefix}.conv_dw"), 1, true, false)?;
        self.conv(y, &format!("{prefix}.conv_pw"), 1, false, true)
    }

    fn network(&mut self, x: Var) -> Result<Vec<(Var, Var)>> {
        let feats = self.backbone(x)?;
        let feats = self.bifpn(feats)?;
        let class = self.head(&feats, "class_net")?;
        let boxes = self.head(&feats, "box_net")?;
        Ok(class.into_iter().zip(boxes).collect())
    }

    /// timm `tf_efficientnet_b0` features P3, P4, P5 (see [`crate::model`]'s backbone).
    fn backbone(&mut self, x: Var) -> Result<Vec<Var>> {
        let cfg = self.net.config.backbone.clone();
        let mut h = self.conv_bn(x, "backbone.conv_stem", "backbone.bn1", 2, false, true)?;
        let mut in_ch = cfg.stem_channels;
        let mut feats = Vec::with_capacity(3);
        for (si, st) in cfg.stages.iter().enumerate() {
            for bi in 0..st.repeats {
                let p = format!("backbone.blocks.{si}.{bi}");
                let stride = if bi == 0 { st.stride } else { 1 };
                let shortcut = h;
                let (dw_bn, proj_conv, proj_bn) = if st.expand_ratio != 1 {
                    h = self.conv_bn(
                        h,
                        &format!("{p}.conv_pw"),
                        &format!("{p}.bn1"),
                        1,
                        false,
                        true,
                    )?;
                    ("bn2", "conv_pwl", "bn3")
                } else {
                    ("bn1", "conv_pw", "bn2")
                };
                h = self.conv_bn(
                    h,
                    &format!("{p}.conv_dw"),
                    &format!("{p}.{dw_bn}"),
                    stride,
                    true,
                    true,
                )?;
                // Squeeze-excitation: mean -> 1x1 reduce + swish -> 1x1 expand + sigmoid -> scale.
                let s = self.tape.global_avg_pool(h)?;
                let s = self.conv(s, &format!("{p}.se.conv_reduce"), 1, false, true)?;
                let s = self.swish(s)?;
                let s = self.conv(s, &format!("{p}.se.conv_expand"), 1, false, true)?;
                let s = self.tape.activation(s, Activation::Sigmoid)?;
                h = self.tape.scale_channels(h, s)?;
                h = self.conv_bn(
                    h,
                    &format!("{p}.{proj_conv}"),
                    &format!("{p}.{proj_bn}"),
                    1,
                    false,
                    false,
                )?;
                let drop = self.drop.next_block(self.batch);
                if stride == 1 && in_ch == st.out_channels {
                    if let Some((keep_prob, keep)) = drop {
                        h = self.tape.drop_path(h, keep, keep_prob)?;
                    }
                    h = self.tape.add(h, shortcut)?;
                }
                in_ch = st.out_channels;
            }
            if cfg.feature_stages.contains(&si) {
                feats.push(h);
            }
        }
        Ok(feats)
    }

    /// effdet's `ResampleFeatureMap`: 1x1 conv + BN when channels change, then max-pool down
    /// or nearest up to the target size.
    fn resample(&mut self, x: Var, prefix: &str, out_ch: usize, to: (usize, usize)) -> Result<Var> {
        let mut y = x;
        if self.channels(x)? != out_ch {
            y = self.conv(y, &format!("{prefix}.conv.conv"), 1, false, true)?;
            y = self.bn(y, &format!("{prefix}.conv.bn"))?;
        }
        let s = self.tape.value(y)?.shape().to_vec();
        let from = (s[2], s[3]);
        if from == to {
            Ok(y)
        } else if from.0 > to.0 && from.1 > to.1 {
            let sh = (from.0 - 1) / to.0 + 1;
            let sw = (from.1 - 1) / to.1 + 1;
            if sh != sw {
                return Err(Error::InvalidArgument(format!(
                    "BiFPN downsampling {from:?} -> {to:?} needs unequal strides ({sh}, {sw})"
                )));
            }
            self.tape.max_pool_same(y, sh + 1, sh)
        } else {
            self.tape.upsample_nearest(y, to.0, to.1)
        }
    }

    fn bifpn(&mut self, backbone: Vec<Var>) -> Result<Vec<Var>> {
        let cfg = self.net.config.clone();
        let fc = cfg.fpn_channels;
        let sizes = cfg.feature_sizes();
        let size_of = |level: usize| sizes[level - cfg.min_level];
        let p5 = *backbone.last().ok_or(Error::Shape {
            op: "bifpn",
            detail: "no backbone features".into(),
        })?;
        let p6 = self.resample(p5, "fpn.resample.3", fc, size_of(6))?;
        let p7 = self.resample(p6, "fpn.resample.4", fc, size_of(7))?;
        let mut feats = backbone;
        feats.extend([p6, p7]);
        for ci in 0..cfg.fpn_cell_repeats {
            for (ni, node) in BIFPN_NODES.iter().enumerate() {
                let p = format!("fpn.cell.{ci}.fnode.{ni}");
                let mut inputs = Vec::with_capacity(node.inputs.len());
                for &off in node.inputs {
                    let src = *feats.get(off).ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "BiFPN node {ni} refers to missing input {off}"
                        ))
                    })?;
                    inputs.push(self.resample(
                        src,
                        &format!("{p}.combine.resample.{off}"),
                        fc,
                        size_of(node.level),
                    )?);
                }
                let edges = self.param(&format!("{p}.combine.edge_weights"))?;
                let fused = self.tape.fuse(&inputs, edges, cfg.fusion_eps)?;
                let fused = self.swish(fused)?;
                let y = self.separable(fused, &format!("{p}.after_combine.conv"))?;
                let y = self.bn(y, &format!("{p}.after_combine.conv.bn"))?;
                feats.push(y);
            }
            let keep_from = feats.len() - cfg.num_levels();
            feats.drain(..keep_from);
        }
        Ok(feats)
    }

    /// Class or box head: shared separable convs with a BN per level, then the predictor.
    fn head(&mut self, feats: &[Var], prefix: &str) -> Result<Vec<Var>> {
        let repeats = self.net.config.box_class_repeats;
        let mut out = Vec::with_capacity(feats.len());
        for (level, &x) in feats.iter().enumerate() {
            let mut h = x;
            for i in 0..repeats {
                h = self.separable(h, &format!("{prefix}.conv_rep.{i}"))?;
                h = self.bn(h, &format!("{prefix}.bn_rep.{i}.{level}.bn"))?;
                h = self.swish(h)?;
            }
            out.push(self.separable(h, &format!("{prefix}.predict"))?);
        }
        Ok(out)
    }
}
