//! The training core's optimizer side against torch / timm: SGD and AdamW with timm's
//! weight-decay groups and gradient clipping, the cosine LR schedule, the weight EMA, dynamic
//! loss scaling, and the data-parallel pieces (thread ranks, sharding, launcher environment).
//!
//! Fixtures in tests/fixtures/train/optim/ come from tools/make_optim_fixtures.py.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use effdet::compute::Tensor;
use effdet::train::dist::{
    Communicator, DistError, LaunchEnv, Launcher, SingleProcess, ThreadGroup, average_gradients,
    broadcast_params, shard_indices, torch_randperm,
};
use effdet::train::ema::{BufferPolicy, EmaConfig, EmaDecay, ModelEma, is_bn_buffer};
use effdet::train::optim::{
    AdamW, LossScaler, Optimizer, Param, ParamSet, Sgd, applies_weight_decay, clip_grad_norm,
    deserialize_tensors, load_tensors, save_tensors, serialize_tensors,
};
use effdet::train::schedule::{CosineSchedule, ScheduleConfig, StepOn, linear_scaled_lr};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

// ------------------------------------------------------------------------------------------------
// Fixture access
// ------------------------------------------------------------------------------------------------

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/train/optim")
        .join(name)
}

struct Fx {
    tensors: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
    meta: Value,
}

impl Fx {
    fn load() -> Fx {
        let bytes = std::fs::read(fixture("optim.safetensors")).expect("fixture readable");
        let st = SafeTensors::deserialize(&bytes).expect("fixture parses");
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
            .collect();
        let text = std::fs::read_to_string(fixture("meta.json")).expect("meta readable");
        let meta = serde_json::from_str(&text).expect("meta parses");
        Fx { tensors, meta }
    }

    fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    fn f32(&self, key: &str) -> Tensor {
        let (dtype, shape, bytes) = self.tensors.get(key).unwrap_or_else(|| panic!("no {key}"));
        assert_eq!(*dtype, Dtype::F32, "{key}");
        let data = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        Tensor::new(shape.clone(), data).unwrap()
    }

    fn f64s(&self, key: &str) -> Vec<f64> {
        let (dtype, _, bytes) = self.tensors.get(key).unwrap_or_else(|| panic!("no {key}"));
        assert_eq!(*dtype, Dtype::F64, "{key}");
        bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn i64s(&self, key: &str) -> Vec<i64> {
        let (dtype, _, bytes) = self.tensors.get(key).unwrap_or_else(|| panic!("no {key}"));
        assert_eq!(*dtype, Dtype::I64, "{key}");
        bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn param_names(&self) -> Vec<String> {
        self.meta["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn f64_list(&self, path: &[&str]) -> Vec<f64> {
        let mut v = &self.meta;
        for p in path {
            v = &v[*p];
        }
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    }
}

/// Asserts `got` ~ `want` within `rel` relative to the tensor's scale (its largest magnitude;
/// element-wise relative error is meaningless where a result cancels to near zero) and returns
/// how many elements are bit-identical.
fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) -> usize {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let tol = rel * scale + 1e-12;
    let mut exact = 0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g.to_bits() == w.to_bits() {
            exact += 1;
            continue;
        }
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g:e}, torch {w:e} (diff {:e}, tensor scale {scale:e})",
            (g - w).abs()
        );
    }
    exact
}

fn initial_params(fx: &Fx) -> ParamSet {
    ParamSet::from_named(fx.param_names().into_iter().map(|n| {
        let v = fx.f32(&format!("init.{n}"));
        (n, v)
    }))
    .unwrap()
}

fn set_grads(fx: &Fx, params: &mut ParamSet, step: usize) {
    for p in params.iter_mut() {
        let key = format!("grad.{step}.{}", p.name);
        p.grad = if fx.has(&key) {
            Some(fx.f32(&key))
        } else {
            None
        };
    }
}

// ------------------------------------------------------------------------------------------------
// Weight-decay groups, SGD, AdamW, clipping
// ------------------------------------------------------------------------------------------------

#[test]
fn decay_rule_matches_timm_param_groups() {
    let fx = Fx::load();
    for p in fx.meta["params"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let shape: Vec<usize> = p["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(
            applies_weight_decay(name, &shape),
            p["decay"].as_bool().unwrap(),
            "{name} {shape:?}"
        );
    }
    // effdet's own keys.
    assert!(applies_weight_decay(
        "class_net.predict.conv_pw.weight",
        &[810, 64, 1, 1]
    ));
    assert!(!applies_weight_decay(
        "class_net.predict.conv_pw.bias",
        &[810]
    ));
    assert!(!applies_weight_decay(
        "class_net.bn_rep.2.4.bn.weight",
        &[64]
    ));
    assert!(!applies_weight_decay(
        "fpn.cell.0.fnode.4.combine.edge_weights",
        &[3]
    ));
    // A 2-D tensor named bias is still excluded, as in timm.
    assert!(!applies_weight_decay("odd.bias", &[3, 3]));
}

/// Where the gradients an optimizer step sees come from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Grads {
    /// The raw fixture gradients clipped by `clip_grad_norm` (the whole pipeline).
    OursClipped,
    /// torch's clipped gradients (the optimizer arithmetic alone).
    TorchClipped,
}

/// Runs the fixture's three clipped steps with `opt` and checks every value, the optimizer state
/// named `state_suffixes`, and the clip norms against torch. Returns (bit-identical, total)
/// counts of parameter and state values.
fn run_against_torch(
    fx: &Fx,
    tag: &str,
    opt: &mut dyn Optimizer,
    lrs: &[f64],
    state_suffixes: &[&str],
    grads: Grads,
) -> (usize, usize) {
    let max_norm = fx.meta["max_norm"].as_f64().unwrap() as f32;
    let mut params = initial_params(fx);
    let norms = fx.f32(&format!("{tag}.total_norm"));
    let (mut exact, mut total) = (0, 0);
    for (step, &lr) in lrs.iter().enumerate() {
        set_grads(fx, &mut params, step);
        let norm = clip_grad_norm(&mut params, max_norm);
        assert_close(
            &format!("{tag} step {step} total norm"),
            &[norm],
            &[norms.data()[step]],
            1e-6,
        );
        for p in params.iter_mut() {
            let key = format!("clipped.{step}.{}", p.name);
            assert_eq!(p.grad.is_some(), fx.has(&key), "{key}");
            if let Some(g) = &p.grad {
                let want = fx.f32(&key);
                assert_close(&key, g.data(), want.data(), 1e-6);
                if grads == Grads::TorchClipped {
                    p.grad = Some(want);
                }
            }
        }
        opt.set_lr(lr);
        opt.step(&mut params).unwrap();
        let state = opt.state_dict();
        for p in params.iter() {
            let want = fx.f32(&format!("{tag}.{step}.{}", p.name));
            exact += assert_close(
                &format!("{tag} step {step} {}", p.name),
                p.value.data(),
                want.data(),
                1e-6,
            );
            total += want.len();
            for suffix in state_suffixes {
                let key = format!("{}.{suffix}", p.name);
                let fkey = format!("{tag}.{step}.{key}");
                match (state.get(&key), fx.has(&fkey)) {
                    (Some(got), true) => {
                        let want = fx.f32(&fkey);
                        assert_eq!(got.shape(), want.shape(), "{fkey}");
                        exact += assert_close(&fkey, got.data(), want.data(), 1e-6);
                        total += want.len();
                    }
                    (None, false) => {}
                    (got, has) => panic!("{fkey}: ours present {}, torch {has}", got.is_some()),
                }
            }
        }
    }
    (exact, total)
}

