//! Trainable parameters and the optimizers that update them: SGD with momentum (effdet's
//! recipe), AdamW, gradient-norm clipping and dynamic loss scaling for mixed precision, each
//! matching its PyTorch counterpart step for step.
//!
//! effdet's `train.py` builds its optimizer with timm's `create_optimizer` (`--opt momentum`):
//! `torch.optim.SGD(momentum=0.9, nesterov=False)` over two parameter groups made by timm's
//! `param_groups_weight_decay` / `add_weight_decay`, one with `weight_decay = 4e-5` and one with
//! `weight_decay = 0`. Each step runs `clip_grad_norm_(parameters, 10.0)` after the backward pass
//! and before `optimizer.step()`. Here a [`Param`] carries its group as the `decay` flag, so one
//! optimizer applies both groups.
//!
//! Arithmetic follows torch's single-tensor kernels (what `torch.optim` runs on CPU tensors):
//! f32 tensors, Python-float hyper-parameters cast to f32 at each use, the same operation order,
//! and a fused multiply-add wherever torch's kernel fuses one (`add(alpha=)`, `lerp`,
//! `addcmul`). SGD is bit-identical to torch; AdamW differs only where torch's CPU `sqrt` is
//! not correctly rounded. `f32::mul_add` is a hardware FMA where the CPU has one.
//!
//! Optimizer state is a flat map of named f32 tensors (`<param>.momentum_buffer`,
//! `<param>.exp_avg`, `<param>.exp_avg_sq`, `<param>.step`: torch's own state names), so it
//! saves to safetensors next to the weights ([`save_tensors`], [`load_tensors`]) and a resumed
//! run continues bit-identically.
//!
//! One update of effdet's recipe (with mixed-precision loss scaling):
//!
//! ```
//! use effdet::compute::Tensor;
//! use effdet::train::optim::{clip_grad_norm, LossScaler, ParamSet, Sgd};
//!
//! # fn main() -> effdet::Result<()> {
//! let mut params = ParamSet::from_named(vec![
//!     ("backbone.conv_stem.weight".to_string(), Tensor::zeros(vec![32, 3, 3, 3])),
//!     ("backbone.bn1.bias".to_string(), Tensor::zeros(vec![32])),
//! ])?;
//! assert!(params[0].decay && !params[1].decay); // conv weight decays, bias does not
//! let mut opt = Sgd::effdet(0.08); // the scheduler sets opt.lr before every update
//! let mut scaler = LossScaler::default();
//! // ... backward pass of `scaler.scale_loss(loss)` fills every `grad` ...
//! for p in params.iter_mut() {
//!     p.grad = Some(Tensor::zeros(p.value.shape().to_vec()));
//! }
//! scaler.unscale_and_check(&mut params)?;
//! clip_grad_norm(&mut params, 10.0);
//! let stepped = scaler.step(&mut opt, &mut params)?; // false: overflow, step skipped
//! scaler.update()?;
//! assert!(stepped);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::compute::Tensor;
use crate::error::{Error, Result};

/// effdet's default weight decay (`train.py --weight-decay 4e-5`).
pub const EFFDET_WEIGHT_DECAY: f64 = 4e-5;
/// effdet's default gradient clipping norm (`train.py --clip-grad 10.0`).
pub const EFFDET_CLIP_GRAD_NORM: f32 = 10.0;
/// effdet's SGD momentum (`train.py --momentum 0.9`).
pub const EFFDET_MOMENTUM: f64 = 0.9;

/// Whether weight decay applies to a parameter, by timm's rule (`param_groups_weight_decay` with
/// `weight_decay_exclude_1d=True`, formerly `add_weight_decay`): parameters with at most one
/// dimension and any parameter whose name ends in `.bias` get no decay.
///
/// For EfficientDet this means: 4-D conv weights (stem, depthwise, pointwise, SE, BiFPN resample,
/// head predictors) and 2-D linear weights decay; BN weights and biases, conv biases and the
/// BiFPN `edge_weights` (1-D) do not.
pub fn applies_weight_decay(name: &str, shape: &[usize]) -> bool {
    shape.len() > 1 && !name.ends_with(".bias")
}

/// One trainable tensor: its effdet `state_dict` key, value, gradient and weight-decay group.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    /// The effdet key, e.g. `backbone.conv_stem.weight`; also names its optimizer state.
    pub name: String,
    /// The current value.
    pub value: Tensor,
    /// The gradient of the loss, same shape as `value`; `None` means "no gradient this step"
    /// and, as in torch, the optimizer leaves the parameter and its state untouched.
    pub grad: Option<Tensor>,
    /// Whether weight decay applies (timm's decay group); see [`applies_weight_decay`].
    pub decay: bool,
}

