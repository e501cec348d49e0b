//! The CUDA kernel sources and their run-time compilation by NVRTC.
//!
//! Each `.cu` file under `src/compute/cuda/kernels/` is embedded in the binary together with
//! the shared `prelude.cuh` (NVRTC gets no include path: the prelude is pasted in front of the
//! source, with a `#line` directive so that messages name the right file and line).
//!
//! **What is loaded: CUBIN, not PTX.** A source is compiled for the device's exact architecture
//! (`--gpu-architecture=sm_XX`) and the driver loads the resulting CUBIN (`nvrtcGetCUBIN`).
//! PTX would have to be JIT-compiled by the driver, and a driver JITs only PTX up to its own
//! CUDA version's ISA: NVRTC 13.5 writes PTX ISA 9.5, which a CUDA 13.0 driver (580) refuses,
//! so a PTX built by an NVRTC newer than the driver fails every module load. A CUBIN has no
//! such dependency. PTX ([`ModuleForm::Ptx`], for `compute_XX`) is used only where this NVRTC
//! cannot emit code for the device's architecture (a GPU newer than the NVRTC): then the
//! newest architecture it knows below the device's, which the driver JITs forward
//! ([`choose_form`]). Line information (`--generate-line-info`) is always on, for profilers
//! and `compute-sanitizer`.
//!
//! A compiled module is cached in memory for the process and on disk under [`cache_dir`],
//! keyed by the form, the architecture, the NVRTC version and a hash of the program text and
//! options, so later processes load without compiling.
//!
//! Compilation is strict: any warning in NVRTC's log is an error ([`Error::KernelCompile`]).
//! CI compiles every source for every architecture in [`CI_ARCHS`] with pip's NVRTC
//! (`tests/cuda_nvrtc.rs`), so a kernel that does not build never reaches a GPU.

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

/// The form a kernel module is compiled to and loaded in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModuleForm {
    /// Machine code for one exact architecture (`sm_XX`): no JIT, no PTX-version dependency.
    Cubin,
    /// PTX for a virtual architecture (`compute_XX`), JIT-compiled by the driver at load.
    Ptx,
}

impl ModuleForm {
    /// The file extension of a cached module in this form.
    pub fn extension(self) -> &'static str {
        match self {
            ModuleForm::Cubin => "cubin",
            ModuleForm::Ptx => "ptx",
        }
    }
}

impl std::fmt::Display for ModuleForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModuleForm::Cubin => "CUBIN",
            ModuleForm::Ptx => "PTX",
        })
    }
}

/// What to compile for a GPU of architecture `device_arch` with an NVRTC that emits code for
/// the architectures `supported` (`nvrtcGetSupportedArchs`): a CUBIN for the device itself when
/// NVRTC knows it; otherwise PTX for the newest known architecture below it (the driver JITs
/// PTX forward to newer GPUs). Errors when the device is older than everything NVRTC supports.
pub fn choose_form(supported: &[u32], device_arch: u32) -> Result<(ModuleForm, u32)> {
    if supported.contains(&device_arch) {
        return Ok((ModuleForm::Cubin, device_arch));
    }
    match supported.iter().copied().filter(|&a| a < device_arch).max() {
        Some(a) => Ok((ModuleForm::Ptx, a)),
        None => Err(Error::BackendUnavailable {
            backend: "cuda".into(),
            reason: format!(
                "this GPU is sm_{device_arch}, older than every architecture this NVRTC \
                 compiles for ({}); use an NVRTC of an older CUDA version (and a build with \
                 its `cuda-*` feature)",
                arch_list(supported)
            ),
        }),
    }
}

fn arch_list(archs: &[u32]) -> String {
    match (archs.iter().min(), archs.iter().max()) {
        (Some(lo), Some(hi)) => format!("sm_{lo}..sm_{hi}"),
        _ => "none".into(),
    }
}

impl KernelSource {
    /// The text handed to NVRTC: the prelude, then the body (its `#include` of the prelude
    /// removed) starting at line 1 of its own file name.
    pub fn program_text(&self) -> String {
        let body = self.body.replace("#include \"prelude.cuh\"", "");
        format!("{PRELUDE}\n#line 1 \"{}\"\n{body}", self.name)
    }