#[test]
fn sgd_with_clipping_matches_torch() {
    let fx = Fx::load();
    let lrs = fx.f64_list(&["sgd", "lrs"]);
    let wd = fx.meta["sgd"]["weight_decay"].as_f64().unwrap();
    for (tag, nesterov) in [("sgd", false), ("sgd_nesterov", true)] {
        for grads in [Grads::OursClipped, Grads::TorchClipped] {
            let mut opt = Sgd::new(lrs[0], wd);
            opt.nesterov = nesterov;
            assert_eq!(opt.momentum, 0.9);
            let (exact, total) =
                run_against_torch(&fx, tag, &mut opt, &lrs, &[Sgd::MOMENTUM_BUFFER], grads);
            eprintln!("{tag} ({grads:?}): {exact}/{total} values bit-identical to torch");
            // Given torch's clipped gradients, the SGD arithmetic is torch's to the bit; from
            // the raw gradients our clip norm (f64 accumulation) may differ from torch's f32
            // reduction by an ulp, which the tolerance absorbs.
            if grads == Grads::TorchClipped {
                assert_eq!(exact, total, "{tag}: SGD must be bit-identical to torch");
            }
        }
    }
}

#[test]
fn sgd_skips_params_without_grad_and_keeps_their_momentum() {
    let fx = Fx::load();
    let skipped = fx.meta["no_grad"][0]["name"].as_str().unwrap().to_string();
    let mut params = initial_params(&fx);
    let mut opt = Sgd::new(0.1, 0.01);
    set_grads(&fx, &mut params, 0);
    opt.step(&mut params).unwrap();
    let before_value = params.get(&skipped).unwrap().value.clone();
    let before_buf = opt.momentum_buffer(&skipped).unwrap().clone();
    set_grads(&fx, &mut params, 1);
    assert!(params.get(&skipped).unwrap().grad.is_none());
    opt.step(&mut params).unwrap();
    assert_eq!(params.get(&skipped).unwrap().value, before_value);
    assert_eq!(opt.momentum_buffer(&skipped).unwrap(), &before_buf);
}

#[test]
fn adamw_with_clipping_matches_torch() {
    let fx = Fx::load();
    let lrs = fx.f64_list(&["adamw", "lrs"]);
    let wd = fx.meta["adamw"]["weight_decay"].as_f64().unwrap();
    let mut opt = AdamW::new(lrs[0], wd);
    for grads in [Grads::OursClipped, Grads::TorchClipped] {
        opt = AdamW::new(lrs[0], wd);
        let (exact, total) = run_against_torch(
            &fx,
            "adamw",
            &mut opt,
            &lrs,
            &[AdamW::EXP_AVG, AdamW::EXP_AVG_SQ, AdamW::STEP],
            grads,
        );
        eprintln!("adamw ({grads:?}): {exact}/{total} values bit-identical to torch");
    }
    // The parameter without a gradient in step 2 took two steps, the others three.
    let skipped = fx.meta["no_grad"][0]["name"].as_str().unwrap();
    assert_eq!(opt.step_count(skipped), Some(2));
    assert_eq!(opt.step_count("backbone.bn1.bias"), Some(3));
}