impl Param {
    /// A parameter without gradient, its decay flag decided by [`applies_weight_decay`].
    pub fn new(name: impl Into<String>, value: Tensor) -> Self {
        let name = name.into();
        let decay = applies_weight_decay(&name, value.shape());
        Param {
            name,
            value,
            grad: None,
            decay,
        }
    }

    /// A parameter with an explicit decay flag.
    pub fn with_decay(name: impl Into<String>, value: Tensor, decay: bool) -> Self {
        Param {
            name: name.into(),
            value,
            grad: None,
            decay,
        }
    }

    /// Sets the gradient; errors unless its shape equals the value's.
    pub fn set_grad(&mut self, grad: Tensor) -> Result<()> {
        check_same_shape(&self.name, "gradient", grad.shape(), self.value.shape())?;
        self.grad = Some(grad);
        Ok(())
    }

    /// Adds `grad` to the gradient (gradient accumulation); sets it when there is none.
    pub fn accumulate_grad(&mut self, grad: &Tensor) -> Result<()> {
        check_same_shape(&self.name, "gradient", grad.shape(), self.value.shape())?;
        match &mut self.grad {
            Some(g) => {
                for (a, b) in g.data_mut().iter_mut().zip(grad.data()) {
                    *a += *b;
                }
            }
            None => self.grad = Some(grad.clone()),
        }
        Ok(())
    }

    /// The gradient, which must exist and match the value's shape (what an optimizer reads).
    fn checked_grad(&self) -> Result<Option<&Tensor>> {
        match &self.grad {
            None => Ok(None),
            Some(g) => {
                check_same_shape(&self.name, "gradient", g.shape(), self.value.shape())?;
                Ok(Some(g))
            }
        }
    }
}

fn check_same_shape(name: &str, what: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} of parameter `{name}` has shape {actual:?}, the parameter has {expected:?}"
        )))
    }
}

fn check_unique_names(params: &[Param]) -> Result<()> {
    let mut seen = HashSet::with_capacity(params.len());
    for p in params {
        if !seen.insert(p.name.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "parameter name `{}` appears twice; optimizer state is keyed by name",
                p.name
            )));
        }
    }
    Ok(())
}

/// An ordered set of uniquely named parameters: what training hands to the optimizer, the
/// gradient clipper, the loss scaler, the EMA and the data-parallel gradient averaging.
///
/// Dereferences to `[Param]`, so every function taking `&mut [Param]` accepts it. Names are
/// checked unique when the set is built; the optimizers check again at each step (cheap), so
/// renaming a parameter in place cannot silently share optimizer state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamSet {
    params: Vec<Param>,
}

impl ParamSet {
    /// A set from parameters; errors on a duplicate name.
    pub fn new(params: Vec<Param>) -> Result<Self> {
        check_unique_names(&params)?;
        Ok(ParamSet { params })
    }

    /// A set from `(effdet key, value)` pairs, decay flags by [`applies_weight_decay`].
    pub fn from_named(named: impl IntoIterator<Item = (String, Tensor)>) -> Result<Self> {
        Self::new(named.into_iter().map(|(n, v)| Param::new(n, v)).collect())
    }

    /// The parameter called `name`.
    pub fn get(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    /// The parameter called `name`, mutably.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Param> {
        self.params.iter_mut().find(|p| p.name == name)
    }

    /// Drops every gradient (torch's `zero_grad(set_to_none=True)`, its default).
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.grad = None;
        }
    }

    /// Total number of scalar values over all parameters.
    pub fn num_values(&self) -> usize {
        self.params.iter().map(|p| p.value.len()).sum()
    }

    /// `(name, value)` pairs in order, e.g. to feed [`crate::train::ema::ModelEma::update`].
    pub fn named_values(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.value))
    }

    /// The parameters, consuming the set.
    pub fn into_vec(self) -> Vec<Param> {
        self.params
    }
}

impl std::ops::Deref for ParamSet {
    type Target = [Param];
    fn deref(&self) -> &[Param] {
        &self.params
    }
}

impl std::ops::DerefMut for ParamSet {
    fn deref_mut(&mut self) -> &mut [Param] {
        &mut self.params
    }
}

