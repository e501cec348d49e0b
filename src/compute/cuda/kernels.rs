//! The CUDA kernel sources and their run-time compilation by NVRTC.
//!
//! Each `.cu` file under `src/compute/cuda/kernels/` is embedded in the binary together with
//! the shared `prelude.cuh` (NVRTC gets no include path: the prelude is pasted in front of the
//! source, with a `#line` directive so that messages name the right file and line). A source
//! is compiled for the device's architecture the first time a process needs it and then cached:
//! in memory for the process, and on disk under [`cache_dir`] keyed by the source's hash, the
//! architecture and the NVRTC version, so later processes load PTX without compiling.
//!
//! Compilation is strict: any warning in NVRTC's log is an error ([`Error::KernelCompile`]).
//! CI compiles every source for every architecture in [`CI_ARCHS`] with pip's NVRTC
//! (`tests/cuda_nvrtc.rs`), so a kernel that does not build never reaches a GPU.

#[cfg(not(feature = "cuda"))]
use crate::error::{Error, Result};

/// The prelude every kernel source starts with (types, FP16 conversions, host emulation).
pub const PRELUDE: &str = include_str!("kernels/prelude.cuh");

/// One kernel source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSource {
    /// File name under `src/compute/cuda/kernels/`, e.g. `preprocess.cu`.
    pub name: &'static str,
    /// The file's text (with its `#include "prelude.cuh"`).
    pub body: &'static str,
    /// Allow NVRTC to contract multiplies and adds into FMAs. Off for kernels that must repeat
    /// the CPU reference's f32 rounding step by step (box decoding, IoU).
    pub fmad: bool,
}

/// Letterbox + normalise a frame into the FP16 network input.
pub const PREPROCESS: KernelSource = KernelSource {
    name: "preprocess.cu",
    body: include_str!("kernels/preprocess.cu"),
    fmad: false,
};

/// Head outputs -> top-k -> decoded boxes -> NMS -> detections.
pub const POSTPROCESS: KernelSource = KernelSource {
    name: "postprocess.cu",
    body: include_str!("kernels/postprocess.cu"),
    fmad: false,
};

/// The network's elementwise ops (activations, SE, residuals, BiFPN fusion, pooling, resize).
pub const ELEMENTWISE: KernelSource = KernelSource {
    name: "elementwise.cu",
    body: include_str!("kernels/elementwise.cu"),
    fmad: true,
};

/// Direct convolution with the fused epilogue (the reference path for every convolution).
pub const CONV: KernelSource = KernelSource {
    name: "conv.cu",
    body: include_str!("kernels/conv.cu"),
    fmad: true,
};

/// Every kernel source of the engine.
pub const SOURCES: [KernelSource; 4] = [PREPROCESS, POSTPROCESS, ELEMENTWISE, CONV];

/// Compute capabilities CI compiles every kernel for: Turing (T4), Ampere (A100), Jetson Orin,
/// Ada (L4, RTX 40xx), Hopper (H100/H200).
pub const CI_ARCHS: [u32; 5] = [75, 80, 87, 89, 90];

impl KernelSource {
    /// The text handed to NVRTC: the prelude, then the body (its `#include` of the prelude
    /// removed) starting at line 1 of its own file name.
    pub fn program_text(&self) -> String {
        let body = self.body.replace("#include \"prelude.cuh\"", "");
        format!("{PRELUDE}\n#line 1 \"{}\"\n{body}", self.name)
    }

    /// NVRTC options for compute capability `arch` (e.g. 90 for `sm_90`).
    pub fn options(&self, arch: u32) -> Vec<String> {
        vec![
            format!("--gpu-architecture=sm_{arch}"),
            "--std=c++17".into(),
            format!("--fmad={}", self.fmad),
            "--display-error-number".into(),
        ]
    }

    /// A stable 64-bit FNV-1a hash of everything that determines the PTX besides the NVRTC
    /// version: program text and options.
    pub fn fingerprint(&self, arch: u32) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let text = self.program_text();
        let opts = self.options(arch).join(" ");
        for b in text.bytes().chain([0u8]).chain(opts.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
}

/// Where compiled PTX is cached: `$EFFDET_KERNEL_CACHE`, else `$XDG_CACHE_HOME/effdet/kernels`,
/// else `$HOME/.cache/effdet/kernels`; `None` when none of these is set (no disk cache).
pub fn cache_dir() -> Option<std::path::PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = var("EFFDET_KERNEL_CACHE") {
        return Some(d.into());
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return Some(std::path::PathBuf::from(d).join("effdet/kernels"));
    }
    var("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/effdet/kernels"))
}

/// Is an NVRTC library (the one this build's CUDA version loads) on the library path?
pub fn nvrtc_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only probes whether the shared library can be opened.
        unsafe { cudarc::nvrtc::sys::is_culib_present() }
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// PTX for one source and architecture, with NVRTC's (empty) log.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub ptx: String,
    pub log: String,
}

#[cfg(feature = "cuda")]
mod nvrtc {
    use std::collections::HashMap;
    use std::ffi::{CString, c_char};
    use std::sync::{Arc, Mutex, OnceLock};

    use cudarc::nvrtc::{result, sys};

    use super::{Compiled, KernelSource, cache_dir};
    use crate::error::{Error, Result};