/// Three steps straight vs two steps, save, restore into a fresh optimizer through a
/// safetensors file, third step: bit-identical.
fn resume_is_exact(make: &dyn Fn() -> Box<dyn Optimizer>) {
    let fx = Fx::load();
    let lrs = [0.05, 0.04, 0.03];
    let mut straight = initial_params(&fx);
    let mut opt = make();
    for (step, &lr) in lrs.iter().enumerate() {
        set_grads(&fx, &mut straight, step);
        clip_grad_norm(&mut straight, 10.0);
        opt.set_lr(lr);
        opt.step(&mut straight).unwrap();
    }

    let mut resumed = initial_params(&fx);
    let mut opt = make();
    for (step, &lr) in lrs.iter().enumerate().take(2) {
        set_grads(&fx, &mut resumed, step);
        clip_grad_norm(&mut resumed, 10.0);
        opt.set_lr(lr);
        opt.step(&mut resumed).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    save_tensors(&path, &opt.state_dict()).unwrap();
    let mut opt = make();
    opt.load_state_dict(&resumed, &load_tensors(&path).unwrap())
        .unwrap();
    set_grads(&fx, &mut resumed, 2);
    clip_grad_norm(&mut resumed, 10.0);
    opt.set_lr(lrs[2]);
    opt.step(&mut resumed).unwrap();
    assert_eq!(straight, resumed);
}

#[test]
fn optimizer_state_resumes_bit_exactly() {
    resume_is_exact(&|| Box::new(Sgd::effdet(0.1)));
    resume_is_exact(&|| Box::new(AdamW::new(1e-3, 0.05)));
}

#[test]
fn optimizer_state_names_and_load_errors() {
    let fx = Fx::load();
    let mut params = initial_params(&fx);
    let mut sgd = Sgd::effdet(0.1);
    set_grads(&fx, &mut params, 0);
    sgd.step(&mut params).unwrap();
    let state = sgd.state_dict();
    assert!(state.contains_key("backbone.conv_stem.weight.momentum_buffer"));
    assert_eq!(state.len(), params.len());

    let mut adam = AdamW::new(1e-3, 0.0);
    adam.step(&mut params).unwrap();
    let astate = adam.state_dict();
    assert_eq!(astate["backbone.bn1.bias.step"].data(), &[1.0]);
    assert_eq!(astate["backbone.bn1.bias.step"].shape(), &[] as &[usize]);
    assert_eq!(astate.len(), 3 * params.len());

    // Unknown parameter, unknown suffix, wrong shape, incomplete AdamW state: all rejected.
    let mut bad = state.clone();
    bad.insert("nope.weight.momentum_buffer".into(), Tensor::zeros(vec![1]));
    let e = Sgd::effdet(0.1).load_state_dict(&params, &bad).unwrap_err();
    assert!(e.to_string().contains("nope.weight.momentum_buffer"), "{e}");
    let mut bad = state.clone();
    bad.insert("backbone.bn1.bias.exp_avg".into(), Tensor::zeros(vec![8]));
    assert!(Sgd::effdet(0.1).load_state_dict(&params, &bad).is_err());
    let mut bad = state.clone();
    bad.insert(
        "backbone.bn1.bias.momentum_buffer".into(),
        Tensor::zeros(vec![9]),
    );
    let e = Sgd::effdet(0.1).load_state_dict(&params, &bad).unwrap_err();
    assert!(e.to_string().contains("[9]"), "{e}");
    let mut bad = astate.clone();
    bad.remove("backbone.bn1.bias.exp_avg_sq");
    let e = AdamW::new(1e-3, 0.0)
        .load_state_dict(&params, &bad)
        .unwrap_err();
    assert!(e.to_string().contains("incomplete"), "{e}");
    let mut bad = astate.clone();
    bad.insert("backbone.bn1.bias.step".into(), Tensor::zeros(vec![2]));
    assert!(
        AdamW::new(1e-3, 0.0)
            .load_state_dict(&params, &bad)
            .is_err()
    );

    // Duplicate names and wrong gradient shapes are refused before anything changes.
    let dup = vec![
        Param::new("a.weight", Tensor::zeros(vec![2, 2])),
        Param::new("a.weight", Tensor::zeros(vec![2, 2])),
    ];
    assert!(ParamSet::new(dup.clone()).is_err());
    let mut dup = dup;
    assert!(Sgd::effdet(0.1).step(&mut dup).is_err());
    let mut p = Param::new("a.weight", Tensor::zeros(vec![2, 2]));
    assert!(p.set_grad(Tensor::zeros(vec![4])).is_err());
    p.grad = Some(Tensor::zeros(vec![4]));
    let mut ps = vec![p];
    assert!(Sgd::effdet(0.1).step(&mut ps).is_err());
}

#[test]
fn safetensors_state_roundtrip_and_errors() {
    let mut m = BTreeMap::new();
    m.insert(
        "a.step".to_string(),
        Tensor::new(vec![], vec![3.0]).unwrap(),
    );
    m.insert(
        "b.exp_avg".to_string(),
        Tensor::new(vec![2, 3], (0..6).map(|x| x as f32 * 0.5).collect()).unwrap(),
    );
    let bytes = serialize_tensors(&m).unwrap();
    assert_eq!(deserialize_tensors("mem", &bytes).unwrap(), m);
    let e = deserialize_tensors("broken.safetensors", &bytes[..10]).unwrap_err();
    assert!(e.to_string().contains("broken.safetensors"), "{e}");
    let e = load_tensors("/nonexistent/state.safetensors").unwrap_err();
    assert!(
        e.to_string().contains("/nonexistent/state.safetensors"),
        "{e}"
    );
}

#[test]
fn clip_grad_norm_semantics() {
    let mut ps = vec![
        Param::new("a.weight", Tensor::new(vec![2, 1], vec![0.0, 0.0]).unwrap()),
        Param::new("b.bias", Tensor::new(vec![1], vec![0.0]).unwrap()),
        Param::new("c.weight", Tensor::new(vec![1, 1], vec![0.0]).unwrap()),
    ];
    ps[0].grad = Some(Tensor::new(vec![2, 1], vec![3.0, 0.0]).unwrap());
    ps[1].grad = Some(Tensor::new(vec![1], vec![4.0]).unwrap());
    // Below the limit: untouched.
    let n = clip_grad_norm(&mut ps, 10.0);
    assert_eq!(n, 5.0);
    assert_eq!(ps[0].grad.as_ref().unwrap().data(), &[3.0, 0.0]);
    // Above: scaled by max / (norm + 1e-6) in f32.
    let n = clip_grad_norm(&mut ps, 1.0);
    assert_eq!(n, 5.0);
    let coef = 1.0f32 / (5.0 + 1e-6);
    assert_eq!(ps[0].grad.as_ref().unwrap().data(), &[3.0 * coef, 0.0]);
    assert_eq!(ps[1].grad.as_ref().unwrap().data(), &[4.0 * coef]);
    assert!(ps[2].grad.is_none());
    // A NaN gradient makes every gradient NaN, as in torch.
    ps[1].grad = Some(Tensor::new(vec![1], vec![f32::NAN]).unwrap());
    assert!(clip_grad_norm(&mut ps, 1.0).is_nan());
    assert!(ps[0].grad.as_ref().unwrap().data()[0].is_nan());
}

// ------------------------------------------------------------------------------------------------
// Loss scaling
// ------------------------------------------------------------------------------------------------

#[test]
fn loss_scaler_matches_torch_grad_scaler() {
    let fx = Fx::load();
    let m = &fx.meta["scaler"];
    let mut scaler = LossScaler::with_config(
        m["init_scale"].as_f64().unwrap() as f32,
        m["growth_factor"].as_f64().unwrap() as f32,
        m["backoff_factor"].as_f64().unwrap() as f32,
        m["growth_interval"].as_u64().unwrap() as u32,
    )
    .unwrap();
    let mut opt = Sgd::new(m["lr"].as_f64().unwrap(), 0.0);
    let max_norm = m["max_norm"].as_f64().unwrap() as f32;
    let mut params = vec![Param::new("w", fx.f32("scaler.init.w"))];
    let norms = fx.f32("scaler.total_norm");
    let iterations = m["iterations"].as_u64().unwrap() as usize;
    for it in 0..iterations {
        let t = &m["trace"][it];
        assert_eq!(
            scaler.scale() as f64,
            t["scale_before"].as_f64().unwrap(),
            "it {it}"
        );
        // backward of scale * sum(w * c): grad = scale * c in f32.
        let c = fx.f32(&format!("scaler.{it}.c"));
        let grad: Vec<f32> = c.data().iter().map(|&x| scaler.scale() * x).collect();
        params[0].grad = Some(Tensor::new(vec![grad.len()], grad).unwrap());
        let finite = scaler.unscale_and_check(&mut params).unwrap();
        let norm = clip_grad_norm(&mut params, max_norm);
        let want_norm = norms.data()[it];
        assert!(
            norm.to_bits() == want_norm.to_bits()
                || (norm - want_norm).abs() <= 1e-6 * want_norm.abs(),
            "it {it}: norm {norm} vs torch {want_norm}"
        );
        let stepped = scaler.step(&mut opt, &mut params).unwrap();
        scaler.update().unwrap();
        assert_eq!(stepped, finite);
        assert_eq!(!stepped, t["skipped"].as_bool().unwrap(), "it {it}");
        assert_eq!(
            scaler.scale() as f64,
            t["scale_after"].as_f64().unwrap(),
            "it {it}"
        );
        assert_eq!(
            scaler.growth_tracker() as u64,
            t["growth_tracker"].as_u64().unwrap(),
            "it {it}"
        );
        let want = fx.f32(&format!("scaler.{it}.w"));
        assert_close(
            &format!("scaler it {it} w"),
            params[0].value.data(),
            want.data(),
            1e-6,
        );
    }
}

#[test]
fn loss_scaler_semantics() {
    assert_eq!(LossScaler::default().scale(), 65536.0);
    assert_eq!(
        LossScaler::new(LossScaler::KERAS_INIT_SCALE).scale(),
        32768.0
    );
    assert_eq!(LossScaler::default().scale_loss(0.5), 32768.0);

    let mut s = LossScaler::with_config(8.0, 2.0, 0.5, 2).unwrap();
    let mut opt = Sgd::new(1.0, 0.0);
    opt.momentum = 0.0;
    let mut ps = vec![Param::new(
        "w",
        Tensor::new(vec![2], vec![1.0, 1.0]).unwrap(),
    )];
    let mut run = |s: &mut LossScaler, g: [f32; 2], ps: &mut Vec<Param>| {
        ps[0].grad = Some(Tensor::new(vec![2], g.to_vec()).unwrap());
        let stepped = s.step(&mut opt, ps).unwrap();
        s.update().unwrap();
        stepped
    };
    // Finite: step with unscaled grads (8 / 8 = 1), tracker 1.
    assert!(run(&mut s, [8.0, 16.0], &mut ps));
    assert_eq!(ps[0].value.data(), &[0.0, -1.0]);
    assert_eq!((s.scale(), s.growth_tracker()), (8.0, 1));
    // Second finite step: growth interval reached, scale doubles, tracker resets.
    assert!(run(&mut s, [0.0, 0.0], &mut ps));
    assert_eq!((s.scale(), s.growth_tracker()), (16.0, 0));
    // Overflow: skipped, parameters untouched, scale halves.
    assert!(!run(&mut s, [f32::INFINITY, 1.0], &mut ps));
    assert_eq!(ps[0].value.data(), &[0.0, -1.0]);
    assert_eq!((s.scale(), s.growth_tracker()), (8.0, 0));
    assert!(!run(&mut s, [f32::NAN, 1.0], &mut ps));
    assert_eq!(s.scale(), 4.0);

    // Growth never reaches infinity.
    let mut big = LossScaler::with_config(f32::MAX, 2.0, 0.5, 1).unwrap();
    assert!(run(&mut big, [1.0, 1.0], &mut ps));
    assert_eq!(big.scale(), f32::MAX);

    // Misuse is an error, as in torch.
    let mut s = LossScaler::default();
    assert!(s.update().is_err());
    s.unscale_and_check(&mut ps).unwrap();
    assert!(s.unscale_and_check(&mut ps).is_err());
    s.step(&mut opt, &mut ps).unwrap();
    assert!(s.step(&mut opt, &mut ps).is_err());
    assert!(s.unscale_and_check(&mut ps).is_err());
    s.update().unwrap();
    assert!(LossScaler::with_config(1.0, 1.0, 0.5, 10).is_err());
    assert!(LossScaler::with_config(1.0, 2.0, 1.0, 10).is_err());
    assert!(LossScaler::with_config(f32::INFINITY, 2.0, 0.5, 10).is_err());

    // Disabled: scale 1, no checks, always steps.
    let mut d = LossScaler::disabled();
    assert_eq!(d.scale(), 1.0);
    ps[0].grad = Some(Tensor::new(vec![2], vec![f32::NAN, 0.0]).unwrap());
    assert!(d.unscale_and_check(&mut ps).unwrap());
    assert!(d.step(&mut opt, &mut ps).unwrap());
    d.update().unwrap();

    // State round trip.
    let mut s = LossScaler::with_config(1024.0, 2.0, 0.5, 100).unwrap();
    ps[0].grad = Some(Tensor::new(vec![2], vec![1.0, 0.0]).unwrap());
    s.step(&mut opt, &mut ps).unwrap();
    s.update().unwrap();
    let state = s.state_dict();
    let mut r = LossScaler::with_config(1.0, 2.0, 0.5, 100).unwrap();
    r.load_state_dict(&state).unwrap();
    assert_eq!((r.scale(), r.growth_tracker()), (1024.0, 1));
    let mut bad = state.clone();
    bad.insert(
        LossScaler::STATE_SCALE.into(),
        Tensor::new(vec![1], vec![-1.0]).unwrap(),
    );
    assert!(r.load_state_dict(&bad).is_err());
}

// ------------------------------------------------------------------------------------------------
// LR schedule
// ------------------------------------------------------------------------------------------------

fn cosine_from_meta(cfg: &Value) -> CosineSchedule {
    CosineSchedule {
        base_lr: cfg["lr"].as_f64().unwrap(),
        min_lr: cfg["lr_min"].as_f64().unwrap(),
        t_initial: cfg["t_initial"].as_u64().unwrap(),
        warmup_t: cfg["warmup_t"].as_u64().unwrap(),
        warmup_lr_init: cfg["warmup_lr_init"].as_f64().unwrap(),
        warmup_prefix: cfg
            .get("warmup_prefix")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        cycle_mul: cfg.get("cycle_mul").and_then(Value::as_f64).unwrap_or(1.0),
        cycle_decay: cfg
            .get("cycle_decay")
            .and_then(Value::as_f64)
            .unwrap_or(1.0),
        cycle_limit: cfg.get("cycle_limit").and_then(Value::as_u64).unwrap_or(1) as u32,
        k_decay: cfg.get("k_decay").and_then(Value::as_f64).unwrap_or(1.0),
    }
}

#[test]
fn cosine_schedule_equals_timm_bit_for_bit() {
    let fx = Fx::load();
    for name in ["recipe", "trainpy", "odd", "odd2"] {
        let cfg = &fx.meta["sched"][name];
        let sched = cosine_from_meta(cfg);
        sched.validate().unwrap();
        let steps = fx.i64s(&format!("sched.{name}.steps"));
        let lrs = fx.f64s(&format!("sched.{name}.lr"));
        assert_eq!(
            sched.lr_at(0).to_bits(),
            cfg["initial_lr"].as_f64().unwrap().to_bits(),
            "{name}: initial"
        );
        for (&t, &want) in steps.iter().zip(&lrs) {
            let got = sched.lr_at(t as u64);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{name} t={t}: {got} vs timm {want}"
            );
        }
        eprintln!("{name}: {} timm LR values matched bit for bit", steps.len());
    }
}