    /// NVRTC options for compute capability `arch` (e.g. 90): `sm_90` for a CUBIN (NVRTC then
    /// also gives the PTX), `compute_90` for PTX alone. Line information is always on. With
    /// `EFFDET_NVRTC_VERBOSE=1` a CUBIN build also asks ptxas for its register, spill and
    /// shared-memory report (`--ptxas-options=-v`), which [`compile_as`] logs.
    pub fn options(&self, form: ModuleForm, arch: u32) -> Vec<String> {
        let target = match form {
            ModuleForm::Cubin => format!("--gpu-architecture=sm_{arch}"),
            ModuleForm::Ptx => format!("--gpu-architecture=compute_{arch}"),
        };
        let mut o = vec![
            target,
            "--std=c++17".into(),
            format!("--fmad={}", self.fmad),
            "--generate-line-info".into(),
            "--display-error-number".into(),
        ];
        if form == ModuleForm::Cubin && verbose() {
            o.push("--ptxas-options=-v".into());
        }
        o
    }

    /// A stable 64-bit FNV-1a hash of everything that determines the module besides the NVRTC
    /// version: program text and options (which carry the form and the architecture).
    pub fn fingerprint(&self, form: ModuleForm, arch: u32) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let text = self.program_text();
        let opts = self.options(form, arch).join(" ");
        for b in text.bytes().chain([0u8]).chain(opts.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
}

fn verbose() -> bool {
    std::env::var("EFFDET_NVRTC_VERBOSE").is_ok_and(|v| v == "1")
}

/// Where compiled modules are cached: `$EFFDET_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/effdet/kernels`, else `$HOME/.cache/effdet/kernels`; `None` when none of
/// these is set (no disk cache).
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

/// One compiled source: its PTX, its CUBIN when compiled for a real architecture, and NVRTC's
/// (empty) log.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub form: ModuleForm,
    pub arch: u32,
    pub ptx: String,
    /// The ELF image for `sm_<arch>` ([`ModuleForm::Cubin`] only).
    pub cubin: Option<Vec<u8>>,
    pub log: String,
}

/// A module ready for the driver: the bytes of a CUBIN, or PTX text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleImage {
    pub form: ModuleForm,
    /// The architecture it was compiled for (the device's for a CUBIN).
    pub arch: u32,
    pub bytes: Vec<u8>,
}

impl ModuleImage {
    /// Whether `bytes` look like an intact module of this form (an ELF header for a CUBIN, a
    /// kernel entry for PTX): a cache entry cut short by a crash fails this and is rebuilt.
    pub fn is_intact(&self) -> bool {
        match self.form {
            ModuleForm::Cubin => self.bytes.len() > 64 && self.bytes.starts_with(b"\x7fELF"),
            ModuleForm::Ptx => std::str::from_utf8(&self.bytes).is_ok_and(|p| p.contains(".entry")),
        }
    }

    /// The PTX ISA version a PTX image declares (`.version 9.5` -> (9, 5)).
    pub fn ptx_isa(&self) -> Option<(u32, u32)> {
        let text = std::str::from_utf8(&self.bytes).ok()?;
        let v = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(".version "))?;
        let (major, minor) = v.trim().split_once('.')?;
        Some((major.parse().ok()?, minor.parse().ok()?))
    }
}

#[cfg(feature = "cuda")]
mod nvrtc {
    use std::collections::HashMap;
    use std::ffi::{CString, c_char};
    use std::sync::{Arc, Mutex, OnceLock};

    use cudarc::nvrtc::{result, sys};

    use super::{Compiled, KernelSource, ModuleForm, ModuleImage, cache_dir, choose_form};
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

    fn nvrtc_call(op: &str, r: sys::nvrtcResult) -> Result<()> {
        r.result().map_err(|e| Error::Gpu {
            op: op.into(),
            reason: format!("{e:?}"),
        })
    }

    /// NVRTC's (major, minor) version.
    pub fn nvrtc_version() -> Result<(i32, i32)> {
        if !super::nvrtc_available() {
            return Err(unavailable());
        }
        let (mut major, mut minor) = (0, 0);
        // SAFETY: the library is present (checked above); both pointers are valid.
        nvrtc_call("nvrtcVersion", unsafe {
            sys::nvrtcVersion(&mut major, &mut minor)
        })?;
        Ok((major, minor))
    }

    /// The real architectures (`sm_XX`) this NVRTC emits code for, ascending.
    pub fn supported_archs() -> Result<Vec<u32>> {
        if !super::nvrtc_available() {
            return Err(unavailable());
        }
        static ARCHS: OnceLock<Vec<u32>> = OnceLock::new();
        if let Some(a) = ARCHS.get() {
            return Ok(a.clone());
        }
        let mut n = 0;
        // SAFETY: the library is present; `n` is valid.
        nvrtc_call("nvrtcGetNumSupportedArchs", unsafe {
            sys::nvrtcGetNumSupportedArchs(&mut n)
        })?;
        let mut raw = vec![0i32; n.max(0) as usize];
        // SAFETY: `raw` holds the `n` entries NVRTC writes.
        nvrtc_call("nvrtcGetSupportedArchs", unsafe {
            sys::nvrtcGetSupportedArchs(raw.as_mut_ptr())
        })?;
        let mut archs: Vec<u32> = raw
            .into_iter()
            .filter_map(|a| u32::try_from(a).ok())
            .collect();
        archs.sort_unstable();
        Ok(ARCHS.get_or_init(|| archs).clone())
    }

