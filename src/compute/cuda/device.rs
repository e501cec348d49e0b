//! One GPU as the engine uses it: library probing, a context and a stream per detector,
//! compiled kernel modules, and CUDA errors turned into [`Error`]s.
//!
//! cudarc panics when a CUDA library is missing at first use, so every entry point here first
//! checks `is_culib_present` for the libraries it needs and reports their absence as
//! [`Error::BackendUnavailable`] with what to install. The driver's `libcuda.so.1` is opened
//! before a bare `libcuda.so` (often a CUDA toolkit's stub; cudarc is patched for that, see
//! vendor/cudarc/EFFDET-PATCH.md); where only a stub is found it is named as such, with its
//! path.
//!
//! Host overhead: a detector orders all its work on its one stream, so cudarc's per-buffer
//! event tracking (two events per allocation, recorded and waited on at every use, for
//! cross-stream safety) is switched off; and the device's memory pool keeps freed memory
//! (release threshold at its maximum), so the per-layer allocations of a forward pass are
//! served from the pool after the first pass instead of going back to the driver at every
//! synchronisation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Once};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError, sys};
use cudarc::nvrtc::Ptx;

use super::kernels::{self, KernelSource, ModuleForm, ModuleImage};
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
            missing.push("cuda (the NVIDIA driver's libcuda.so.1)");
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
    let count = CudaContext::device_count().map_err(|e| {
        if e.0 == sys::CUresult::CUDA_ERROR_STUB_LIBRARY {
            return unavailable(stub_message());
        }
        match driver_error("cuInit", e) {
            Error::Gpu { reason, .. } => {
                unavailable(format!("the CUDA driver cannot start: {reason}"))
            }
            other => other,
        }
    })?;
    if count <= 0 {
        return Err(unavailable("the CUDA driver reports no GPU"));
    }
    (0..count as usize).map(info).collect()
}

/// The shared objects named `libcuda*` mapped into this process (from `/proc/self/maps`).
fn loaded_libcuda() -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut paths: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| {
            std::path::Path::new(p)
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with("libcuda."))
        })
        .map(str::to_string)
        .collect();
    paths.dedup();
    paths
}

/// Where NVIDIA drivers put `libcuda.so.1` (distribution packages, the runfile installer, the
/// container toolkit's mounts).
const DRIVER_DIRS: [&str; 5] = [
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/local/nvidia/lib64",
    "/usr/lib/wsl/lib",
];

/// The explanation for `CUDA_ERROR_STUB_LIBRARY`: which file was loaded, where the real driver
/// is if it can be found, and what to change.
///
/// cudarc (patched, vendor/cudarc) opens the driver's soname `libcuda.so.1` before a bare
/// `libcuda.so`, so a stub is only loaded where no `libcuda.so.1` is on the library path or in
/// the system's folders: the driver is not installed, or not visible (a container started
/// without the GPU).
fn stub_message() -> String {
    let loaded = loaded_libcuda();
    let real: Vec<String> = DRIVER_DIRS
        .iter()
        .map(|d| std::path::Path::new(d).join("libcuda.so.1"))
        .filter(|p| p.exists() && !loaded.iter().any(|l| std::path::Path::new(l) == p))
        .map(|p| p.display().to_string())
        .collect();
    format!(
        "the libcuda loaded ({}) is the CUDA toolkit's stub, which only satisfies the linker, \
         because no NVIDIA driver library (libcuda.so.1) is on the library path; {}; install \
         the NVIDIA driver (in a container: start it with the GPU, e.g. --gpus all) or put the \
         driver's folder on LD_LIBRARY_PATH",
        if loaded.is_empty() {
            "path unknown".to_string()
        } else {
            loaded.join(", ")
        },
        if real.is_empty() {
            "none was found in the usual folders either".to_string()
        } else {
            format!("there is one at {}", real.join(", "))
        }
    )
}