#[test]
fn effdet_schedules_via_config() {
    let fx = Fx::load();
    // Per update: the recipe at B = 128, 925 updates per epoch.
    let cfg = &fx.meta["sched"]["recipe"];
    let upe = cfg["updates_per_epoch"].as_u64().unwrap();
    let batch = cfg["batch"].as_u64().unwrap() as usize;
    let recipe = ScheduleConfig::effdet_recipe(batch, upe);
    assert_eq!(recipe.lr, cfg["lr"].as_f64().unwrap());
    let sched = recipe.build().unwrap();
    assert_eq!(sched.cosine, cosine_from_meta(cfg));
    let steps = fx.i64s("sched.recipe.steps");
    let lrs = fx.f64s("sched.recipe.lr");
    for (&t, &want) in steps.iter().zip(&lrs) {
        let t = t as u64;
        assert_eq!(
            sched.lr(t / upe, t % upe).to_bits(),
            want.to_bits(),
            "t={t}"
        );
        assert_eq!(
            sched.lr_at_update(t, upe).to_bits(),
            want.to_bits(),
            "t={t}"
        );
    }
    // Every update of the run is a smooth schedule: warm-up rises linearly, cosine falls
    // monotonically to min_lr, and stays there.
    let total = 300 * upe;
    let mut prev = sched.cosine.lr_at(0);
    for t in 1..total + 2 * upe {
        let lr = sched.cosine.lr_at(t);
        if t < upe {
            assert!(lr > prev, "warm-up rises at {t}");
        } else if t > upe {
            assert!(lr <= prev, "cosine falls at {t}");
        }
        assert!(lr >= 1e-5);
        prev = lr;
    }
    assert_eq!(sched.cosine.lr_at(total), 1e-5);

    // Per epoch: effdet train.py's defaults, 300 + 10 cool-down epochs.
    let trainpy = ScheduleConfig::effdet_train_py();
    assert_eq!(trainpy.total_epochs(), 310);
    let sched = trainpy.build().unwrap();
    assert_eq!(sched.step_on, StepOn::Epochs);
    let lrs = fx.f64s("sched.trainpy.lr");
    for (epoch, &want) in lrs.iter().enumerate() {
        // Within an epoch the LR is constant.
        for update in [0, 1, 500] {
            assert_eq!(sched.lr(epoch as u64, update).to_bits(), want.to_bits());
        }
        assert_eq!(
            sched.lr_at_update(epoch as u64 * 7 + 3, 7).to_bits(),
            want.to_bits()
        );
    }
    assert_eq!(sched.cosine.cycle_length(0), 300);

    // Linear scaling.
    assert_eq!(linear_scaled_lr(0.08, 64, 64), 0.08);
    assert_eq!(linear_scaled_lr(0.08, 64, 256), 0.32);
    assert_eq!(linear_scaled_lr(0.08, 64, 8), 0.01);

    // Invalid configurations.
    assert!(CosineSchedule::new(0.1, 0.0, 0, 0, 0.0).is_err());
    assert!(CosineSchedule::new(0.1, -1.0, 10, 0, 0.0).is_err());
    assert!(CosineSchedule::new(f64::NAN, 0.0, 10, 0, 0.0).is_err());
    let mut bad = ScheduleConfig::effdet_recipe(64, 10);
    bad.step_on = StepOn::Updates {
        updates_per_epoch: 0,
    };
    assert!(bad.build().is_err());
}