    fn text(raw: &[c_char]) -> String {
        let bytes: Vec<u8> = raw
            .iter()
            .map(|&c| c as u8)
            .take_while(|&b| b != 0)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The CUBIN of a program compiled for a real architecture.
    ///
    /// # Safety
    /// `prog` must be a live program that compiled successfully.
    unsafe fn get_cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>> {
        let mut size = 0usize;
        // SAFETY: the caller's contract; `size` is valid.
        nvrtc_call("nvrtcGetCUBINSize", unsafe {
            sys::nvrtcGetCUBINSize(prog, &mut size)
        })?;
        let mut bytes = vec![0u8; size];
        // SAFETY: `bytes` holds the `size` bytes NVRTC writes.
        nvrtc_call("nvrtcGetCUBIN", unsafe {
            sys::nvrtcGetCUBIN(prog, bytes.as_mut_ptr().cast())
        })?;
        Ok(bytes)
    }

    /// Compiles `src` for `sm_<arch>` (PTX and CUBIN); any error or warning is
    /// [`Error::KernelCompile`].
    pub fn compile(src: &KernelSource, arch: u32) -> Result<Compiled> {
        compile_as(src, ModuleForm::Cubin, arch)
    }

    /// Compiles `src` in `form` for `arch` (`sm_<arch>` for a CUBIN, `compute_<arch>` for PTX).
    pub fn compile_as(src: &KernelSource, form: ModuleForm, arch: u32) -> Result<Compiled> {
        if !super::nvrtc_available() {
            return Err(unavailable());
        }
        let target = match form {
            ModuleForm::Cubin => format!("sm_{arch}"),
            ModuleForm::Ptx => format!("compute_{arch}"),
        };
        let failed = |log: String| Error::KernelCompile {
            kernel: src.name.into(),
            arch: target.clone(),
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
            let compiled = result::compile_program(prog, &src.options(form, arch));
            let log = result::get_program_log(prog)
                .map(|l| text(&l))
                .unwrap_or_default();
            let built = match compiled {
                Ok(()) => result::get_ptx(prog)
                    .map(|p| text(&p))
                    .map_err(|e| gpu("nvrtcGetPTX", e))
                    .and_then(|ptx| {
                        let cubin = match form {
                            ModuleForm::Cubin => Some(get_cubin(prog)?),
                            ModuleForm::Ptx => None,
                        };
                        Ok((ptx, cubin))
                    }),
                Err(e) => Err(failed(format!("{e:?}\n{log}"))),
            };
            let _ = result::destroy_program(prog);
            built.map(|(ptx, cubin)| Compiled {
                form,
                arch,
                ptx,
                cubin,
                log,
            })
        }?;
        if outcome.log.to_ascii_lowercase().contains("warning") {
            return Err(failed(outcome.log));
        }
        if super::verbose() && !outcome.log.trim().is_empty() {
            tracing::info!(kernel = src.name, %form, arch, "NVRTC/ptxas report:\n{}", outcome.log.trim());
        }
        Ok(outcome)
    }

    type Key = (&'static str, ModuleForm, u32);

    fn memory() -> &'static Mutex<HashMap<Key, Arc<ModuleImage>>> {
        static CACHE: OnceLock<Mutex<HashMap<Key, Arc<ModuleImage>>>> = OnceLock::new();
        CACHE.get_or_init(Default::default)
    }

    /// The module for `src` on a GPU of architecture `device_arch`, in the form
    /// [`choose_form`] picks for this NVRTC.
    pub fn module_for_device(src: &KernelSource, device_arch: u32) -> Result<Arc<ModuleImage>> {
        let (form, arch) = choose_form(&supported_archs()?, device_arch)?;
        module(src, form, arch)
    }

    /// The module for `src` in `form` for `arch`: compiled once per process, and cached on
    /// disk (see [`super::cache_dir`]) keyed by form, architecture, NVRTC version and source
    /// hash. A cache folder that cannot be written only costs the compile; a damaged entry is
    /// recompiled and replaced.
    pub fn module(src: &KernelSource, form: ModuleForm, arch: u32) -> Result<Arc<ModuleImage>> {
        let key = (src.name, form, arch);
        // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
        if let Some(m) = memory().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(m.clone());
        }
        let (major, minor) = nvrtc_version()?;
        let file = cache_dir().map(|d| d.join(cache_file_name(src, form, arch, (major, minor))));
        let cached = file
            .as_ref()
            .and_then(|f| std::fs::read(f).ok())
            .map(|bytes| ModuleImage { form, arch, bytes })
            .filter(ModuleImage::is_intact);
        let image = match cached {
            Some(m) => {
                tracing::debug!(kernel = src.name, %form, arch, "module from the disk cache");
                m
            }
            None => {
                let t = std::time::Instant::now();
                let c = compile_as(src, form, arch)?;
                let bytes = match c.cubin {
                    Some(cubin) => cubin,
                    None => c.ptx.into_bytes(),
                };
                tracing::debug!(
                    kernel = src.name,
                    %form,
                    arch,
                    bytes = bytes.len(),
                    ms = t.elapsed().as_millis() as u64,
                    "NVRTC compile"
                );
                let m = ModuleImage { form, arch, bytes };
                if let Some(f) = &file
                    && let Err(e) = store(f, &m.bytes)
                {
                    tracing::warn!("kernel cache {}: {e}", f.display());
                }
                m
            }
        };
        let image = Arc::new(image);
        memory()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, image.clone());
        Ok(image)
    }

    /// `conv-sm_90-nvrtc13.5-<hash>.cubin`, `conv-compute_90-nvrtc13.5-<hash>.ptx`.
    pub fn cache_file_name(
        src: &KernelSource,
        form: ModuleForm,
        arch: u32,
        (major, minor): (i32, i32),
    ) -> String {
        let target = match form {
            ModuleForm::Cubin => "sm",
            ModuleForm::Ptx => "compute",
        };
        format!(
            "{}-{target}_{arch}-nvrtc{major}.{minor}-{:016x}.{}",
            src.name.trim_end_matches(".cu"),
            src.fingerprint(form, arch),
            form.extension()
        )
    }

    fn store(file: &std::path::Path, bytes: &[u8]) -> Result<()> {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        // A process-unique temporary name, then an atomic rename: concurrent processes
        // filling the same cache never see (or leave) a half-written entry.
        let tmp = file.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, file))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                Error::io(file, e)
            })
    }
}