/// What every optimizer offers the training loop: a learning rate the scheduler sets before each
/// update, a step over the parameters with gradients, and resumable state.
pub trait Optimizer {
    /// The learning rate the next [`Optimizer::step`] uses.
    fn lr(&self) -> f64;
    /// Sets the learning rate (the scheduler calls this before every update).
    fn set_lr(&mut self, lr: f64);
    /// Updates every parameter that has a gradient; parameters without one are skipped and their
    /// state is kept (torch semantics). Errors on duplicate names or a gradient of the wrong
    /// shape, before anything is modified.
    fn step(&mut self, params: &mut [Param]) -> Result<()>;
    /// The optimizer state as named tensors (torch's per-parameter state names, prefixed by the
    /// parameter name), ready for [`save_tensors`].
    fn state_dict(&self) -> BTreeMap<String, Tensor>;
    /// Restores state saved by [`Optimizer::state_dict`]. Strict: every key must name a
    /// parameter in `params` plus a state suffix this optimizer uses, with that parameter's
    /// shape. Parameters without saved state start fresh (as torch's for never-stepped ones).
    fn load_state_dict(&mut self, params: &[Param], state: &BTreeMap<String, Tensor>)
    -> Result<()>;
    /// Forgets all state (buffers, moments, step counts).
    fn reset_state(&mut self);
}

fn validate_step(params: &[Param]) -> Result<()> {
    check_unique_names(params)?;
    for p in params {
        p.checked_grad()?;
    }
    Ok(())
}

/// Splits `key` into `(parameter name, suffix)` for one of `suffixes`, checking the parameter
/// exists in `params` and returning it.
fn split_state_key<'a>(
    key: &'a str,
    suffixes: &[&'static str],
    params: &'a [Param],
) -> Result<(&'a Param, &'static str)> {
    for &suffix in suffixes {
        if let Some(name) = key.strip_suffix(suffix).and_then(|k| k.strip_suffix('.'))
            && let Some(p) = params.iter().find(|p| p.name == name)
        {
            return Ok((p, suffix));
        }
    }
    Err(Error::InvalidArgument(format!(
        "optimizer state: `{key}` is not `<parameter>.<{}>` for any parameter being optimized",
        suffixes.join("|")
    )))
}

// ------------------------------------------------------------------------------------------------
// SGD
// ------------------------------------------------------------------------------------------------

/// `torch.optim.SGD` with momentum, weight decay on [`Param::decay`] parameters only (timm's
/// two groups), optional Nesterov.
///
/// Per parameter with gradient `g` (torch's `_single_tensor_sgd`, all f32):
/// `d = g + wd * p` (only when `decay` and `wd != 0`); `buf = d` on the first step, otherwise
/// `buf = momentum * buf + (1 - dampening) * d`; `d = d + momentum * buf` if Nesterov, else
/// `d = buf`; `p = p - lr * d`. With `momentum == 0` there is no buffer and `d` is used directly.
/// Each `x + alpha * y` is one fused multiply-add, as torch's `add(alpha=)` kernel computes it;
/// the result is bit-identical to torch on the CPU.
#[derive(Clone, Debug)]
pub struct Sgd {
    /// Learning rate (set by the scheduler before each step).
    pub lr: f64,
    /// Momentum factor (effdet: 0.9).
    pub momentum: f64,
    /// Dampening of the momentum update (torch default 0).
    pub dampening: f64,
    /// L2 weight decay added to the gradient of `decay` parameters (effdet: 4e-5).
    pub weight_decay: f64,
    /// Nesterov momentum (effdet: off).
    pub nesterov: bool,
    buffers: HashMap<String, Tensor>,
}

impl Sgd {
    /// The suffix of a momentum buffer in [`Optimizer::state_dict`].
    pub const MOMENTUM_BUFFER: &'static str = "momentum_buffer";

    /// SGD with momentum 0.9, no dampening, no Nesterov (timm's `momentum` optimizer).
    pub fn new(lr: f64, weight_decay: f64) -> Self {
        Sgd {
            lr,
            momentum: EFFDET_MOMENTUM,
            dampening: 0.0,
            weight_decay,
            nesterov: false,
            buffers: HashMap::new(),
        }
    }

    /// effdet's optimizer: momentum 0.9, weight decay 4e-5.
    pub fn effdet(lr: f64) -> Self {
        Self::new(lr, EFFDET_WEIGHT_DECAY)
    }

    /// The momentum buffer of parameter `name`, if it has taken a step.
    pub fn momentum_buffer(&self, name: &str) -> Option<&Tensor> {
        self.buffers.get(name)
    }
}