// ------------------------------------------------------------------------------------------------
// EMA
// ------------------------------------------------------------------------------------------------

fn ema_state(fx: &Fx, prefix: &str) -> Vec<(String, Tensor)> {
    fx.meta["ema"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            let k = k.as_str().unwrap().to_string();
            let t = fx.f32(&format!("{prefix}.{k}"));
            (k, t)
        })
        .collect()
}

#[test]
fn ema_matches_timm_model_ema_v2_bit_for_bit() {
    let fx = Fx::load();
    let updates = fx.meta["ema"]["updates"].as_u64().unwrap();
    for dname in fx.meta["ema"]["decays"].as_array().unwrap() {
        let dname = dname.as_str().unwrap();
        let decay: f64 = dname.parse().unwrap();
        let config = EmaConfig {
            decay: EmaDecay::Constant(decay),
            buffers: BufferPolicy::Average,
        };
        let mut ema = ModelEma::new(config, ema_state(&fx, "model.init")).unwrap();
        for u in 0..updates {
            let model = ema_state(&fx, &format!("model.{u}"));
            ema.update(model.iter().map(|(k, t)| (k.as_str(), t)))
                .unwrap();
            for (k, want) in ema_state(&fx, &format!("ema.{dname}.{u}")) {
                let got = ema.get(&k).unwrap();
                assert_eq!(got.shape(), want.shape());
                for (i, (g, w)) in got.data().iter().zip(want.data()).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "decay {dname} update {u} {k}[{i}]"
                    );
                }
            }
        }
        assert_eq!(ema.num_updates(), updates);
    }
    assert_eq!(EmaConfig::effdet().decay, EmaDecay::Constant(0.9998));
}