#[cfg(feature = "cuda")]
pub use nvrtc::{
    cache_file_name, compile, compile_as, module, module_for_device, nvrtc_version, supported_archs,
};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_architecture_gets_a_cubin_a_newer_one_ptx_an_older_one_an_error() {
        let nvrtc = [75, 80, 86, 87, 89, 90, 100, 120];
        assert_eq!(choose_form(&nvrtc, 90).unwrap(), (ModuleForm::Cubin, 90));
        assert_eq!(choose_form(&nvrtc, 75).unwrap(), (ModuleForm::Cubin, 75));
        // A Blackwell variant this NVRTC does not list: PTX of the newest below it.
        assert_eq!(choose_form(&nvrtc, 103).unwrap(), (ModuleForm::Ptx, 100));
        assert_eq!(choose_form(&nvrtc, 121).unwrap(), (ModuleForm::Ptx, 120));
        let e = choose_form(&nvrtc, 70).unwrap_err().to_string();
        assert!(e.contains("sm_70") && e.contains("sm_75..sm_120"), "{e}");
        assert!(choose_form(&[], 90).is_err());
    }

    #[test]
    fn damaged_images_are_recognised_and_the_ptx_isa_is_read() {
        let image = |form, bytes: &[u8]| ModuleImage {
            form,
            arch: 90,
            bytes: bytes.to_vec(),
        };
        let mut elf = b"\x7fELF".to_vec();
        elf.resize(200, 0);
        assert!(image(ModuleForm::Cubin, &elf).is_intact());
        assert!(!image(ModuleForm::Cubin, &elf[..10]).is_intact());
        assert!(!image(ModuleForm::Cubin, b".version 9.0 .entry").is_intact());
        let ptx = b"//\n// Generated by NVRTC\n.version 9.5\n.target sm_90\n.visible .entry k()\n";
        assert!(image(ModuleForm::Ptx, ptx).is_intact());
        assert_eq!(image(ModuleForm::Ptx, ptx).ptx_isa(), Some((9, 5)));
        assert!(!image(ModuleForm::Ptx, b".version 9.5\n").is_intact());
        assert_eq!(image(ModuleForm::Ptx, b"no version").ptx_isa(), None);
    }

    #[test]
    fn options_name_the_form_and_carry_line_info() {
        let o = CONV.options(ModuleForm::Cubin, 90);
        assert!(o.contains(&"--gpu-architecture=sm_90".to_string()));
        assert!(o.contains(&"--generate-line-info".to_string()));
        let o = CONV.options(ModuleForm::Ptx, 90);
        assert!(o.contains(&"--gpu-architecture=compute_90".to_string()));
    }
}
