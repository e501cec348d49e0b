//! effdet 0.4.1's `DetectionLoss` (`effdet/loss.py` `loss_fn`) and its analytic gradient with
//! respect to every raw head output.
//!
//! For a batch of `B` images, with `N = (sum of the images' num_positives) + 1` (effdet's
//! `num_positives_sum`, in f32):
//!
//! - **class loss**: for every level, position, anchor `a` and class `k`, with logit `x` (channel
//!   `a * K + k` of the NCHW class output), target `t = 1` if the anchor's class target is `k`
//!   else 0 (one-hot of the 0-based target; -1 and -2 are all-zero rows), and `p = sigmoid(x)`:
//!   - default (`legacy_focal = false`, effdet's `new_focal_loss`):
//!     `p_t = t p + (1 - t)(1 - p)`, `alpha_t = t alpha + (1 - t)(1 - alpha)`,
//!     `ce = BCE_with_logits(x, t')` with `t' = t (1 - label_smoothing) + label_smoothing / 2`,
//!     element loss `alpha_t (1 - p_t)^gamma ce / N`;
//!   - `legacy_focal = true` (`focal_loss_legacy`, no label smoothing):
//!     `exp(-gamma t x - gamma log1p(exp(-x))) * BCE_with_logits(x, t) * (t == 1 ? alpha :
//!     1 - alpha) / N`;
//!
//!   anchors whose class target is -2 contribute nothing (effdet multiplies by
//!   `cls_targets != -2`); the class loss is the sum over all elements, levels and images.
//! - **box loss**: Huber with `delta` (`0.5 q^2 + delta (|e| - q)`, `q = min(|e|, delta)`,
//!   `e = output - target`) summed over every code whose TARGET is non-zero (effdet's mask is
//!   `box_targets != 0.0` element by element: a positive anchor's code that is exactly 0, e.g.
//!   `tx` of a box centred on its anchor, is masked out too), divided by `4 N`.
//! - **total**: `class_loss + box_loss_weight * box_loss`.
//!
//! Gradients are those torch autograd computes through effdet's expressions (`d|e|/de = sign(e)`
//! with `sign(0) = 0`, clamp passing the gradient at `|e| == delta`): for a box code,
//! `box_loss_weight * mask * clamp(e, -delta, delta) / (4 N)`; for a logit, the derivative of the
//! element loss above. Everything is evaluated in f64 from the f32 inputs and rounded to f32 at
//! the end; sums are accumulated per channel plane and combined in a fixed order, so results do
//! not depend on the thread count. Planes run in parallel on the current rayon pool.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::postprocess::LevelOutput;

use super::labeler::{IGNORE, LevelTargets};

/// effdet's loss settings (config field names); [`Default`] is effdet's `tf_efficientdet_d0`
/// config: 90 classes, alpha 0.25, gamma 1.5, delta 0.1, box loss weight 50, no label
/// smoothing, new (non-legacy) focal loss.
#[derive(Clone, Debug, PartialEq)]
pub struct DetectionLoss {
    /// Classes `K` per anchor (`num_classes`).
    pub num_classes: usize,
    /// Focal loss weight of positives (`alpha`); negatives get `1 - alpha`.
    pub alpha: f32,
    /// Focal loss exponent (`gamma`).
    pub gamma: f32,
    /// Huber threshold of the box loss (`delta`).
    pub delta: f32,
    /// Weight of the box loss in the total (`box_loss_weight`).
    pub box_loss_weight: f32,
    /// Label smoothing of the cross-entropy targets (`label_smoothing`); ignored by the legacy
    /// focal loss, like effdet.
    pub label_smoothing: f32,
    /// Use effdet's `focal_loss_legacy` instead of `new_focal_loss` (`legacy_focal`).
    pub legacy_focal: bool,
}

impl DetectionLoss {
    /// effdet's default (`tf_efficientdet_d0`) loss configuration.
    pub fn d0() -> Self {
        DetectionLoss {
            num_classes: 90,
            alpha: 0.25,
            gamma: 1.5,
            delta: 0.1,
            box_loss_weight: 50.0,
            label_smoothing: 0.0,
            legacy_focal: false,
        }
    }