impl Optimizer for Sgd {
    fn lr(&self) -> f64 {
        self.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn step(&mut self, params: &mut [Param]) -> Result<()> {
        validate_step(params)?;
        let neg_lr = -self.lr as f32;
        let momentum = self.momentum as f32;
        let one_minus_dampening = (1.0 - self.dampening) as f32;
        for p in params.iter_mut() {
            let Some(grad) = &p.grad else { continue };
            let mut d: Vec<f32> = grad.data().to_vec();
            if p.decay && self.weight_decay != 0.0 {
                let wd = self.weight_decay as f32;
                for (d, &w) in d.iter_mut().zip(p.value.data()) {
                    *d = w.mul_add(wd, *d);
                }
            }
            if self.momentum != 0.0 {
                let buf = match self.buffers.entry(p.name.clone()) {
                    Entry::Vacant(slot) => {
                        slot.insert(Tensor::new(p.value.shape().to_vec(), d.clone())?)
                    }
                    Entry::Occupied(slot) => {
                        let buf = slot.into_mut();
                        for (b, &x) in buf.data_mut().iter_mut().zip(&d) {
                            *b = x.mul_add(one_minus_dampening, *b * momentum);
                        }
                        buf
                    }
                };
                if self.nesterov {
                    for (x, &b) in d.iter_mut().zip(buf.data()) {
                        *x = b.mul_add(momentum, *x);
                    }
                } else {
                    d.copy_from_slice(buf.data());
                }
            }
            for (w, &x) in p.value.data_mut().iter_mut().zip(&d) {
                *w = x.mul_add(neg_lr, *w);
            }
        }
        Ok(())
    }

    fn state_dict(&self) -> BTreeMap<String, Tensor> {
        self.buffers
            .iter()
            .map(|(name, buf)| (format!("{name}.{}", Self::MOMENTUM_BUFFER), buf.clone()))
            .collect()
    }

    fn load_state_dict(
        &mut self,
        params: &[Param],
        state: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        check_unique_names(params)?;
        let mut buffers = HashMap::new();
        for (key, t) in state {
            let (p, _) = split_state_key(key, &[Self::MOMENTUM_BUFFER], params)?;
            check_same_shape(&p.name, "saved momentum buffer", t.shape(), p.value.shape())?;
            buffers.insert(p.name.clone(), t.clone());
        }
        self.buffers = buffers;
        Ok(())
    }

    fn reset_state(&mut self) {
        self.buffers.clear();
    }
}

// ------------------------------------------------------------------------------------------------
// AdamW
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct AdamState {
    step: f32,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// `torch.optim.AdamW` (decoupled weight decay on [`Param::decay`] parameters only, bias
/// correction, no AMSGrad).
///
/// Per parameter with gradient `g` (torch's `_single_tensor_adam` with
/// `decoupled_weight_decay=True`): `step += 1`; `p *= 1 - lr * wd`; `m = lerp(m, g, 1 - beta1)`;
/// `v = beta2 * v + (1 - beta2) * g * g`; `bc1 = 1 - beta1^step`, `bc2 = 1 - beta2^step` (f64);
/// `denom = sqrt(v) / sqrt(bc2) + eps`; `p += -(lr / bc1) * m / denom`. `lerp` and `addcmul`
/// fuse their multiply-add as torch's kernels do. The one known difference: torch's
/// vectorised CPU `sqrt` is not correctly rounded (1 ulp off for some inputs on AVX-512 builds);
/// this uses the correctly rounded one (as CUDA's `sqrtf` is), so a few values differ by an ulp.
#[derive(Clone, Debug)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f64,
    /// Coefficients of the running averages of the gradient and its square.
    pub betas: (f64, f64),
    /// Added to the denominator (torch default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay of `decay` parameters (torch default 1e-2).
    pub weight_decay: f64,
    state: HashMap<String, AdamState>,
}

impl AdamW {
    /// State suffix: first moment.
    pub const EXP_AVG: &'static str = "exp_avg";
    /// State suffix: second moment.
    pub const EXP_AVG_SQ: &'static str = "exp_avg_sq";
    /// State suffix: per-parameter step count (a 0-d f32 tensor, as torch stores it).
    pub const STEP: &'static str = "step";

    /// AdamW with torch's defaults: betas (0.9, 0.999), eps 1e-8.
    pub fn new(lr: f64, weight_decay: f64) -> Self {
        AdamW {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay,
            state: HashMap::new(),
        }
    }

    /// The number of steps parameter `name` has taken.
    pub fn step_count(&self, name: &str) -> Option<u64> {
        self.state.get(name).map(|s| s.step as u64)
    }

    /// The first and second moments of parameter `name`, if it has taken a step.
    pub fn moments(&self, name: &str) -> Option<(&Tensor, &Tensor)> {
        self.state.get(name).map(|s| (&s.exp_avg, &s.exp_avg_sq))
    }
}

/// torch's CPU `lerp` for one value: `fma(w, end - self, self)` when `|w| < 0.5`, otherwise
/// `fma(w - 1, end - self, end)`.
#[inline]
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        w.mul_add(b - a, a)
    } else {
        (w - 1.0).mul_add(b - a, b)
    }
}

