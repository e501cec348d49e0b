//! Pointwise (1x1, stride 1, ungrouped) convolutions as cuBLAS GEMMs on the tensor cores, and
//! the per-shape choice between them and the direct kernel.
//!
//! Pointwise convolutions are about 85% of EfficientDet-D0's arithmetic (`tools/d0_floor.py`).
//! In NCHW a batch of them is a strided batched GEMM: for image `n`, `Y[n] (K x P) = W (K x C)
//! X[n] (C x P)` with `P = H W`. cuBLAS is column-major, so it computes the transposed product
//! `Y[n]^T (P x K) = X[n]^T (P x C) W^T (C x K)` on the same memory: `m = P, n = K, k = C`,
//! `A = X[n]` (lda `P`, stride `C P`), `B = W` (ldb `C`, stride 0), `C = Y[n]` (ldc `P`,
//! stride `K P`). FP16 in and out, FP32 accumulation (`CUBLAS_COMPUTE_32F`). The bias,
//! activation and residual then run as one in-place epilogue kernel.
//!
//! Which implementation a layer uses is decided once per shape (batch size included), the first
//! time the shape runs, by timing both ([`ConvChoice`]); `EFFDET_CUDA_CONV=direct|gemm` forces
//! one (tests, diagnosis).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{CudaBlas, result as blas, sys};

use super::GpuContext;
use crate::error::{Error, Result};

/// How a convolution is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvChoice {
    /// `conv.cu`'s direct kernel (every shape).
    Direct,
    /// cuBLAS GEMM + epilogue (pointwise convolutions only).
    Gemm,
}

/// The policy for pointwise convolutions (`EFFDET_CUDA_CONV`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvPolicy {
    /// Time both on first use of a shape and keep the faster (the default).
    Auto,
    /// Always the direct kernel.
    Direct,
    /// Always cuBLAS where it applies.
    Gemm,
}

impl ConvPolicy {
    /// From `EFFDET_CUDA_CONV` (`auto`, `direct`, `gemm`); unset means `auto`.
    pub fn from_env() -> Result<Self> {
        match std::env::var("EFFDET_CUDA_CONV").ok().as_deref() {
            None | Some("") | Some("auto") => Ok(ConvPolicy::Auto),
            Some("direct") => Ok(ConvPolicy::Direct),
            Some("gemm") => Ok(ConvPolicy::Gemm),
            Some(other) => Err(Error::InvalidArgument(format!(
                "EFFDET_CUDA_CONV={other}: expected auto, direct or gemm"
            ))),
        }
    }
}

/// A pointwise convolution's GEMM shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PointwiseShape {
    pub batch: usize,
    pub cin: usize,
    pub cout: usize,
    /// `H W`.
    pub pixels: usize,
}

/// cuBLAS on the detector's stream, with the per-shape choices made so far.
pub struct PointwiseGemm {
    blas: CudaBlas,
    choices: Mutex<HashMap<PointwiseShape, ConvChoice>>,
}

impl std::fmt::Debug for PointwiseGemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointwiseGemm").finish_non_exhaustive()
    }
}

fn blas_error(op: &str, e: blas::CublasError) -> Error {
    Error::Gpu {
        op: op.into(),
        reason: format!("{:?}", e.0),
    }
}

impl PointwiseGemm {
    /// cuBLAS on `gpu`'s stream, or why not (library missing: `Ok(None)` with the reason
    /// logged, since the direct kernel covers every convolution).
    pub fn new(gpu: &Arc<GpuContext>) -> Result<Option<Self>> {
        // SAFETY: only tries to open the shared library.
        if !unsafe { sys::is_culib_present() } {
            tracing::warn!(
                "cuBLAS (libcublas.so.{}) not found: every pointwise convolution uses the \
                 slower direct kernel",
                super::CUDA_MAJOR
            );
            return Ok(None);
        }
        let blas =
            CudaBlas::new(gpu.stream().clone()).map_err(|e| blas_error("cublasCreate", e))?;
        Ok(Some(PointwiseGemm {
            blas,
            choices: Mutex::new(HashMap::new()),
        }))
    }

    /// The choice recorded for `shape`, if any.
    pub fn choice(&self, shape: &PointwiseShape) -> Option<ConvChoice> {
        self.choices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(shape)
            .copied()
    }

    /// How many shapes chose (cuBLAS, the direct kernel) so far.
    pub fn counts(&self) -> (usize, usize) {
        let choices = self.choices.lock().unwrap_or_else(|e| e.into_inner());
        let gemm = choices.values().filter(|&&c| c == ConvChoice::Gemm).count();
        (gemm, choices.len() - gemm)
    }

    pub fn record(&self, shape: PointwiseShape, choice: ConvChoice) {
        tracing::debug!(?shape, ?choice, "pointwise convolution");
        self.choices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(shape, choice);
    }

    /// `y[n] = w x[n]` for every image (no bias or activation: the caller's epilogue).
    ///
    /// # Safety
    /// `x`, `w`, `y` must be device addresses on this stream of at least `batch cin pixels`,
    /// `cout cin` and `batch cout pixels` FP16 values, alive until the stream has run the GEMM.
    pub unsafe fn run(&self, s: PointwiseShape, x: u64, w: u64, y: u64) -> Result<()> {
        let too_big = |v: usize| v > i32::MAX as usize;
        if too_big(s.pixels) || too_big(s.cin) || too_big(s.cout) || too_big(s.batch) {
            return Err(Error::InvalidArgument(format!(
                "pointwise convolution {s:?} exceeds cuBLAS's 32-bit sizes"
            )));
        }
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: the caller guarantees the buffers; sizes and strides are those of the module
        // docs; alpha/beta are f32 as CUBLAS_COMPUTE_32F requires.
        unsafe {
            blas::gemm_strided_batched_ex(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_N,
                sys::cublasOperation_t::CUBLAS_OP_N,
                s.pixels as i32,
                s.cout as i32,
                s.cin as i32,
                &alpha as *const f32 as *const c_void,
                x as *const c_void,
                sys::cudaDataType::CUDA_R_16F,
                s.pixels as i32,
                (s.cin * s.pixels) as i64,
                w as *const c_void,
                sys::cudaDataType::CUDA_R_16F,
                s.cin as i32,
                0,
                &beta as *const f32 as *const c_void,
                y as *mut c_void,
                sys::cudaDataType::CUDA_R_16F,
                s.pixels as i32,
                (s.cout * s.pixels) as i64,
                s.batch as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| blas_error("cublasGemmStridedBatchedEx", e))
    }
}