    /// The same loss for another number of classes.
    pub fn with_num_classes(mut self, num_classes: usize) -> Self {
        self.num_classes = num_classes;
        self
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument(format!("detection loss: {msg}")));
        if self.num_classes == 0 || self.num_classes > i32::MAX as usize {
            return bad(format!(
                "num_classes {} must be between 1 and 2^31 - 1",
                self.num_classes
            ));
        }
        for (name, v) in [
            ("alpha", self.alpha),
            ("gamma", self.gamma),
            ("delta", self.delta),
            ("box_loss_weight", self.box_loss_weight),
            ("label_smoothing", self.label_smoothing),
        ] {
            if !v.is_finite() {
                return bad(format!("{name} {v} is not finite"));
            }
        }
        if self.gamma < 0.0 {
            return bad(format!("gamma {} is negative", self.gamma));
        }
        if self.delta < 0.0 {
            return bad(format!("delta {} is negative", self.delta));
        }
        if !(0.0..=1.0).contains(&self.label_smoothing) {
            return bad(format!(
                "label_smoothing {} is outside [0, 1]",
                self.label_smoothing
            ));
        }
        Ok(())
    }
}

/// `a * b * c` or an error naming what overflowed.
fn product(factors: &[usize], what: &str) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .ok_or_else(|| {
            Error::InvalidArgument(format!("detection loss: {what} size {factors:?} overflows"))
        })
}

impl Default for DetectionLoss {
    fn default() -> Self {
        Self::d0()
    }
}

/// Gradient of the total loss for one level, in the layout of the network's batch outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct LevelGrads {
    /// d loss / d class logits, `[B, A * K, H, W]` (image `b`'s `[A * K, H, W]` block starts
    /// at `b * A * K * H * W`).
    pub class: Vec<f32>,
    /// d loss / d box codes, `[B, A * 4, H, W]`.
    pub boxes: Vec<f32>,
    /// Feature-map height `H`.
    pub height: usize,
    /// Feature-map width `W`.
    pub width: usize,
}

/// The detection loss of a batch and its gradient.
#[derive(Clone, Debug, PartialEq)]
pub struct LossOutput {
    /// `class_loss + box_loss_weight * box_loss`.
    pub loss: f32,
    /// Focal loss summed over all elements, divided by `num_positives + 1`.
    pub class_loss: f32,
    /// Masked Huber loss summed over all codes, divided by `4 (num_positives + 1)`.
    pub box_loss: f32,
    /// Positive anchors in the batch (sum of the targets' `num_positives`; the normaliser is
    /// this plus one).
    pub num_positives: f32,
    /// d loss / d outputs per level (`min_level` first).
    pub grads: Vec<LevelGrads>,
}

/// Per-element focal loss and its derivative, with the constants of one call.
#[derive(Clone, Copy)]
struct Focal {
    alpha: f64,
    gamma: f64,
    smoothing: f64,
    legacy: bool,
    inv_n: f64,
}

