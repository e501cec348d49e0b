//! The CUDA engine: FP16 inference on any NVIDIA GPU through cudarc, with pre-processing, box
//! decoding and NMS on the GPU.
//!
//! - [`kernels`]: the `.cu` sources (embedded) and their NVRTC compilation with a disk cache.
//! - [`params`]: the `#[repr(C)]` structures the kernels read, and how they are filled.
//! - `device` (feature `cuda`): probing, one context + stream per detector, typed errors.
//! - `preprocess`, `postprocess` (feature `cuda`): the host side of the GPU pre- and
//!   post-processing kernels.
//! - `backend` (feature `cuda`): `CudaBackend`, the [`crate::compute::Backend`] the model runs
//!   on: FP16 tensors, one kernel per op (`conv.cu`, `elementwise.cu`).
//! - `gemm` (feature `cuda`): pointwise convolutions as cuBLAS GEMMs, chosen per shape by
//!   timing them against the direct kernel.
//!
//! The kernels' logic is tested without a GPU too: `tests/cuda_emulated.rs` compiles the same
//! sources as C++ with a host shim (`EFFDET_HOST_EMULATION` in `prelude.cuh`) and checks them
//! against the CPU reference; `tests/cuda_nvrtc.rs` compiles them with NVRTC for every CI
//! architecture; `tests/cuda_gpu.rs` runs them on a GPU when there is one.
//!
//! Builds: the `cuda` feature (default) loads CUDA 13 libraries at run time (`cuda-13`,
//! default) or CUDA 12 ones (`--no-default-features --features cuda-12`); nothing is linked, so
//! the same binary runs on machines without a GPU and reports why the engine is unavailable.

pub mod kernels;
pub mod params;

#[cfg(feature = "cuda")]
pub mod backend;
#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
pub mod gemm;
#[cfg(feature = "cuda")]
pub mod postprocess;
#[cfg(feature = "cuda")]
pub mod preprocess;

#[cfg(feature = "cuda")]
pub use device::{GpuContext, GpuInfo, driver_error, driver_version, missing_libraries, probe};

/// The CUDA major version whose libraries this build loads.
#[cfg(feature = "cuda-12")]
pub const CUDA_MAJOR: u32 = 12;
/// The CUDA major version whose libraries this build loads.
#[cfg(all(feature = "cuda", not(feature = "cuda-12")))]
pub const CUDA_MAJOR: u32 = 13;

#[cfg(all(feature = "cuda-12", feature = "cuda-13"))]
compile_error!(
    "features `cuda-12` and `cuda-13` are exclusive: build with \
     `--no-default-features --features cuda-12` for CUDA 12"
);

/// Why the CUDA engine cannot run here, or `None` when a GPU is usable.
pub fn unavailable_reason() -> Option<String> {
    #[cfg(feature = "cuda")]
    {
        match probe() {
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        Some("this build has no CUDA support (built without the `cuda` feature)".into())
    }
}