impl Optimizer for AdamW {
    fn lr(&self) -> f64 {
        self.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn step(&mut self, params: &mut [Param]) -> Result<()> {
        validate_step(params)?;
        let (beta1, beta2) = self.betas;
        let w1 = (1.0 - beta1) as f32;
        let b2 = beta2 as f32;
        let one_minus_b2 = (1.0 - beta2) as f32;
        let eps = self.eps as f32;
        for p in params.iter_mut() {
            let Some(grad) = &p.grad else { continue };
            let st = self
                .state
                .entry(p.name.clone())
                .or_insert_with(|| AdamState {
                    step: 0.0,
                    exp_avg: Tensor::zeros(p.value.shape().to_vec()),
                    exp_avg_sq: Tensor::zeros(p.value.shape().to_vec()),
                });
            st.step += 1.0;
            if p.decay && self.weight_decay != 0.0 {
                let f = (1.0 - self.lr * self.weight_decay) as f32;
                for w in p.value.data_mut() {
                    *w *= f;
                }
            }
            for (m, &g) in st.exp_avg.data_mut().iter_mut().zip(grad.data()) {
                *m = lerp(*m, g, w1);
            }
            for (v, &g) in st.exp_avg_sq.data_mut().iter_mut().zip(grad.data()) {
                *v = (one_minus_b2 * g).mul_add(g, *v * b2);
            }
            let step = st.step as f64;
            let bias_correction1 = 1.0 - beta1.powf(step);
            let bias_correction2 = 1.0 - beta2.powf(step);
            let neg_step_size = (-(self.lr / bias_correction1)) as f32;
            let bc2_sqrt = bias_correction2.powf(0.5) as f32;
            let moments = st.exp_avg.data().iter().zip(st.exp_avg_sq.data());
            for (w, (&m, &v)) in p.value.data_mut().iter_mut().zip(moments) {
                let denom = v.sqrt() / bc2_sqrt + eps;
                *w += neg_step_size * m / denom;
            }
        }
        Ok(())
    }

    fn state_dict(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (name, st) in &self.state {
            out.insert(
                format!("{name}.{}", Self::STEP),
                filled(Vec::new(), st.step),
            );
            out.insert(format!("{name}.{}", Self::EXP_AVG), st.exp_avg.clone());
            out.insert(
                format!("{name}.{}", Self::EXP_AVG_SQ),
                st.exp_avg_sq.clone(),
            );
        }
        out
    }

    fn load_state_dict(
        &mut self,
        params: &[Param],
        state: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        check_unique_names(params)?;
        type Parts = (Option<f32>, Option<Tensor>, Option<Tensor>);
        let mut parts: HashMap<&str, Parts> = HashMap::new();
        for (key, t) in state {
            let (p, suffix) =
                split_state_key(key, &[Self::STEP, Self::EXP_AVG_SQ, Self::EXP_AVG], params)?;
            let entry = parts.entry(p.name.as_str()).or_default();
            if suffix == Self::STEP {
                match t.data() {
                    [s] if *s >= 0.0 && s.fract() == 0.0 => entry.0 = Some(*s),
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "optimizer state: `{key}` must hold one whole non-negative number"
                        )));
                    }
                }
            } else {
                check_same_shape(&p.name, "saved AdamW moment", t.shape(), p.value.shape())?;
                if suffix == Self::EXP_AVG {
                    entry.1 = Some(t.clone());
                } else {
                    entry.2 = Some(t.clone());
                }
            }
        }
        let mut new_state = HashMap::new();
        for (name, part) in parts {
            match part {
                (Some(step), Some(exp_avg), Some(exp_avg_sq)) => {
                    new_state.insert(
                        name.to_string(),
                        AdamState {
                            step,
                            exp_avg,
                            exp_avg_sq,
                        },
                    );
                }
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "optimizer state for `{name}` is incomplete: AdamW needs `{name}.step`, \
                         `{name}.exp_avg` and `{name}.exp_avg_sq`"
                    )));
                }
            }
        }
        self.state = new_state;
        Ok(())
    }

    fn reset_state(&mut self) {
        self.state.clear();
    }
}

/// A tensor of `shape` with every element `v` (`shape` may be empty: a 0-d tensor has one).
fn filled(shape: Vec<usize>, v: f32) -> Tensor {
    let mut t = Tensor::zeros(shape);
    t.data_mut().fill(v);
    t
}