impl Focal {
    /// `(loss, d loss / d x)` for logit `x` and one-hot target `t` (0 or 1), already divided
    /// by the normaliser.
    #[inline]
    fn eval(&self, x: f64, positive: bool) -> (f64, f64) {
        let t = if positive { 1.0 } else { 0.0 };
        // e = exp(-|x|); p = sigmoid(x), q = sigmoid(-x) = 1 - p, both without cancellation.
        let e = (-x.abs()).exp();
        let inv = 1.0 / (1.0 + e);
        let (p, q) = if x >= 0.0 {
            (inv, e * inv)
        } else {
            (e * inv, inv)
        };
        let log1p_e = e.ln_1p();
        let g = self.gamma;
        if self.legacy {
            let ce = x.max(0.0) - x * t + log1p_e;
            // modulator = exp(-gamma t x - gamma log1p(exp(-x))), log1p(exp(-x)) = softplus(-x).
            let softplus_neg = (-x).max(0.0) + log1p_e;
            let modulator = (-g * t * x - g * softplus_neg).exp();
            let dmod = modulator * g * (q - t);
            let w = if positive {
                self.alpha
            } else {
                1.0 - self.alpha
            };
            let loss = w * modulator * ce;
            let grad = w * (dmod * ce + modulator * (p - t));
            (loss * self.inv_n, grad * self.inv_n)
        } else {
            let ts = t * (1.0 - self.smoothing) + 0.5 * self.smoothing;
            let ce = x.max(0.0) - x * ts + log1p_e;
            // base = 1 - p_t (q for a positive, p for a negative), d base / dx = (1 - 2t) p q,
            // so d base^gamma / dx = gamma base^gamma * (-p for a positive, q for a negative):
            // one power per element, and a zero base gives a zero derivative like autograd's
            // `gamma * base^(gamma - 1)` for gamma >= 1.
            let (base, dlog) = if positive { (q, -p) } else { (p, q) };
            let modulating = pow_gamma(base, g);
            let dmod = g * modulating * dlog;
            let af = if positive {
                self.alpha
            } else {
                1.0 - self.alpha
            };
            let loss = af * modulating * ce;
            let grad = af * (dmod * ce + modulating * (p - ts));
            (loss * self.inv_n, grad * self.inv_n)
        }
    }
}

/// `base^gamma` with the common exponents done without `powf`.
#[inline]
fn pow_gamma(base: f64, gamma: f64) -> f64 {
    if gamma == 1.5 {
        base * base.sqrt()
    } else if gamma == 0.5 {
        base.sqrt()
    } else if gamma == 1.0 {
        base
    } else if gamma == 2.0 {
        base * base
    } else {
        base.powf(gamma)
    }
}