#[test]
fn ema_warmup_buffers_state_and_errors() {
    // Warm-up rule: TF's min(decay, (1 + t) / (10 + t)).
    let w = EmaDecay::Warmup(0.999);
    assert_eq!(w.at(0), 0.1);
    assert_eq!(w.at(1), 2.0 / 11.0);
    assert_eq!(w.at(90), 91.0 / 100.0);
    assert_eq!(w.at(100_000), 0.999);
    assert_eq!(EmaDecay::Constant(0.9998).at(1), 0.9998);
    assert!(is_bn_buffer("backbone.bn1.running_var"));
    assert!(!is_bn_buffer("backbone.bn1.weight"));

    let t = |v: f32| Tensor::new(vec![2], vec![v, -v]).unwrap();
    let init = vec![
        ("a.weight".to_string(), t(1.0)),
        ("a.running_mean".to_string(), t(1.0)),
    ];
    let model = [("a.weight", t(3.0)), ("a.running_mean", t(3.0))];
    let pairs = || model.iter().map(|(k, v)| (*k, v));

    // Warm-up: first update (t = 1) uses 2/11; buffers copied under BufferPolicy::Copy.
    let cfg = EmaConfig {
        decay: EmaDecay::Warmup(0.999),
        buffers: BufferPolicy::Copy,
    };
    let mut ema = ModelEma::new(cfg, init.clone()).unwrap();
    assert_eq!(ema.next_decay(), 2.0 / 11.0);
    ema.update(pairs()).unwrap();
    let d = 2.0f64 / 11.0;
    let want = (d as f32) * 1.0 + ((1.0 - d) as f32) * 3.0;
    assert_eq!(ema.get("a.weight").unwrap().data()[0], want);
    assert_eq!(ema.get("a.running_mean").unwrap().data(), &[3.0, -3.0]);
    assert_eq!(ema.num_updates(), 1);
    // Explicit step: the decay of step 90.
    ema.update_at(pairs(), 90).unwrap();
    assert_eq!(ema.num_updates(), 90);

    // State round trip under a prefix, inside a bigger checkpoint map.
    let mut ckpt = ema.state_dict("ema.");
    ckpt.insert("a.weight".into(), t(9.0));
    let mut restored = ModelEma::new(cfg, init.clone()).unwrap();
    restored.load_state_dict("ema.", &ckpt).unwrap();
    assert_eq!(restored.num_updates(), 90);
    assert_eq!(restored.get("a.weight"), ema.get("a.weight"));
    ckpt.remove("ema.a.running_mean");
    assert!(restored.load_state_dict("ema.", &ckpt).is_err());

    // set() copies; errors leave the average untouched.
    let mut ema = ModelEma::new(EmaConfig::effdet(), init.clone()).unwrap();
    ema.set(pairs()).unwrap();
    assert_eq!(ema.get("a.weight").unwrap().data(), &[3.0, -3.0]);
    let before = ema.get("a.weight").unwrap().clone();
    let missing = [("a.weight", t(5.0))];
    let e = ema
        .update(missing.iter().map(|(k, v)| (*k, v)))
        .unwrap_err();
    assert!(e.to_string().contains("a.running_mean"), "{e}");
    let extra = [
        ("a.weight", t(5.0)),
        ("a.running_mean", t(5.0)),
        ("zzz", t(5.0)),
    ];
    assert!(ema.update(extra.iter().map(|(k, v)| (*k, v))).is_err());
    let wrong = [
        ("a.weight", Tensor::zeros(vec![3])),
        ("a.running_mean", t(5.0)),
    ];
    assert!(ema.update(wrong.iter().map(|(k, v)| (*k, v))).is_err());
    assert_eq!(ema.get("a.weight").unwrap(), &before);
    assert_eq!(ema.num_updates(), 0);
    assert!(ModelEma::new(EmaConfig::effdet(), vec![init[0].clone(), init[0].clone()]).is_err());
    let bad = EmaConfig {
        decay: EmaDecay::Constant(1.5),
        buffers: BufferPolicy::Average,
    };
    assert!(ModelEma::new(bad, init).is_err());

    // Fed straight from a ParamSet.
    let ps = ParamSet::from_named(vec![("p.weight".to_string(), t(2.0))]).unwrap();
    let mut ema = ModelEma::new(EmaConfig::effdet(), vec![("p.weight".into(), t(0.0))]).unwrap();
    ema.update(ps.named_values()).unwrap();
    assert_eq!(
        ema.get("p.weight").unwrap().data()[0],
        (1.0f64 - 0.9998) as f32 * 2.0 + 0.9998f32 * 0.0
    );
}

// ------------------------------------------------------------------------------------------------
// Thread ranks
// ------------------------------------------------------------------------------------------------

/// Deterministic per-rank data with values of very different magnitudes, so the summation order
/// changes the f32 result.
fn rank_data(rank: usize, len: usize, round: usize) -> Vec<f32> {
    let mut x = (rank as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (round as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mant = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let exp = ((x >> 8) % 24) as i32 - 12;
            mant * 2f32.powi(exp)
        })
        .collect()
}

