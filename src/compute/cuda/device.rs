//! One GPU as the engine uses it: library probing, a context and a stream per detector,
//! compiled kernel modules, and CUDA errors turned into [`Error`]s.
//!
//! cudarc panics when a CUDA library is missing at first use, so every entry point here first
//! checks `is_culib_present` for the libraries it needs and reports their absence as
//! [`Error::BackendUnavailable`] with what to install.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError, sys};
use cudarc::nvrtc::Ptx;

use super::kernels::{self, KernelSource};
use crate::error::{Error, Result};

/// What the probe found about one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for Hopper.
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
}

impl GpuInfo {
    /// The NVRTC architecture number, e.g. 90.
    pub fn arch(&self) -> u32 {
        (self.compute_capability.0 * 10 + self.compute_capability.1) as u32
    }
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: "cuda".into(),
        reason: reason.into(),
    }
}

/// A CUDA driver error from `op` as an [`Error`]: out-of-memory becomes
/// [`Error::GpuOutOfMemory`], anything else [`Error::Gpu`] with CUDA's name and message.
pub fn driver_error(op: &str, e: DriverError) -> Error {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        return Error::GpuOutOfMemory {
            op: op.into(),
            detail: format!("{name}: {text}"),
        };
    }
    Error::Gpu {
        op: op.into(),
        reason: format!("{name}: {text}"),
    }
}

/// The libraries the engine needs that cannot be loaded, by cudarc's name.
pub fn missing_libraries() -> Vec<&'static str> {
    let mut missing = Vec::new();
    // SAFETY: each call only tries to open the shared library.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            missing.push("cuda (the NVIDIA driver's libcuda.so)");
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            missing.push("nvrtc");
        }
    }
    missing
}

/// The GPUs this process can use, or why there are none (missing driver or NVRTC, no device,
/// driver too old for this build's CUDA version). Never panics.
pub fn probe() -> Result<Vec<GpuInfo>> {
    let missing = missing_libraries();
    if !missing.is_empty() {
        return Err(unavailable(format!(
            "CUDA libraries not found: {} (this build loads CUDA {} libraries; put their folder \
             on LD_LIBRARY_PATH)",
            missing.join(", "),
            super::CUDA_MAJOR
        )));
    }
    let count = CudaContext::device_count().map_err(|e| match driver_error("cuInit", e) {
        Error::Gpu { reason, .. } => unavailable(format!("the CUDA driver cannot start: {reason}")),
        other => other,
    })?;
    if count <= 0 {
        return Err(unavailable("the CUDA driver reports no GPU"));
    }
    (0..count as usize).map(info).collect()
}

fn info(ordinal: usize) -> Result<GpuInfo> {
    let ctx = CudaContext::new(ordinal).map_err(|e| driver_error("cuCtxCreate", e))?;
    Ok(GpuInfo {
        ordinal,
        name: ctx.name().map_err(|e| driver_error("cuDeviceGetName", e))?,
        compute_capability: ctx
            .compute_capability()
            .map_err(|e| driver_error("cuDeviceGetAttribute", e))?,
        total_memory: ctx
            .total_mem()
            .map_err(|e| driver_error("cuDeviceTotalMem", e))?,
    })
}

/// One GPU with its own stream and the kernel modules loaded so far. A detector owns one; all
/// its work is ordered on `stream` (no host synchronisation until results are read back).
pub struct GpuContext {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: GpuInfo,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("info", &self.info)
            .finish()
    }
}

impl GpuContext {
    /// Opens GPU `ordinal` (0 = the first) with a new stream. Errors: libraries missing or no
    /// such GPU ([`Error::BackendUnavailable`], naming the GPUs there are), driver failures
    /// ([`Error::Gpu`]).
    pub fn new(ordinal: usize) -> Result<GpuContext> {
        let gpus = probe()?;
        let Some(info) = gpus.iter().find(|g| g.ordinal == ordinal).cloned() else {
            let names: Vec<String> = gpus
                .iter()
                .map(|g| format!("{}: {}", g.ordinal, g.name))
                .collect();
            return Err(unavailable(format!(
                "there is no GPU {ordinal}; this machine has {}",
                names.join(", ")
            )));
        };
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_error("cuCtxCreate", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_error("cuStreamCreate", e))?;
        Ok(GpuContext {
            ctx,
            stream,
            info,
            modules: Mutex::new(HashMap::new()),
        })
    }

    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Kernel `name` of `src`, compiled for this GPU (NVRTC once per process, disk-cached) and
    /// loaded into this context once.
    pub fn function(&self, src: &KernelSource, name: &str) -> Result<CudaFunction> {
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match modules.get(src.name) {
                Some(m) => m.clone(),
                None => {
                    let ptx = kernels::ptx(src, self.info.arch())?;
                    let m = self
                        .ctx
                        .load_module(Ptx::from_src(ptx.as_str()))
                        .map_err(|e| {
                            driver_error(&format!("cuModuleLoadData ({})", src.name), e)
                        })?;
                    modules.insert(src.name, m.clone());
                    m
                }
            }
        };
        module
            .load_function(name)
            .map_err(|e| driver_error(&format!("cuModuleGetFunction ({name})"), e))
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| driver_error("cuMemGetInfo", e))
    }

    /// Waits for all work queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_error("cuStreamSynchronize", e))
    }
}
