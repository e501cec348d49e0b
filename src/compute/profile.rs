//! A per-op profile of a forward pass: [`Profiler`] wraps any synchronous [`Backend`] (the CPU
//! engine) and times every op it forwards, with the network section the model code announced
//! ([`Backend::section`]: `stem`, `stage1`..`stage7`, `bifpn.p6p7`, `bifpn.cell1.node1`, ...,
//! `class_head`, `box_head`) and what kind of op it was (pointwise, depthwise 3x3 stride 2, SE,
//! BiFPN fusion, ...). `effdet bench --profile` prints [`Profile::table`].
//!
//! An op's time is the wall time of its call on the calling thread, which for the CPU engine
//! includes its parallel work (every op returns when its result is complete). It is no use for an
//! asynchronous engine (CUDA: `ncu` in the GPU lane measures its kernels).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use super::cpu::CpuBackend;
use super::{Activation, Backend, ConvSpec, Tensor};
use crate::error::{Error, Result};
use crate::model::{EfficientDet, EfficientDetConfig, WeightStore};

/// One timed op.
#[derive(Clone, Debug, PartialEq)]
pub struct OpRecord {
    pub section: String,
    pub kind: String,
    /// Output shape.
    pub shape: Vec<usize>,
    pub ms: f64,
}

/// A [`Backend`] that forwards to `inner` and records every op.
pub struct Profiler<B: Backend> {
    inner: B,
    section: Mutex<String>,
    records: Mutex<Vec<OpRecord>>,
}