/// effdet's `DetectionLoss` for a batch, with the gradient of the total loss.
///
/// `outputs[b][l]` is image `b`'s raw head output at level `l` (`class` `[A * K, H, W]`, `boxes`
/// `[A * 4, H, W]`, i.e. one image's slice of the network's `[B, C, H, W]` outputs); `targets[b]`
/// are that image's targets (from [`super::labeler::AnchorLabeler::label`] or precomputed).
/// The gradients come back per level in the batch layout `[B, C, H, W]`.
///
/// Errors ([`Error::InvalidArgument`]): an empty batch, different numbers of images or levels,
/// any length or feature size that does not match, images with different level shapes, a class
/// target outside `-2..K`, an invalid config. Non-finite outputs are not errors: any of them,
/// masked or not, makes the loss non-finite, as in effdet (what dynamic loss scaling looks for).
pub fn detection_loss(
    outputs: &[Vec<LevelOutput<'_>>],
    targets: &[LevelTargets],
    cfg: &DetectionLoss,
) -> Result<LossOutput> {
    let e = evaluate(outputs, targets, cfg)?;
    Ok(LossOutput {
        loss: e.total() as f32,
        class_loss: e.class_loss as f32,
        box_loss: e.box_loss as f32,
        num_positives: e.num_positives as f32,
        grads: e.grads,
    })
}

/// The loss terms in f64 (before the final rounding) and the gradients.
struct Evaluated {
    class_loss: f64,
    box_loss: f64,
    box_loss_weight: f64,
    num_positives: usize,
    grads: Vec<LevelGrads>,
}

impl Evaluated {
    fn total(&self) -> f64 {
        self.class_loss + self.box_loss_weight * self.box_loss
    }
}

fn evaluate(
    outputs: &[Vec<LevelOutput<'_>>],
    targets: &[LevelTargets],
    cfg: &DetectionLoss,
) -> Result<Evaluated> {
    cfg.validate()?;
    let bad = |msg: String| Err(Error::InvalidArgument(format!("detection loss: {msg}")));
    if outputs.is_empty() {
        return bad("empty batch".into());
    }
    if outputs.len() != targets.len() {
        return bad(format!(
            "{} images of outputs but {} of targets",
            outputs.len(),
            targets.len()
        ));
    }
    let k = cfg.num_classes;
    let first = &targets[0];
    let a = first.anchors_per_location;
    let levels = first.feat_sizes.clone();
    for (b, (out, tgt)) in outputs.iter().zip(targets).enumerate() {
        tgt.check_shapes()
            .map_err(|e| Error::InvalidArgument(format!("detection loss: image {b}: {e}")))?;
        if tgt.feat_sizes != levels || tgt.anchors_per_location != a {
            return bad(format!(
                "image {b}: targets for levels {:?} x {} anchors, image 0 has {levels:?} x {a}",
                tgt.feat_sizes, tgt.anchors_per_location
            ));
        }
        if out.len() != levels.len() {
            return bad(format!(
                "image {b}: {} output levels but {} target levels",
                out.len(),
                levels.len()
            ));
        }
        for (l, (o, &(h, w))) in out.iter().zip(&levels).enumerate() {
            let class_len = product(&[a, k, h, w], "class output")?;
            let box_len = product(&[a, 4, h, w], "box output")?;
            if o.height != h || o.width != w {
                return bad(format!(
                    "image {b} level {l}: output is {}x{}, targets are {h}x{w}",
                    o.height, o.width
                ));
            }
            if o.class.len() != class_len || o.boxes.len() != box_len {
                return bad(format!(
                    "image {b} level {l}: class output has {} values and box output {}, \
                     expected {class_len} ([{a} * {k}, {h}, {w}]) and {box_len} ([{}, {h}, {w}])",
                    o.class.len(),
                    o.boxes.len(),
                    a * 4
                ));
            }
            if let Some(&c) = tgt.cls[l].iter().find(|&&c| c < IGNORE || c >= k as i32) {
                return bad(format!(
                    "image {b} level {l}: class target {c} is outside -2..{k}"
                ));
            }
        }
    }

    let num_positives: usize = targets.iter().map(|t| t.num_positives).sum();
    // effdet: (num_positives.sum() + 1.0).float(), a float32 count.
    let normalizer = (num_positives as f32 + 1.0) as f64;
    let focal = Focal {
        alpha: cfg.alpha as f64,
        gamma: cfg.gamma as f64,
        smoothing: cfg.label_smoothing as f64,
        legacy: cfg.legacy_focal,
        inv_n: 1.0 / normalizer,
    };
    let delta = cfg.delta as f64;
    let box_weight = cfg.box_loss_weight as f64;
    let box_scale = 1.0 / (normalizer * 4.0);

    let mut class_loss = 0f64;
    let mut box_loss = 0f64;
    let mut grads = Vec::with_capacity(levels.len());
    for (l, &(h, w)) in levels.iter().enumerate() {
        let hw = h * w;
        let mut class_grad = vec![0f32; outputs.len() * a * k * hw];
        let mut box_grad = vec![0f32; outputs.len() * a * 4 * hw];
        if hw > 0 {
            // One task per (image, channel) plane; plane index = b * C + c.
            let class_sums: Vec<f64> = class_grad
                .par_chunks_mut(hw)
                .enumerate()
                .with_min_len(4)
                .map(|(plane, g)| {
                    let (b, c) = (plane / (a * k), plane % (a * k));
                    let (anchor, class) = (c / k, (c % k) as i32);
                    let x = &outputs[b][l].class[c * hw..(c + 1) * hw];
                    let cls = &targets[b].cls[l];
                    let mut sum = 0f64;
                    for (p, (gv, &xv)) in g.iter_mut().zip(x).enumerate() {
                        let target = cls[p * a + anchor];
                        if target == IGNORE {
                            // effdet multiplies the element loss by 0: finite stays 0, a
                            // non-finite logit still makes the loss NaN.
                            if !xv.is_finite() {
                                sum += f64::NAN;
                                *gv = if xv.is_nan() { f32::NAN } else { 0.0 };
                            }
                            continue;
                        }
                        let (lv, gr) = focal.eval(xv as f64, target == class);
                        sum += lv;
                        *gv = gr as f32;
                    }
                    sum
                })
                .collect();
            class_loss += class_sums.iter().sum::<f64>();

            let box_sums: Vec<f64> = box_grad
                .par_chunks_mut(hw)
                .enumerate()
                .with_min_len(4)
                .map(|(plane, g)| {
                    let (b, c) = (plane / (a * 4), plane % (a * 4));
                    let y = &outputs[b][l].boxes[c * hw..(c + 1) * hw];
                    let tb = &targets[b].boxes[l];
                    let mut sum = 0f64;
                    for (p, (gv, &yv)) in g.iter_mut().zip(y).enumerate() {
                        let target = tb[p * a * 4 + c];
                        if target == 0.0 {
                            // Masked (weight 0) as in effdet, where a non-finite output still
                            // turns the loss into NaN.
                            if !yv.is_finite() {
                                sum += f64::NAN;
                                *gv = if yv.is_nan() { f32::NAN } else { 0.0 };
                            }
                            continue;
                        }
                        let err = yv as f64 - target as f64;
                        let q = err.abs().min(delta);
                        sum += 0.5 * q * q + delta * (err.abs() - q);
                        *gv = (box_weight * err.clamp(-delta, delta) * box_scale) as f32;
                    }
                    sum
                })
                .collect();
            box_loss += box_sums.iter().sum::<f64>();
        }
        grads.push(LevelGrads {
            class: class_grad,
            boxes: box_grad,
            height: h,
            width: w,
        });
    }
    Ok(Evaluated {
        class_loss,
        box_loss: box_loss * box_scale,
        box_loss_weight: box_weight,
        num_positives,
        grads,
    })
}

/// [`detection_loss`] for per-level batch tensors: `class[l]` is `[B, A * K, H, W]` and
/// `boxes[l]` is `[B, A * 4, H, W]` (the network's outputs as they come), `B = targets.len()`;
/// `H`, `W` and `A` are taken from the targets.
pub fn detection_loss_batched(
    class: &[&[f32]],
    boxes: &[&[f32]],
    targets: &[LevelTargets],
    cfg: &DetectionLoss,
) -> Result<LossOutput> {
    let outputs = split_batch(class, boxes, targets, cfg)?;
    detection_loss(&outputs, targets, cfg)
}

/// Per-level batch tensors -> per-image [`LevelOutput`]s (shapes from the targets).
fn split_batch<'a>(
    class: &[&'a [f32]],
    boxes: &[&'a [f32]],
    targets: &[LevelTargets],
    cfg: &DetectionLoss,
) -> Result<Vec<Vec<LevelOutput<'a>>>> {
    let bad = |msg: String| Err(Error::InvalidArgument(format!("detection loss: {msg}")));
    let Some(first) = targets.first() else {
        return bad("empty batch".into());
    };
    cfg.validate()?;
    first
        .check_shapes()
        .map_err(|e| Error::InvalidArgument(format!("detection loss: image 0: {e}")))?;
    let levels = &first.feat_sizes;
    if class.len() != levels.len() || boxes.len() != levels.len() {
        return bad(format!(
            "{} class and {} box output levels for {} target levels",
            class.len(),
            boxes.len(),
            levels.len()
        ));
    }
    let batch = targets.len();
    let a = first.anchors_per_location;
    let k = cfg.num_classes;
    let mut outputs: Vec<Vec<LevelOutput<'a>>> = vec![Vec::with_capacity(levels.len()); batch];
    for (l, (&(h, w), (c, bx))) in levels.iter().zip(class.iter().zip(boxes)).enumerate() {
        let cn = product(&[a, k, h, w], "class output")?;
        let bn = product(&[a, 4, h, w], "box output")?;
        let (class_len, box_len) = (product(&[batch, cn], "class output")?, batch * bn);
        if c.len() != class_len || bx.len() != box_len {
            return bad(format!(
                "level {l}: class output has {} values and box output {}, expected \
                 {class_len} ([{batch}, {a} * {k}, {h}, {w}]) and {box_len} ([{batch}, {}, {h}, \
                 {w}])",
                c.len(),
                bx.len(),
                a * 4
            ));
        }
        for (b, out) in outputs.iter_mut().enumerate() {
            out.push(LevelOutput {
                class: &c[b * cn..(b + 1) * cn],
                boxes: &bx[b * bn..(b + 1) * bn],
                height: h,
                width: w,
            });
        }
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postprocess::{AnchorConfig, Anchors};
    use crate::train::labeler::AnchorLabeler;

    /// Tiny deterministic pseudo-random generator (xorshift) for test inputs.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 24) as f32
        }
        fn normal(&mut self, mean: f32, std: f32) -> f32 {
            // Sum of 4 uniforms: mean 2, variance 1/3.
            let s: f32 = (0..4).map(|_| self.next()).sum();
            mean + std * (s - 2.0) * 3f32.sqrt()
        }
    }

    /// A tiny problem: per-level batch outputs, targets, and the number of classes.
    struct Tiny {
        class: Vec<Vec<f32>>,
        boxes: Vec<Vec<f32>>,
        targets: Vec<LevelTargets>,
        k: usize,
    }

    /// 32x32 input (levels 4, 2, 1, 1, 1), 3 classes, 2 images.
    fn tiny() -> Tiny {
        let anchors = Anchors::new(&AnchorConfig::d0().with_image_size(32, 32)).unwrap();
        let k = 3;
        let labeler = AnchorLabeler::new(&anchors, k, 0.5).unwrap();
        let t0 = labeler
            .label(&[[2.0, 3.0, 20.0, 17.0], [10.0, 12.0, 30.0, 31.0]], &[1, 3])
            .unwrap();
        let mut t1 = labeler.label(&[[0.0, 0.0, 5.0, 6.0]], &[2]).unwrap();
        // Exercise the ignore mask as well.
        t1.cls[0][3] = IGNORE;
        t1.cls[0][7] = IGNORE;
        let targets = vec![t0, t1];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let a = anchors.anchors_per_location();
        let mut class = Vec::new();
        let mut boxes = Vec::new();
        for &(h, w) in anchors.feat_sizes() {
            class.push(
                (0..2 * a * k * h * w)
                    .map(|_| rng.normal(-1.0, 2.0))
                    .collect(),
            );
            boxes.push(
                (0..2 * a * 4 * h * w)
                    .map(|_| rng.normal(0.0, 0.3))
                    .collect(),
            );
        }
        Tiny {
            class,
            boxes,
            targets,
            k,
        }
    }

    /// The total loss in f64, before rounding to f32.
    fn total(
        class: &[Vec<f32>],
        boxes: &[Vec<f32>],
        t: &[LevelTargets],
        cfg: &DetectionLoss,
    ) -> f64 {
        let c: Vec<&[f32]> = class.iter().map(|v| v.as_slice()).collect();
        let b: Vec<&[f32]> = boxes.iter().map(|v| v.as_slice()).collect();
        let outputs = split_batch(&c, &b, t, cfg).unwrap();
        evaluate(&outputs, t, cfg).unwrap().total()
    }

    fn check_gradients(cfg: &DetectionLoss) {
        let Tiny {
            mut class,
            mut boxes,
            targets,
            k,
        } = tiny();
        let cfg = cfg.clone().with_num_classes(k);
        let c: Vec<&[f32]> = class.iter().map(|v| v.as_slice()).collect();
        let b: Vec<&[f32]> = boxes.iter().map(|v| v.as_slice()).collect();
        let out = detection_loss_batched(&c, &b, &targets, &cfg).unwrap();
        assert!(out.num_positives > 0.0);
        let step = 1e-3f32;
        let mut worst = 0f64;
        for l in 0..class.len() {
            for which in 0..2 {
                let n = if which == 0 {
                    class[l].len()
                } else {
                    boxes[l].len()
                };
                // Every element of the small levels, a stride through the large ones.
                let stride = (n / 97).max(1);
                for i in (0..n).step_by(stride) {
                    let orig = if which == 0 { class[l][i] } else { boxes[l][i] };
                    if which == 1 {
                        // Skip codes within the step of the Huber kink |e| = delta, where the
                        // central difference is only first-order accurate.
                        let a = targets[0].anchors_per_location;
                        let (h, w) = targets[0].feat_sizes[l];
                        let per_image = a * 4 * h * w;
                        let (img, rest) = (i / per_image, i % per_image);
                        let (c, p) = (rest / (h * w), rest % (h * w));
                        let target = targets[img].boxes[l][p * a * 4 + c];
                        let e = (orig - target).abs();
                        if target != 0.0 && (e - cfg.delta).abs() < 4.0 * step {
                            continue;
                        }
                    }
                    let set = |class: &mut Vec<Vec<f32>>, boxes: &mut Vec<Vec<f32>>, v: f32| {
                        if which == 0 {
                            class[l][i] = v;
                        } else {
                            boxes[l][i] = v;
                        }
                    };
                    let (xp, xm) = (orig + step, orig - step);
                    set(&mut class, &mut boxes, xp);
                    let lp = total(&class, &boxes, &targets, &cfg);
                    set(&mut class, &mut boxes, xm);
                    let lm = total(&class, &boxes, &targets, &cfg);
                    set(&mut class, &mut boxes, orig);
                    let fd = (lp - lm) / (xp as f64 - xm as f64);
                    let g = if which == 0 {
                        out.grads[l].class[i]
                    } else {
                        out.grads[l].boxes[i]
                    } as f64;
                    let err = (fd - g).abs() / g.abs().max(1e-4);
                    worst = worst.max(err);
                }
            }
        }
        assert!(worst < 1e-4, "worst relative gradient error {worst}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        check_gradients(&DetectionLoss::d0());
    }

    #[test]
    fn gradients_match_finite_differences_legacy_and_smoothing() {
        check_gradients(&DetectionLoss {
            legacy_focal: true,
            ..DetectionLoss::d0()
        });
        check_gradients(&DetectionLoss {
            label_smoothing: 0.1,
            gamma: 1.7,
            ..DetectionLoss::d0()
        });
        check_gradients(&DetectionLoss {
            gamma: 2.0,
            alpha: 0.4,
            ..DetectionLoss::d0()
        });
    }

    #[test]
    fn shape_errors() {
        let Tiny {
            class,
            boxes,
            targets,
            k,
        } = tiny();
        let cfg = DetectionLoss::d0().with_num_classes(k);
        let c: Vec<&[f32]> = class.iter().map(|v| v.as_slice()).collect();
        let b: Vec<&[f32]> = boxes.iter().map(|v| v.as_slice()).collect();
        assert!(detection_loss_batched(&c, &b, &targets, &cfg).is_ok());
        let short = &class[0][..class[0].len() - 1];
        let mut c2 = c.clone();
        c2[0] = short;
        assert!(matches!(
            detection_loss_batched(&c2, &b, &targets, &cfg),
            Err(Error::InvalidArgument(_))
        ));
        assert!(detection_loss_batched(&c[..2], &b, &targets, &cfg).is_err());
        assert!(detection_loss_batched(&c, &b, &targets[..1], &cfg).is_err());
        assert!(detection_loss_batched(&c, &b, &[], &cfg).is_err());
        let wrong_k = DetectionLoss::d0().with_num_classes(k + 1);
        assert!(detection_loss_batched(&c, &b, &targets, &wrong_k).is_err());
        let mut bad_t = targets.clone();
        bad_t[1].cls[2][0] = k as i32;
        assert!(detection_loss_batched(&c, &b, &bad_t, &cfg).is_err());
        bad_t[1].cls[2][0] = -3;
        assert!(detection_loss_batched(&c, &b, &bad_t, &cfg).is_err());
        let mut bad_t = targets.clone();
        bad_t[0].boxes[1].pop();
        assert!(detection_loss_batched(&c, &b, &bad_t, &cfg).is_err());
        let zero = DetectionLoss::d0().with_num_classes(0);
        assert!(detection_loss_batched(&c, &b, &targets, &zero).is_err());
    }

    #[test]
    fn non_finite_outputs_give_non_finite_loss() {
        let Tiny {
            mut class,
            mut boxes,
            targets,
            k,
        } = tiny();
        let cfg = DetectionLoss::d0().with_num_classes(k);
        // A masked box code (target 0) and an ignored anchor's logit.
        let masked = (0..boxes[0].len() / 2)
            .find(|&i| {
                let (h, w) = targets[0].feat_sizes[0];
                let (c, p) = (i / (h * w), i % (h * w));
                targets[0].boxes[0][p * targets[0].anchors_per_location * 4 + c] == 0.0
            })
            .unwrap();
        boxes[0][masked] = f32::INFINITY;
        let c: Vec<&[f32]> = class.iter().map(|v| v.as_slice()).collect();
        let b: Vec<&[f32]> = boxes.iter().map(|v| v.as_slice()).collect();
        let out = detection_loss_batched(&c, &b, &targets, &cfg).unwrap();
        assert!(out.loss.is_nan() && out.box_loss.is_nan() && out.class_loss.is_finite());
        boxes[0][masked] = 0.0;
        // Image 1, level 0, position 0, anchor 3 is ignored (see `tiny`): channel 3 * k.
        let (h, w) = targets[1].feat_sizes[0];
        let a = targets[1].anchors_per_location;
        class[0][a * k * h * w + 3 * k * h * w] = f32::NAN;
        let c: Vec<&[f32]> = class.iter().map(|v| v.as_slice()).collect();
        let b: Vec<&[f32]> = boxes.iter().map(|v| v.as_slice()).collect();
        let out = detection_loss_batched(&c, &b, &targets, &cfg).unwrap();
        assert!(out.loss.is_nan() && out.class_loss.is_nan() && out.box_loss.is_finite());
    }

    #[test]
    fn no_positives_is_finite() {
        let anchors = Anchors::new(&AnchorConfig::d0().with_image_size(32, 32)).unwrap();
        let labeler = AnchorLabeler::new(&anchors, 2, 0.5).unwrap();
        let t = labeler.label(&[], &[]).unwrap();
        let a = anchors.anchors_per_location();
        let class: Vec<Vec<f32>> = anchors
            .feat_sizes()
            .iter()
            .map(|&(h, w)| vec![-2.0; a * 2 * h * w])
            .collect();
        let boxes: Vec<Vec<f32>> = anchors
            .feat_sizes()
            .iter()
            .map(|&(h, w)| vec![0.5; a * 4 * h * w])
            .collect();
        let c: Vec<&[f32]> = class.iter().map(|v| v.as_slice()).collect();
        let b: Vec<&[f32]> = boxes.iter().map(|v| v.as_slice()).collect();
        let out =
            detection_loss_batched(&c, &b, &[t], &DetectionLoss::d0().with_num_classes(2)).unwrap();
        assert_eq!(out.num_positives, 0.0);
        assert_eq!(out.box_loss, 0.0);
        assert!(out.class_loss.is_finite() && out.class_loss > 0.0);
        assert!(out.grads.iter().all(|g| g.boxes.iter().all(|&v| v == 0.0)));
        // Element loss of a negative at x = -2: 0.75 * sigmoid(-2)^1.5 * softplus(-2) / 1.
        let p = 1.0 / (1.0 + 2f64.exp());
        let elem = 0.75 * p.powf(1.5) * (1.0 + (-2f64).exp()).ln();
        let count: usize = class.iter().map(|v| v.len()).sum();
        let expected = elem * count as f64;
        assert!((out.class_loss as f64 - expected).abs() <= 1e-6 * expected);
    }
}
