//! The CPU backend: f32 tensors in host memory, GEMM-based convolutions (the `gemm` crate),
//! cache-friendly direct depthwise convolutions, and rayon for parallelism.
//!
//! Every op runs inside the backend's own rayon pool, so `--threads N` bounds the whole forward.

pub mod backward;
mod conv;
mod ops;
pub mod simd;

use std::sync::Arc;

use super::{Activation, Backend, ConvSpec, Tensor};
use crate::error::{Error, Result};

/// The CPU engine. Cheap to clone (the thread pool is shared).
#[derive(Clone)]
pub struct CpuBackend {
    pool: Arc<rayon::ThreadPool>,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("threads", &self.threads())
            .finish()
    }
}

impl CpuBackend {
    /// A backend with `threads` worker threads; 0 means one per available core.
    pub fn new(threads: usize) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("effdet-cpu-{i}"))
            .build()
            .map_err(|e| Error::BackendUnavailable {
                backend: "cpu".into(),
                reason: format!("cannot start {threads} worker threads: {e}"),
            })?;
        Ok(CpuBackend {
            pool: Arc::new(pool),
        })
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Runs `f` inside this backend's thread pool (nested ops then reuse it without re-entry cost).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}

/// A raw output pointer shared by tasks that write disjoint parts (tiles, column blocks) of one
/// buffer, as the convolution kernels' parallel loops do.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: every user hands it to tasks that write disjoint element sets (see `conv::pointwise`
// and `backward::pointwise_backward`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Taking `self` makes closures capture the whole (Send) wrapper, not its raw pointer field.
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::Shape {
            op,
            detail: format!("shapes differ: {:?} vs {:?}", a.shape(), b.shape()),
        });
    }
    Ok(())
}

impl Backend for CpuBackend {
    type Tensor = Tensor;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn download(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn shape(&self, t: &Tensor) -> Vec<usize> {
        t.shape().to_vec()
    }

    fn conv2d(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        spec: ConvSpec,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.install(|| conv::conv2d(x, weight, bias, spec, residual))
    }

    fn channel_affine(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        act: Activation,
    ) -> Result<Tensor> {
        self.install(|| ops::channel_affine(x, scale, shift, act))
    }

    fn activation(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        self.install(|| {
            let mut y = x.clone();
            ops::apply_activation(y.data_mut(), act);
            Ok(y)
        })
    }

    fn global_avg_pool(&self, x: &Tensor) -> Result<Tensor> {
        ops::global_avg_pool(x)
    }

    fn scale_channels(&self, x: &Tensor, s: &Tensor) -> Result<Tensor> {
        self.install(|| ops::scale_channels(x, s))
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        same_shape("add", a, b)?;
        self.install(|| ops::weighted_sum(&[a, b], &[1.0, 1.0], Activation::None))
    }

    fn max_pool_same(&self, x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
        self.install(|| ops::max_pool_same(x, kernel, stride))
    }

    fn upsample_nearest(&self, x: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        self.install(|| ops::upsample_nearest(x, height, width))
    }

    fn weighted_sum(&self, xs: &[&Tensor], weights: &[f32], act: Activation) -> Result<Tensor> {
        if xs.is_empty() || xs.len() != weights.len() {
            return Err(Error::Shape {
                op: "weighted_sum",
                detail: format!("{} inputs but {} weights", xs.len(), weights.len()),
            });
        }
        for x in &xs[1..] {
            same_shape("weighted_sum", xs[0], x)?;
        }
        self.install(|| ops::weighted_sum(xs, weights, act))
    }
}