impl<B: Backend> Profiler<B> {
    pub fn new(inner: B) -> Self {
        Profiler {
            inner,
            section: Mutex::new("input".into()),
            records: Mutex::new(Vec::new()),
        }
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The records so far, leaving none.
    pub fn take(&self) -> Vec<OpRecord> {
        std::mem::take(&mut *self.records.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn timed(
        &self,
        kind: impl FnOnce() -> String,
        f: impl FnOnce() -> Result<B::Tensor>,
    ) -> Result<B::Tensor> {
        let t = Instant::now();
        let y = f()?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let section = self
            .section
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let shape = self.inner.shape(&y);
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(OpRecord {
                section,
                kind: kind(),
                shape,
                ms,
            });
        Ok(y)
    }
}

fn act_name(a: Activation) -> &'static str {
    match a {
        Activation::None => "",
        Activation::Swish => " + swish",
        Activation::Sigmoid => " + sigmoid",
        Activation::Relu => " + relu",
    }
}

impl<B: Backend> Backend for Profiler<B> {
    type Tensor = B::Tensor;

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn section(&self, name: &str) {
        *self.section.lock().unwrap_or_else(|e| e.into_inner()) = name.to_string();
        self.inner.section(name);
    }

    fn upload(&self, t: &Tensor) -> Result<B::Tensor> {
        self.inner.upload(t)
    }

    fn download(&self, t: &B::Tensor) -> Result<Tensor> {
        self.inner.download(t)
    }

    fn shape(&self, t: &B::Tensor) -> Vec<usize> {
        self.inner.shape(t)
    }

    fn conv2d(
        &self,
        x: &B::Tensor,
        weight: &B::Tensor,
        bias: Option<&B::Tensor>,
        spec: ConvSpec,
        residual: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        let (xs, ws) = (self.inner.shape(x), self.inner.shape(weight));
        let kind = || {
            let (cin, k) = (xs[1], ws.get(2).copied().unwrap_or(1));
            let spatial = xs.get(2).copied().unwrap_or(1) * xs.get(3).copied().unwrap_or(1);
            let what = if spatial == 1 {
                "SE 1x1 conv".to_string()
            } else if spec.groups > 1 && spec.groups == cin {
                format!("depthwise {k}x{k} s{}", spec.stride)
            } else if k == 1 {
                "pointwise".to_string()
            } else {
                format!("conv {k}x{k} s{}", spec.stride)
            };
            let res = if residual.is_some() {
                " + residual"
            } else {
                ""
            };
            format!("{what}{}{res}", act_name(spec.act))
        };
        self.timed(kind, || self.inner.conv2d(x, weight, bias, spec, residual))
    }

    fn channel_affine(
        &self,
        x: &B::Tensor,
        scale: &B::Tensor,
        shift: &B::Tensor,
        act: Activation,
    ) -> Result<B::Tensor> {
        self.timed(
            || format!("batch norm{}", act_name(act)),
            || self.inner.channel_affine(x, scale, shift, act),
        )
    }

    fn activation(&self, x: &B::Tensor, act: Activation) -> Result<B::Tensor> {
        self.timed(
            || format!("activation{}", act_name(act)),
            || self.inner.activation(x, act),
        )
    }

    fn global_avg_pool(&self, x: &B::Tensor) -> Result<B::Tensor> {
        self.timed(|| "SE pool".into(), || self.inner.global_avg_pool(x))
    }

    fn scale_channels(&self, x: &B::Tensor, s: &B::Tensor) -> Result<B::Tensor> {
        self.timed(|| "SE scale".into(), || self.inner.scale_channels(x, s))
    }

    fn add(&self, a: &B::Tensor, b: &B::Tensor) -> Result<B::Tensor> {
        self.timed(|| "add".into(), || self.inner.add(a, b))
    }

    fn max_pool_same(&self, x: &B::Tensor, kernel: usize, stride: usize) -> Result<B::Tensor> {
        self.timed(
            || format!("max pool {kernel}x{kernel} s{stride}"),
            || self.inner.max_pool_same(x, kernel, stride),
        )
    }

    fn upsample_nearest(&self, x: &B::Tensor, height: usize, width: usize) -> Result<B::Tensor> {
        self.timed(
            || "upsample nearest".into(),
            || self.inner.upsample_nearest(x, height, width),
        )
    }

    fn weighted_sum(
        &self,
        xs: &[&B::Tensor],
        weights: &[f32],
        act: Activation,
    ) -> Result<B::Tensor> {
        self.timed(
            || format!("BiFPN fusion ({} inputs){}", xs.len(), act_name(act)),
            || self.inner.weighted_sum(xs, weights, act),
        )
    }
}

/// The records of several forward passes, summed per op kind and per section.
#[derive(Clone, Debug)]
pub struct Profile {
    /// Forward passes recorded.
    pub passes: usize,
    /// Images per pass.
    pub batch: usize,
    pub records: Vec<OpRecord>,
}

/// (name, milliseconds per pass, op calls per pass).
pub type Row = (String, f64, usize);

impl Profile {
    fn grouped(&self, key: impl Fn(&OpRecord) -> String) -> Vec<Row> {
        let mut m: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for r in &self.records {
            let e = m.entry(key(r)).or_default();
            e.0 += r.ms;
            e.1 += 1;
        }
        let p = self.passes.max(1) as f64;
        let mut rows: Vec<Row> = m
            .into_iter()
            .map(|(k, (ms, n))| (k, ms / p, n / self.passes.max(1)))
            .collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        rows
    }

    /// Milliseconds per pass, all ops.
    pub fn total_ms(&self) -> f64 {
        self.records.iter().map(|r| r.ms).sum::<f64>() / self.passes.max(1) as f64
    }

    /// Per op kind (pointwise, depthwise 5x5 s2, SE pool, ...), slowest first.
    pub fn by_kind(&self) -> Vec<Row> {
        self.grouped(|r| r.kind.clone())
    }

    /// Per network section (stem, stage1..7, bifpn.*, heads), slowest first.
    pub fn by_section(&self) -> Vec<Row> {
        self.grouped(|r| r.section.clone())
    }

    /// Per (section, kind): the layers, slowest first.
    pub fn by_layer(&self) -> Vec<Row> {
        self.grouped(|r| format!("{} / {}", r.section, r.kind))
    }

    /// The profile as text tables (kinds, sections, the slowest `top` layers).
    pub fn table(&self, top: usize) -> String {
        let total = self.total_ms();
        let mut s = format!(
            "profile: {} pass(es) of batch {}, {:.1} ms per pass ({:.2} ms per image) in the ops\n",
            self.passes,
            self.batch,
            total,
            total / self.batch.max(1) as f64
        );
        let mut block = |title: &str, rows: Vec<Row>, limit: usize| {
            s.push_str(&format!(
                "\n{title:<48} {:>6} {:>10} {:>7}\n",
                "calls", "ms/pass", "share"
            ));
            for (name, ms, n) in rows.into_iter().take(limit) {
                s.push_str(&format!(
                    "{name:<48} {n:>6} {ms:>10.2} {:>6.1}%\n",
                    100.0 * ms / total.max(1e-12)
                ));
            }
        };
        block("op kind", self.by_kind(), usize::MAX);
        block("section", self.by_section(), usize::MAX);
        block("layer (section / op kind)", self.by_layer(), top);
        s
    }

    /// The three groupings as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let rows = |rows: Vec<Row>| {
            rows.into_iter()
                .map(|(name, ms, calls)| serde_json::json!({"name": name, "ms_per_pass": ms, "calls": calls}))
                .collect::<Vec<_>>()
        };
        serde_json::json!({
            "passes": self.passes,
            "batch": self.batch,
            "ms_per_pass": self.total_ms(),
            "by_kind": rows(self.by_kind()),
            "by_section": rows(self.by_section()),
            "by_layer": rows(self.by_layer()),
        })
    }
}

/// Profiles `passes` forward passes of the network in `store` on the CPU engine (`threads`
/// workers, 0 = one per core) on `input` (`[N, 3, S, S]`, as `Detector::preprocess` makes it),
/// run as the engine runs it (a micro-batch at a time), after one untimed warm-up pass.
pub fn profile_cpu(
    store: &WeightStore,
    config: EfficientDetConfig,
    threads: usize,
    input: &Tensor,
    passes: usize,
) -> Result<Profile> {
    if passes == 0 {
        return Err(Error::InvalidArgument(
            "a profile needs at least one pass".into(),
        ));
    }
    let prof = Profiler::new(CpuBackend::new(threads)?);
    let model = EfficientDet::load(&prof, store, config)?;
    let x = prof.upload(input)?;
    let batch = input.shape().first().copied().unwrap_or(1);
    // As the engine runs a batch: a micro-batch at a time (detector::cpu_forward).
    let forward = || crate::detector::cpu_forward(&prof, &model, &x);
    prof.inner().install(|| {
        forward()?;
        prof.take();
        for _ in 0..passes {
            forward()?;
        }
        Ok(Profile {
            passes,
            batch,
            records: prof.take(),
        })
    })
}