fn run_ranks<T: Send>(world: usize, f: impl Fn(&mut dyn Communicator) -> T + Sync) -> Vec<T> {
    let comms = ThreadGroup::new(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                let f = &f;
                s.spawn(move || f(&mut c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn thread_all_reduce_is_bit_identical_and_rank_ordered() {
    let lens = [0usize, 1, 3, 7, 1001, 4096, 10_007];
    for world in [2usize, 4] {
        let results = run_ranks(world, |c| {
            assert_eq!(c.world_size(), world);
            let mut out = Vec::new();
            for (round, &len) in lens.iter().enumerate() {
                let mut d = rank_data(c.rank(), len, round);
                c.all_reduce_sum(&mut d).unwrap();
                out.push(d);
                let mut m = rank_data(c.rank(), len, round + 100);
                c.all_reduce_mean(&mut m).unwrap();
                out.push(m);
            }
            c.barrier().unwrap();
            out
        });
        for (round, &len) in lens.iter().enumerate() {
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| rank_data(r, len, round)).collect();
            let mut expect = inputs[0].clone();
            for inp in &inputs[1..] {
                for (e, &x) in expect.iter_mut().zip(inp) {
                    *e += x;
                }
            }
            let inputs: Vec<Vec<f32>> =
                (0..world).map(|r| rank_data(r, len, round + 100)).collect();
            let mut expect_mean = inputs[0].clone();
            for inp in &inputs[1..] {
                for (e, &x) in expect_mean.iter_mut().zip(inp) {
                    *e += x;
                }
            }
            for e in &mut expect_mean {
                *e /= world as f32;
            }
            for (rank, res) in results.iter().enumerate() {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&res[2 * round]),
                    bits(&expect),
                    "world {world} rank {rank} len {len}"
                );
                assert_eq!(
                    bits(&res[2 * round + 1]),
                    bits(&expect_mean),
                    "mean: world {world} rank {rank} len {len}"
                );
            }
        }
        // The order really matters for this data: a tree-order sum (as NCCL or a reduction tree
        // would do) differs somewhere, so the bit-exact comparison above is meaningful.
        if world == 4 {
            let v: Vec<Vec<f32>> = (0..4).map(|r| rank_data(r, 10_007, 6)).collect();
            let differs = (0..10_007)
                .filter(|&i| {
                    ((v[0][i] + v[1][i]) + v[2][i]) + v[3][i]
                        != (v[0][i] + v[1][i]) + (v[2][i] + v[3][i])
                })
                .count();
            assert!(differs > 0, "test data too tame");
        }
    }
}

#[test]
fn thread_broadcast_barrier_and_errors() {
    let out = run_ranks(4, |c| {
        let mut d = vec![c.rank() as f32; 5];
        c.broadcast(&mut d, 2).unwrap();
        let mut e = vec![c.rank() as f32 * 10.0; 3];
        c.broadcast(&mut e, 0).unwrap();
        c.barrier().unwrap();
        // Different lengths: every rank gets the same error, and the group stays usable.
        let mut bad = vec![1.0f32; 2 + c.rank() % 2];
        let err = c.all_reduce_sum(&mut bad).unwrap_err();
        assert!(matches!(err, DistError::LengthMismatch { .. }), "{err}");
        let err = c.broadcast(&mut bad, 1).unwrap_err();
        assert!(matches!(err, DistError::LengthMismatch { .. }), "{err}");
        assert!(matches!(
            c.broadcast(&mut d, 4),
            Err(DistError::InvalidRank { .. })
        ));
        let mut ok = vec![1.0f32; 4];
        c.all_reduce_sum(&mut ok).unwrap();
        (d, e, ok)
    });
    for (d, e, ok) in out {
        assert_eq!(d, vec![2.0; 5]);
        assert_eq!(e, vec![0.0; 3]);
        assert_eq!(ok, vec![4.0; 4]);
    }
}

#[test]
fn thread_group_reports_a_lost_rank_instead_of_hanging() {
    let mut comms = ThreadGroup::new(3);
    let gone = comms.pop().unwrap();
    drop(gone);
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                s.spawn(move || {
                    let mut d = vec![1.0f32; 4];
                    c.all_reduce_sum(&mut d)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in results {
        let e = r.unwrap_err();
        assert!(matches!(e, DistError::GroupBroken { .. }), "{e}");
        assert!(e.to_string().contains("rank 2"), "{e}");
    }
    assert!(ThreadGroup::new(0).is_empty());
    // A one-rank group and SingleProcess are identities.
    let mut one = ThreadGroup::new(1).pop().unwrap();
    let mut d = vec![1.5f32, 2.5];
    one.all_reduce_mean(&mut d).unwrap();
    one.broadcast(&mut d, 0).unwrap();
    one.barrier().unwrap();
    assert_eq!(d, vec![1.5, 2.5]);
    let mut sp = SingleProcess;
    sp.all_reduce_sum(&mut d).unwrap();
    sp.all_reduce_mean(&mut d).unwrap();
    assert_eq!(d, vec![1.5, 2.5]);
    assert!(sp.broadcast(&mut d, 1).is_err());
    assert_eq!((sp.rank(), sp.world_size()), (0, 1));
}

#[test]
fn gradient_averaging_and_param_broadcast_over_thread_ranks() {
    let world = 4;
    let out = run_ranks(world, |c| {
        let r = c.rank() as f32;
        let mut ps = vec![
            Param::new("a.weight", Tensor::new(vec![2, 2], vec![r; 4]).unwrap()),
            Param::new("a.bias", Tensor::new(vec![2], vec![r; 2]).unwrap()),
            Param::new("unused.weight", Tensor::new(vec![1, 1], vec![r]).unwrap()),
        ];
        broadcast_params(c, &mut ps, 0).unwrap();
        ps[0].grad = Some(Tensor::new(vec![2, 2], vec![r, 2.0 * r, 0.5, -r]).unwrap());
        ps[1].grad = Some(Tensor::new(vec![2], vec![1.0, r * r]).unwrap());
        average_gradients(c, &mut ps).unwrap();
        // A gradient on some ranks only is refused on every rank.
        let mut partial = ps.clone();
        if c.rank() == 1 {
            partial[2].grad = Some(Tensor::zeros(vec![1, 1]));
        }
        let err = average_gradients(c, &mut partial).unwrap_err();
        assert!(err.to_string().contains("unused.weight"), "{err}");
        ps
    });
    for ps in &out {
        assert_eq!(ps[0].value.data(), &[0.0; 4]);
        assert_eq!(ps[1].value.data(), &[0.0; 2]);
        // mean of r over 0..4 = 1.5; of r^2 = 3.5.
        assert_eq!(ps[0].grad.as_ref().unwrap().data(), &[1.5, 3.0, 0.5, -1.5]);
        assert_eq!(ps[1].grad.as_ref().unwrap().data(), &[1.0, 3.5]);
        assert!(ps[2].grad.is_none());
    }
    assert_eq!(out[0], out[3]);
    // One rank: nothing to do.
    let mut ps = vec![Param::new("x.weight", Tensor::zeros(vec![1, 1]))];
    average_gradients(&mut SingleProcess, &mut ps).unwrap();
    broadcast_params(&mut SingleProcess, &mut ps, 0).unwrap();
}

// ------------------------------------------------------------------------------------------------
// Sharding
// ------------------------------------------------------------------------------------------------

#[test]
fn shards_match_torch_distributed_sampler() {
    let fx = Fx::load();
    let s = &fx.meta["sampler"];
    for p in s["randperm"].as_array().unwrap() {
        let n = p["n"].as_u64().unwrap() as usize;
        let seed = p["seed"].as_u64().unwrap();
        let want: Vec<usize> = p["perm"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(torch_randperm(n, seed), want, "randperm n={n} seed={seed}");
    }
    let cases = s["cases"].as_array().unwrap();
    for c in cases {
        let g = |k: &str| c[k].as_u64().unwrap();
        let want: Vec<usize> = c["indices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let got = shard_indices(
            g("n") as usize,
            g("rank") as usize,
            g("world") as usize,
            g("epoch"),
            g("seed"),
            c["shuffle"].as_bool().unwrap(),
        )
        .unwrap();
        assert_eq!(got, want, "{c}");
    }
    eprintln!("{} DistributedSampler shards matched", cases.len());
}

#[test]
fn shards_cover_every_index_once_per_epoch_plus_padding() {
    for (n, world) in [
        (10usize, 4usize),
        (7, 3),
        (3, 8),
        (1000, 8),
        (64, 8),
        (1, 2),
    ] {
        for epoch in 0..3 {
            let mut counts = vec![0usize; n];
            for rank in 0..world {
                let shard = shard_indices(n, rank, world, epoch, 42, true).unwrap();
                assert_eq!(shard.len(), n.div_ceil(world));
                for i in shard {
                    counts[i] += 1;
                }
            }
            let padding = n.div_ceil(world) * world - n;
            assert!(counts.iter().all(|&c| c >= 1), "n={n} world={world}");
            assert_eq!(counts.iter().sum::<usize>(), n + padding);
            // Padding repeats the head of the permutation: no index appears more than
            // ceil(total / n) times.
            let max = (n + padding).div_ceil(n);
            assert!(counts.iter().all(|&c| c <= max));
        }
        // Epochs reshuffle.
        if n > 3 {
            assert_ne!(
                shard_indices(n, 0, world, 0, 42, true).unwrap(),
                shard_indices(n, 0, world, 1, 42, true).unwrap()
            );
        }
    }
    assert!(shard_indices(10, 4, 4, 0, 0, true).is_err());
    assert!(shard_indices(10, 0, 0, 0, 0, true).is_err());
    assert!(shard_indices(0, 0, 2, 0, 0, true).unwrap().is_empty());
}

// ------------------------------------------------------------------------------------------------
// Launcher environment
// ------------------------------------------------------------------------------------------------

fn env_of(pairs: &[(&str, &str)]) -> Result<LaunchEnv, DistError> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    LaunchEnv::from_vars(|k| map.get(k).cloned())
}

#[test]
fn launch_env_for_each_launcher() {
    let single = env_of(&[]).unwrap();
    assert_eq!(single.launcher, Launcher::Single);
    assert_eq!(
        (single.rank, single.world_size, single.local_rank),
        (0, 1, 0)
    );
    assert!(!single.is_distributed() && single.is_main());

    let t = env_of(&[
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "4"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29500"),
    ])
    .unwrap();
    assert_eq!(t.launcher, Launcher::Torchrun);
    assert_eq!((t.rank, t.world_size, t.local_rank), (5, 8, 1));
    assert_eq!(t.local_world_size, Some(4));
    assert_eq!(t.rendezvous().unwrap(), ("10.0.0.1".to_string(), 29500));
    assert!(t.is_distributed() && !t.is_main());

    let s = env_of(&[
        ("SLURM_PROCID", "3"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_LOCALID", "3"),
    ])
    .unwrap();
    assert_eq!(s.launcher, Launcher::Slurm);
    assert_eq!((s.rank, s.world_size, s.local_rank), (3, 4, 3));
    let e = s.rendezvous().unwrap_err();
    assert!(e.to_string().contains("MASTER_ADDR and MASTER_PORT"), "{e}");
    let s = env_of(&[
        ("SLURM_PROCID", "0"),
        ("SLURM_NPROCS", "2"),
        ("SLURM_LOCALID", "0"),
    ])
    .unwrap();
    assert_eq!(s.world_size, 2);

    let m = env_of(&[
        ("OMPI_COMM_WORLD_RANK", "2"),
        ("OMPI_COMM_WORLD_SIZE", "4"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "1234"),
    ])
    .unwrap();
    assert_eq!(m.launcher, Launcher::OpenMpi);
    assert_eq!((m.rank, m.world_size, m.local_rank), (2, 4, 0));
    assert_eq!(m.rendezvous().unwrap(), ("node0".to_string(), 1234));

    // torchrun inside a Slurm allocation: torchrun's variables win.
    let both = env_of(&[
        ("RANK", "6"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "2"),
        ("SLURM_PROCID", "1"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_LOCALID", "0"),
    ])
    .unwrap();
    assert_eq!((both.launcher, both.rank), (Launcher::Torchrun, 6));
    // Whitespace is tolerated, as Python's int() does.
    assert_eq!(
        env_of(&[("RANK", " 1 "), ("WORLD_SIZE", "2\n"), ("LOCAL_RANK", "1")])
            .unwrap()
            .rank,
        1
    );
}

#[test]
fn launch_env_errors_name_the_problem() {
    let err = |pairs: &[(&str, &str)]| env_of(pairs).unwrap_err().to_string();
    let e = err(&[("WORLD_SIZE", "4"), ("LOCAL_RANK", "0")]);
    assert!(e.contains("RANK is not set"), "{e}");
    let e = err(&[("RANK", "0"), ("LOCAL_RANK", "0")]);
    assert!(e.contains("WORLD_SIZE is not set"), "{e}");
    let e = err(&[("RANK", "4"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0")]);
    assert!(e.contains("RANK=4 is not below WORLD_SIZE=4"), "{e}");
    let e = err(&[("RANK", "0"), ("WORLD_SIZE", "0"), ("LOCAL_RANK", "0")]);
    assert!(e.contains("WORLD_SIZE is 0"), "{e}");
    let e = err(&[("RANK", "one"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]);
    assert!(e.contains("RANK=\"one\"") && e.contains("integer"), "{e}");
    let e = err(&[("RANK", "-1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]);
    assert!(e.contains("RANK=\"-1\""), "{e}");
    let e = err(&[("RANK", "0"), ("WORLD_SIZE", "2")]);
    assert!(e.contains("LOCAL_RANK is not set"), "{e}");
    let e = err(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "2")]);
    assert!(e.contains("LOCAL_RANK=2 is not below WORLD_SIZE=2"), "{e}");
    let e = err(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "2"),
        ("LOCAL_WORLD_SIZE", "2"),
    ]);
    assert!(
        e.contains("LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"),
        "{e}"
    );
    let e = err(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "0"),
        ("LOCAL_WORLD_SIZE", "8"),
    ]);
    assert!(e.contains("LOCAL_WORLD_SIZE=8"), "{e}");
    let e = err(&[("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0")]);
    assert!(e.contains("SLURM_NTASKS is not set"), "{e}");
    let e = err(&[
        ("SLURM_PROCID", "2"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_LOCALID", "0"),
    ]);
    assert!(
        e.contains("SLURM_PROCID=2 is not below SLURM_NTASKS=2"),
        "{e}"
    );
    let e = err(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "2")]);
    assert!(e.contains("OMPI_COMM_WORLD_LOCAL_RANK is not set"), "{e}");
    let e = err(&[("MASTER_PORT", "70000")]);
    assert!(e.contains("MASTER_PORT") && e.contains("port"), "{e}");
    let e = err(&[("MASTER_PORT", "0")]);
    assert!(e.contains("MASTER_PORT"), "{e}");
    let e = err(&[("MASTER_ADDR", " ")]);
    assert!(e.contains("MASTER_ADDR"), "{e}");
    // The real process environment parses (the test runner sets none of these, or valid ones).
    let _ = LaunchEnv::from_env();
}