/// The CUDA version the driver supports, e.g. (13, 0).
pub fn driver_version() -> Result<(i32, i32)> {
    if !missing_libraries().is_empty() {
        return Err(unavailable("the CUDA driver library is not loadable"));
    }
    let mut v = 0;
    // SAFETY: the library is present (checked above); `v` is valid. cuDriverGetVersion needs
    // no cuInit.
    unsafe { sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| driver_error("cuDriverGetVersion", e))?;
    Ok((v / 1000, (v % 1000) / 10))
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
        // SAFETY: every buffer of this GpuContext is allocated, used and freed on `stream`
        // alone, so stream order already synchronises every use; nothing crosses streams.
        unsafe { ctx.disable_event_tracking() };
        if let Err(e) = keep_freed_memory(&ctx) {
            // Only a cost (allocations go back to the driver), never a reason not to run.
            tracing::warn!("device memory pool left as it was: {e}");
        }
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_error("cuStreamCreate", e))?;
        log_setup_once(&info);
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
                    let image = kernels::module_for_device(src, self.info.arch())?;
                    let m = self.load(src, &image)?;
                    modules.insert(src.name, m.clone());
                    m
                }
            }
        };
        let f = module
            .load_function(name)
            .map_err(|e| driver_error(&format!("cuModuleGetFunction ({name})"), e))?;
        // Registers and local memory (spills show up as local bytes) per kernel, for the
        // tuning log.
        tracing::debug!(
            kernel = name,
            registers = f.num_regs().unwrap_or(-1),
            local_bytes = f.local_size_bytes().unwrap_or(-1),
            shared_bytes = f.shared_size_bytes().unwrap_or(-1),
            max_threads = f.max_threads_per_block().unwrap_or(-1),
            "kernel loaded"
        );
        Ok(f)
    }

    /// Loads a compiled module into this context, turning a PTX the driver is too old for
    /// into an error that names both versions.
    fn load(&self, src: &KernelSource, image: &ModuleImage) -> Result<Arc<CudaModule>> {
        let t = std::time::Instant::now();
        let module = match image.form {
            ModuleForm::Cubin => Ptx::from_binary(image.bytes.clone()),
            ModuleForm::Ptx => Ptx::from_src(String::from_utf8_lossy(&image.bytes).into_owned()),
        };
        let loaded = self.ctx.load_module(module).map_err(|e| {
            if image.form == ModuleForm::Ptx
                && e.0 == sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION
            {
                let isa = image
                    .ptx_isa()
                    .map_or("unknown".into(), |(a, b)| format!("{a}.{b}"));
                let nvrtc =
                    kernels::nvrtc_version().map_or("unknown".into(), |(a, b)| format!("{a}.{b}"));
                let driver = driver_version().map_or("unknown".into(), |(a, b)| format!("{a}.{b}"));
                return unavailable(format!(
                    "{}: PTX ISA {isa} from NVRTC {nvrtc} is newer than this driver (CUDA \
                     {driver}) can JIT; use an NVRTC no newer than the driver's CUDA version, \
                     or update the driver",
                    src.name
                ));
            }
            driver_error(
                &format!("cuModuleLoadData ({} {})", src.name, image.form),
                e,
            )
        })?;
        tracing::debug!(
            kernel = src.name,
            form = %image.form,
            arch = image.arch,
            bytes = image.bytes.len(),
            ms = t.elapsed().as_secs_f64() * 1e3,
            "module loaded"
        );
        Ok(loaded)
    }

    /// The device memory pool's (used now, reserved now, reserved at most) in bytes: what this
    /// process's stream-ordered allocations hold, after the pool keeps freed blocks.
    pub fn pool_memory(&self) -> Result<(u64, u64, u64)> {
        let pool = default_pool(&self.ctx)?
            .ok_or_else(|| unavailable("this device has no stream-ordered memory pool"))?;
        let get = |attr| -> Result<u64> {
            let mut v = 0u64;
            // SAFETY: these attributes are 64-bit values; `pool` is the default pool.
            unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut v as *mut u64).cast()) }
                .result()
                .map_err(|e| driver_error("cuMemPoolGetAttribute", e))?;
            Ok(v)
        };
        use sys::CUmemPool_attribute as A;
        Ok((
            get(A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            get(A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
            get(A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        ))
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| driver_error("cuMemGetInfo", e))
    }

    /// Copies device memory back to the host for reading. The stream is synchronised first
    /// (so a fault in a kernel queued before surfaces here, named by `what`, not in the copy)
    /// and after the copy (so the host never reads a buffer the copy is still filling, whatever
    /// the driver does for pageable memory).
    pub fn read<T, Src>(&self, what: &str, src: &Src) -> Result<Vec<T>>
    where
        T: cudarc::driver::DeviceRepr,
        Src: cudarc::driver::DevicePtr<T>,
    {
        self.stream
            .synchronize()
            .map_err(|e| driver_error(&format!("the kernels before reading {what}"), e))?;
        let host = self
            .stream
            .clone_dtoh(src)
            .map_err(|e| driver_error(&format!("cuMemcpyDtoH ({what})"), e))?;
        self.synchronize()?;
        Ok(host)
    }

    /// Runs `f` between `cuProfilerStart` and `cuProfilerStop`, synchronised at both ends, so a
    /// profiler started with `--profile-from-start off` (`ncu`, `nsys`) records exactly `f`'s
    /// kernels.
    pub fn profiled<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.synchronize()?;
        // SAFETY: the context is current on this thread (synchronize bound it); no arguments.
        unsafe { sys::cuProfilerStart() }
            .result()
            .map_err(|e| driver_error("cuProfilerStart", e))?;
        let r = f().and_then(|r| self.synchronize().map(|()| r));
        // SAFETY: as above.
        let stop = unsafe { sys::cuProfilerStop() }
            .result()
            .map_err(|e| driver_error("cuProfilerStop", e));
        let r = r?;
        stop?;
        Ok(r)
    }

    /// Waits for all work queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_error("cuStreamSynchronize", e))
    }
}