// ------------------------------------------------------------------------------------------------
// Gradient clipping
// ------------------------------------------------------------------------------------------------

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` (L2): returns the total norm of all
/// gradients (as if concatenated into one vector; parameters without gradient are ignored) and
/// scales every gradient by `min(max_norm / (total + 1e-6), 1)`.
///
/// The norm is accumulated in f64 and rounded to f32 (torch reduces in f32, so the two agree to
/// about 1e-7 relative); the coefficient is computed in f32 as torch does. A non-finite norm
/// makes the coefficient NaN or 0 and the gradients non-finite, as in torch (the loss scaler
/// then skips the step).
pub fn clip_grad_norm(params: &mut [Param], max_norm: f32) -> f32 {
    let total = grad_norm(params);
    let coef = max_norm / (total + 1e-6);
    // torch clamps (NaN stays NaN) and always multiplies; multiplying by exactly 1 is a no-op.
    let coef = if coef.is_nan() { coef } else { coef.min(1.0) };
    if coef != 1.0 {
        for g in params.iter_mut().filter_map(|p| p.grad.as_mut()) {
            for x in g.data_mut() {
                *x *= coef;
            }
        }
    }
    total
}

/// The L2 norm of all gradients together (f64 accumulation, rounded to f32).
pub fn grad_norm(params: &[Param]) -> f32 {
    let mut sum = 0.0f64;
    for g in params.iter().filter_map(|p| p.grad.as_ref()) {
        sum += g
            .data()
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>();
    }
    sum.sqrt() as f32
}

// ------------------------------------------------------------------------------------------------
// Dynamic loss scaling
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScalerStage {
    Ready,
    Unscaled { found_inf: bool },
    Stepped { found_inf: bool },
}

/// Dynamic loss scaling for mixed-precision training, with `torch.amp.GradScaler` semantics.
///
/// Per iteration: backpropagate `scale_loss(loss)` (or seed the backward pass with
/// [`LossScaler::scale`]); [`LossScaler::unscale_and_check`] divides every gradient by the scale
/// (multiplying by the f32 reciprocal computed in f64, as torch) and reports whether all are
/// finite; clip if wanted; [`LossScaler::step`] runs the optimizer only when they were finite;
/// [`LossScaler::update`] halves the scale after an overflow (`backoff_factor`) and doubles it
/// after `growth_interval` consecutive finite steps (`growth_factor`; never to infinity).
///
/// Initial scale: torch's `GradScaler` (and apex AMP, which effdet's `train.py --amp` used)
/// starts at 2^16 ([`LossScaler::TORCH_INIT_SCALE`], the [`Default`]); Keras'
/// `LossScaleOptimizer`, used by NVIDIA's TF2 EfficientDet port, starts at 2^15
/// ([`LossScaler::KERAS_INIT_SCALE`]). Growth 2, backoff 0.5, interval 2000 in both.
///
/// It works the same on f32 gradients (useful to test the AMP control flow without f16). A
/// disabled scaler (torch's `enabled=False`) has scale 1, never checks gradients and always
/// steps. In data-parallel training gradients are averaged before unscaling, so every rank finds
/// the same overflow and skips the same steps.
#[derive(Clone, Debug)]
pub struct LossScaler {
    scale: f32,
    growth_factor: f32,
    backoff_factor: f32,
    growth_interval: u32,
    growth_tracker: u32,
    enabled: bool,
    stage: ScalerStage,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::new(Self::TORCH_INIT_SCALE)
    }
}

impl LossScaler {
    /// `torch.amp.GradScaler`'s initial scale, 2^16.
    pub const TORCH_INIT_SCALE: f32 = 65536.0;
    /// Keras' dynamic loss scale initial value (NVIDIA's TF2 EfficientDet port), 2^15.
    pub const KERAS_INIT_SCALE: f32 = 32768.0;
    /// Names of the scaler's state in [`LossScaler::state_dict`].
    pub const STATE_SCALE: &'static str = "loss_scaler.scale";
    /// See [`LossScaler::STATE_SCALE`].
    pub const STATE_GROWTH_TRACKER: &'static str = "loss_scaler.growth_tracker";

    /// An enabled scaler starting at `init_scale`, growth 2, backoff 0.5, interval 2000.
    pub fn new(init_scale: f32) -> Self {
        LossScaler {
            scale: init_scale,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            growth_tracker: 0,
            enabled: true,
            stage: ScalerStage::Ready,
        }
    }

    /// A scaler with every knob given; errors as torch does on `growth_factor <= 1`,
    /// `backoff_factor >= 1`, and also on a non-positive or non-finite scale or a zero interval.
    pub fn with_config(
        init_scale: f32,
        growth_factor: f32,
        backoff_factor: f32,
        growth_interval: u32,
    ) -> Result<Self> {
        if !(init_scale.is_finite() && init_scale > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "loss scale must be finite and positive, got {init_scale}"
            )));
        }
        if !(growth_factor > 1.0 && growth_factor.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "loss scale growth factor must be > 1, got {growth_factor}"
            )));
        }
        if !(backoff_factor > 0.0 && backoff_factor < 1.0) {
            return Err(Error::InvalidArgument(format!(
                "loss scale backoff factor must be in (0, 1), got {backoff_factor}"
            )));
        }
        if growth_interval == 0 {
            return Err(Error::InvalidArgument(
                "loss scale growth interval must be at least 1".into(),
            ));
        }
        Ok(LossScaler {
            growth_factor,
            backoff_factor,
            growth_interval,
            ..Self::new(init_scale)
        })
    }

    /// A pass-through scaler (torch's `enabled=False`).
    pub fn disabled() -> Self {
        LossScaler {
            scale: 1.0,
            enabled: false,
            ..Self::new(1.0)
        }
    }

    /// Whether scaling is active.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The current scale (1 when disabled).
    pub fn scale(&self) -> f32 {
        if self.enabled { self.scale } else { 1.0 }
    }

    /// Consecutive finite steps since the last growth or backoff.
    pub fn growth_tracker(&self) -> u32 {
        self.growth_tracker
    }

    /// `loss * scale` (torch's `scaler.scale(loss)`).
    pub fn scale_loss(&self, loss: f32) -> f32 {
        loss * self.scale()
    }

    /// Unscales every gradient in place and returns `true` when all of them are finite (torch's
    /// `scaler.unscale_(optimizer)`, which also unscales non-finite gradients). Call it at most
    /// once per iteration, before clipping; errors when called twice or after
    /// [`LossScaler::step`] without an [`LossScaler::update`] in between. Always `true` when
    /// disabled.
    pub fn unscale_and_check(&mut self, params: &mut [Param]) -> Result<bool> {
        if !self.enabled {
            return Ok(true);
        }
        match self.stage {
            ScalerStage::Ready => {}
            ScalerStage::Unscaled { .. } => {
                return Err(Error::InvalidArgument(
                    "LossScaler::unscale_and_check called twice since the last update()".into(),
                ));
            }
            ScalerStage::Stepped { .. } => {
                return Err(Error::InvalidArgument(
                    "LossScaler::unscale_and_check called after step() without update()".into(),
                ));
            }
        }
        let inv_scale = (1.0 / self.scale as f64) as f32;
        let mut found_inf = false;
        for g in params.iter_mut().filter_map(|p| p.grad.as_mut()) {
            for x in g.data_mut() {
                if !x.is_finite() {
                    found_inf = true;
                }
                if inv_scale != 1.0 {
                    *x *= inv_scale;
                }
            }
        }
        self.stage = ScalerStage::Unscaled { found_inf };
        Ok(!found_inf)
    }

    /// Unscales (unless already done this iteration), then runs `optimizer.step(params)` only if
    /// every gradient was finite. Returns whether the optimizer stepped. Errors when called
    /// twice without [`LossScaler::update`].
    pub fn step(&mut self, optimizer: &mut dyn Optimizer, params: &mut [Param]) -> Result<bool> {
        if !self.enabled {
            optimizer.step(params)?;
            return Ok(true);
        }
        let found_inf = match self.stage {
            ScalerStage::Ready => !self.unscale_and_check(params)?,
            ScalerStage::Unscaled { found_inf } => found_inf,
            ScalerStage::Stepped { .. } => {
                return Err(Error::InvalidArgument(
                    "LossScaler::step called twice since the last update()".into(),
                ));
            }
        };
        if !found_inf {
            optimizer.step(params)?;
        }
        self.stage = ScalerStage::Stepped { found_inf };
        Ok(!found_inf)
    }

    /// Adjusts the scale for the next iteration (torch's `_amp_update_scale_`): after an overflow
    /// `scale *= backoff_factor` and the tracker resets; otherwise the tracker counts up and at
    /// `growth_interval` the scale grows by `growth_factor` (unless that overflows f32) and the
    /// tracker resets. Errors when no gradients were checked since the last update.
    pub fn update(&mut self) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let found_inf = match self.stage {
            ScalerStage::Ready => {
                return Err(Error::InvalidArgument(
                    "LossScaler::update called before any gradients were unscaled".into(),
                ));
            }
            ScalerStage::Unscaled { found_inf } | ScalerStage::Stepped { found_inf } => found_inf,
        };
        if found_inf {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
        } else {
            let successful = self.growth_tracker + 1;
            if successful == self.growth_interval {
                let grown = self.scale * self.growth_factor;
                if grown.is_finite() {
                    self.scale = grown;
                }
                self.growth_tracker = 0;
            } else {
                self.growth_tracker = successful;
            }
        }
        self.stage = ScalerStage::Ready;
        Ok(())
    }

    /// The scale and growth tracker as named 1-element tensors, for checkpoints.
    pub fn state_dict(&self) -> BTreeMap<String, Tensor> {
        let one = |v: f32| filled(vec![1], v);
        BTreeMap::from([
            (Self::STATE_SCALE.to_string(), one(self.scale)),
            (
                Self::STATE_GROWTH_TRACKER.to_string(),
                one(self.growth_tracker as f32),
            ),
        ])
    }

    /// Restores [`LossScaler::state_dict`] output (other keys in `state` are ignored, so a
    /// whole checkpoint map can be passed).
    pub fn load_state_dict(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let get = |key: &str| -> Result<f32> {
            match state.get(key).map(Tensor::data) {
                Some([v]) => Ok(*v),
                Some(_) => Err(Error::InvalidArgument(format!(
                    "loss scaler state `{key}` must hold one value"
                ))),
                None => Err(Error::InvalidArgument(format!(
                    "loss scaler state `{key}` is missing"
                ))),
            }
        };
        let scale = get(Self::STATE_SCALE)?;
        let tracker = get(Self::STATE_GROWTH_TRACKER)?;
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "loss scaler state: scale {scale} is not finite and positive"
            )));
        }
        if !(tracker >= 0.0 && tracker.fract() == 0.0 && tracker < self.growth_interval as f32) {
            return Err(Error::InvalidArgument(format!(
                "loss scaler state: growth tracker {tracker} is not a whole number below the \
                 growth interval {}",
                self.growth_interval
            )));
        }
        self.scale = scale;
        self.growth_tracker = tracker as u32;
        self.stage = ScalerStage::Ready;
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// safetensors I/O for state maps
// ------------------------------------------------------------------------------------------------

/// Writes named f32 tensors (optimizer, scaler or EMA state, weights) to a safetensors file.
pub fn save_tensors(path: impl AsRef<Path>, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let path = path.as_ref();
    let bytes = serialize_tensors(tensors)?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Serialises named f32 tensors to safetensors bytes.
pub fn serialize_tensors(tensors: &BTreeMap<String, Tensor>) -> Result<Vec<u8>> {
    serialize_tensors_with(tensors, BTreeMap::new(), false)
}

/// Serialises named tensors with string metadata, as f32 or (`f16`) half precision.
pub fn serialize_tensors_with(
    tensors: &BTreeMap<String, Tensor>,
    metadata: BTreeMap<String, String>,
    f16: bool,
) -> Result<Vec<u8>> {
    let dtype = if f16 { Dtype::F16 } else { Dtype::F32 };
    let raw: Vec<(&String, Vec<u8>, &Tensor)> = tensors
        .iter()
        .map(|(k, t)| {
            let bytes = if f16 {
                t.data()
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect()
            } else {
                t.data().iter().flat_map(|v| v.to_le_bytes()).collect()
            };
            (k, bytes, t)
        })
        .collect();
    let mut views = Vec::with_capacity(raw.len());
    for (k, bytes, t) in &raw {
        let view = safetensors::tensor::TensorView::new(dtype, t.shape().to_vec(), bytes)
            .map_err(|e| Error::InvalidArgument(format!("tensor `{k}`: {e}")))?;
        views.push((k.as_str(), view));
    }
    let metadata = (!metadata.is_empty()).then(|| metadata.into_iter().collect());
    safetensors::serialize(views, metadata)
        .map_err(|e| Error::InvalidArgument(format!("cannot serialise tensors: {e}")))
}

/// Reads every tensor of a safetensors file as f32 (F32 only: state is never stored narrower).
pub fn load_tensors(path: impl AsRef<Path>) -> Result<BTreeMap<String, Tensor>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    deserialize_tensors(path, &bytes)
}

/// Parses safetensors bytes into named f32 tensors (`path` only names the source in errors).
pub fn deserialize_tensors(
    path: impl AsRef<Path>,
    bytes: &[u8],
) -> Result<BTreeMap<String, Tensor>> {
    let path = path.as_ref();
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::WeightsFormat {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (key, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(Error::UnsupportedDtype {
                key,
                dtype: format!("{:?}", view.dtype()),
            });
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.insert(key, Tensor::new(view.shape().to_vec(), data)?);
    }
    Ok(out)
}