    fn unavailable() -> Error {
        Error::BackendUnavailable {
            backend: "cuda".into(),
            reason: "the NVRTC library (libnvrtc.so) is not on the library path; install the \
                     CUDA toolkit or pip's nvidia-cuda-nvrtc and add its lib folder to \
                     LD_LIBRARY_PATH"
                .into(),
        }
    }

    /// NVRTC's (major, minor) version.
    pub fn nvrtc_version() -> Result<(i32, i32)> {
        if !super::nvrtc_available() {
            return Err(unavailable());
        }
        let (mut major, mut minor) = (0, 0);
        // SAFETY: the library is present (checked above); both pointers are valid.
        let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
        r.result().map_err(|e| Error::Gpu {
            op: "nvrtcVersion".into(),
            reason: format!("{e:?}"),
        })?;
        Ok((major, minor))
    }

    fn text(raw: &[c_char]) -> String {
        let bytes: Vec<u8> = raw
            .iter()
            .map(|&c| c as u8)
            .take_while(|&b| b != 0)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Compiles `src` for `sm_<arch>`; any error or warning is [`Error::KernelCompile`].
    pub fn compile(src: &KernelSource, arch: u32) -> Result<Compiled> {
        if !super::nvrtc_available() {
            return Err(unavailable());
        }
        let failed = |log: String| Error::KernelCompile {
            kernel: src.name.into(),
            arch: format!("sm_{arch}"),
            log,
        };
        let gpu = |op: &str, e: result::NvrtcError| Error::Gpu {
            op: format!("{op} ({})", src.name),
            reason: format!("{e:?}"),
        };
        let code =
            CString::new(src.program_text()).map_err(|_| failed("NUL byte in source".into()))?;
        let name = CString::new(src.name).map_err(|_| failed("NUL byte in name".into()))?;
        let prog = result::create_program(code.as_c_str(), Some(name.as_c_str()))
            .map_err(|e| gpu("nvrtcCreateProgram", e))?;
        // SAFETY: `prog` was created above and is destroyed exactly once, below.
        let outcome = unsafe {
            let compiled = result::compile_program(prog, &src.options(arch));
            let log = result::get_program_log(prog)
                .map(|l| text(&l))
                .unwrap_or_default();
            let ptx = match compiled {
                Ok(()) => result::get_ptx(prog)
                    .map(|p| text(&p))
                    .map_err(|e| gpu("nvrtcGetPTX", e)),
                Err(e) => Err(failed(format!("{e:?}\n{log}"))),
            };
            let _ = result::destroy_program(prog);
            ptx.map(|ptx| Compiled { ptx, log })
        }?;
        if outcome.log.to_ascii_lowercase().contains("warning") {
            return Err(failed(outcome.log));
        }
        Ok(outcome)
    }

    type Key = (&'static str, u32);

    fn memory() -> &'static Mutex<HashMap<Key, Arc<String>>> {
        static CACHE: OnceLock<Mutex<HashMap<Key, Arc<String>>>> = OnceLock::new();
        CACHE.get_or_init(Default::default)
    }

    /// PTX for `src` on `sm_<arch>`: compiled once per process, and cached on disk (see
    /// [`super::cache_dir`]) keyed by source hash, architecture and NVRTC version. A cache
    /// folder that cannot be written only costs the compile; a damaged entry is recompiled.
    pub fn ptx(src: &KernelSource, arch: u32) -> Result<Arc<String>> {
        let key = (src.name, arch);
        // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
        if let Some(p) = memory().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(p.clone());
        }
        let (major, minor) = nvrtc_version()?;
        let file = cache_dir().map(|d| {
            d.join(format!(
                "{}-sm_{arch}-nvrtc{major}.{minor}-{:016x}.ptx",
                src.name.trim_end_matches(".cu"),
                src.fingerprint(arch)
            ))
        });
        let cached = file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .filter(|p| p.contains(".entry"));
        let ptx = match cached {
            Some(p) => {
                tracing::debug!(kernel = src.name, arch, "PTX from the disk cache");
                p
            }
            None => {
                let t = std::time::Instant::now();
                let p = compile(src, arch)?.ptx;
                tracing::debug!(
                    kernel = src.name,
                    arch,
                    ms = t.elapsed().as_millis() as u64,
                    "NVRTC compile"
                );
                if let Some(f) = &file
                    && let Err(e) = store(f, &p)
                {
                    tracing::warn!("kernel cache {}: {e}", f.display());
                }
                p
            }
        };
        let ptx = Arc::new(ptx);
        memory()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, ptx.clone());
        Ok(ptx)
    }

    fn store(file: &std::path::Path, ptx: &str) -> Result<()> {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        // A process-unique temporary name, then an atomic rename: concurrent processes
        // filling the same cache never see (or leave) a half-written entry.
        let tmp = file.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&tmp, ptx)
            .and_then(|()| std::fs::rename(&tmp, file))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                Error::io(file, e)
            })
    }
}

#[cfg(feature = "cuda")]
pub use nvrtc::{compile, nvrtc_version, ptx};

/// Without the `cuda` feature nothing can be compiled.
#[cfg(not(feature = "cuda"))]
pub fn compile(src: &KernelSource, _arch: u32) -> Result<Compiled> {
    Err(Error::BackendUnavailable {
        backend: "cuda".into(),
        reason: format!(
            "this build has no CUDA support (cannot compile {})",
            src.name
        ),
    })
}