/// The device's default memory pool (the one stream-ordered allocation uses), with `ctx`
/// made current; `None` where the device has no stream-ordered allocator.
fn default_pool(ctx: &Arc<CudaContext>) -> Result<Option<sys::CUmemoryPool>> {
    ctx.bind_to_thread()
        .map_err(|e| driver_error("cuCtxSetCurrent", e))?;
    let mut pool = std::ptr::null_mut();
    // SAFETY: the context is current; `pool` receives the device's default pool.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    if r == sys::CUresult::CUDA_ERROR_NOT_SUPPORTED {
        return Ok(None);
    }
    r.result()
        .map_err(|e| driver_error("cuDeviceGetDefaultMemPool", e))?;
    Ok(Some(pool))
}

/// Keeps freed device memory in the device's default pool (the one stream-ordered allocation
/// uses) instead of returning it to the driver at each synchronisation: its release threshold
/// goes to the maximum. Devices without stream-ordered allocation are left alone.
fn keep_freed_memory(ctx: &Arc<CudaContext>) -> Result<()> {
    let Some(pool) = default_pool(ctx)? else {
        tracing::debug!("no stream-ordered allocator on this device: no pool to configure");
        return Ok(());
    };
    let mut threshold = u64::MAX;
    // SAFETY: RELEASE_THRESHOLD takes a u64; `pool` is valid.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
    .map_err(|e| driver_error("cuMemPoolSetAttribute (release threshold)", e))
}

/// Logs, once per process, the versions that decide whether kernels load: NVRTC's, the
/// driver's CUDA version, the GPU, and the module form chosen for it.
fn log_setup_once(info: &GpuInfo) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let nvrtc =
            kernels::nvrtc_version().map_or("unavailable".into(), |(a, b)| format!("{a}.{b}"));
        let driver = driver_version().map_or("unknown".into(), |(a, b)| format!("{a}.{b}"));
        let form = kernels::supported_archs()
            .and_then(|s| kernels::choose_form(&s, info.arch()))
            .map_or_else(
                |e| format!("none ({e})"),
                |(f, a)| format!("{f} for sm_{a}"),
            );
        tracing::info!(
            gpu = %info.name,
            arch = format!("sm_{}", info.arch()),
            nvrtc = %nvrtc,
            driver_cuda = %driver,
            kernels = %form,
            "CUDA engine"
        );
    });
}
