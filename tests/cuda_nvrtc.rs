//! Every CUDA kernel source compiles cleanly (no error, no warning) with NVRTC for every
//! architecture CI targets: sm_75, sm_80, sm_87, sm_89, sm_90, to a CUBIN (what the engine
//! loads) and to PTX (the fallback for GPUs newer than the NVRTC). Runs without a GPU: NVRTC
//! only needs its library (pip's `nvidia-cuda-nvrtc`, which `scripts/test.sh` installs).
//!
//! Without NVRTC on the library path these tests say so and pass, unless
//! `EFFDET_REQUIRE_NVRTC=1` (set by the README's test command), which makes absence a failure.
#![cfg(feature = "cuda")]

use effdet::compute::cuda::kernels::{self, CI_ARCHS, KernelSource, ModuleForm, SOURCES};
use effdet::error::Error;

fn nvrtc_or_skip(test: &str) -> bool {
    if kernels::nvrtc_available() {
        return true;
    }
    let required = std::env::var("EFFDET_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{test}: EFFDET_REQUIRE_NVRTC=1 but libnvrtc.so.13 is not on LD_LIBRARY_PATH"
    );
    eprintln!(
        "{test}: skipped, NVRTC not found (pip install nvidia-cuda-nvrtc, add its lib to LD_LIBRARY_PATH)"
    );
    false
}

#[test]
fn every_kernel_compiles_for_every_ci_architecture() {
    if !nvrtc_or_skip("every_kernel_compiles_for_every_ci_architecture") {
        return;
    }
    let (major, minor) = kernels::nvrtc_version().unwrap();
    let mut failures = Vec::new();
    for src in &SOURCES {
        for arch in CI_ARCHS {
            match kernels::compile(src, arch) {
                Ok(c) => {
                    assert_eq!(c.form, ModuleForm::Cubin);
                    assert!(
                        c.ptx.contains(".entry"),
                        "{} sm_{arch}: no kernel in the PTX",
                        src.name
                    );
                    assert!(
                        c.ptx.contains(&format!(".target sm_{arch}")),
                        "{} sm_{arch}: wrong target",
                        src.name
                    );
                    let cubin = c.cubin.as_deref().unwrap_or_default();
                    assert!(
                        cubin.starts_with(b"\x7fELF") && cubin.len() > 1024,
                        "{} sm_{arch}: no CUBIN ({} bytes)",
                        src.name,
                        cubin.len()
                    );
                    // Line information for profilers and compute-sanitizer.
                    assert!(
                        c.ptx.contains(".loc"),
                        "{} sm_{arch}: no line information",
                        src.name
                    );
                }
                Err(e) => failures.push(e.to_string()),
            }
            // The PTX fallback (for a GPU newer than this NVRTC) builds too.
            match kernels::compile_as(src, ModuleForm::Ptx, arch) {
                Ok(c) => assert!(
                    c.cubin.is_none() && c.ptx.contains(&format!(".target sm_{arch}")),
                    "{} compute_{arch}: PTX for the wrong target",
                    src.name
                ),
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "NVRTC {major}.{minor}:\n{}",
        failures.join("\n\n")
    );
}

#[test]
fn a_warning_fails_the_compile() {
    if !nvrtc_or_skip("a_warning_fails_the_compile") {
        return;
    }
    let bad = KernelSource {
        name: "unused.cu",
        body: "#include \"prelude.cuh\"\nextern \"C\" __global__ void k(float* x) { int unused; x[0] = 1.0f; }\n",
        fmad: true,
    };
    match kernels::compile(&bad, 90) {
        Err(Error::KernelCompile { kernel, arch, log }) => {
            assert_eq!(kernel, "unused.cu");
            assert_eq!(arch, "sm_90");
            assert!(
                log.contains("unused.cu(2)"),
                "the log names the file and line: {log}"
            );
        }
        other => panic!("expected a KernelCompile error, got {other:?}"),
    }
    let broken = KernelSource {
        body: "extern \"C\" __global__ void k( {",
        ..bad
    };
    assert!(matches!(
        kernels::compile(&broken, 80),
        Err(Error::KernelCompile { .. })
    ));
}

#[test]
fn compiled_modules_are_cached_on_disk_by_form_source_arch_and_version() {
    if !nvrtc_or_skip("compiled_modules_are_cached_on_disk_by_form_source_arch_and_version") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Only this test in this binary reads the cache location.
    // SAFETY: set before any thread of this test binary reads the variable.
    unsafe { std::env::set_var("EFFDET_KERNEL_CACHE", dir.path()) };
    let src = &kernels::PREPROCESS;
    let version = kernels::nvrtc_version().unwrap();
    // What a sm_89 GPU gets from this NVRTC: a CUBIN for sm_89.
    let first = kernels::module_for_device(src, 89).unwrap();
    assert_eq!((first.form, first.arch), (ModuleForm::Cubin, 89));
    assert!(first.is_intact());
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "one cache entry: {files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(
        name,
        kernels::cache_file_name(src, ModuleForm::Cubin, 89, version)
    );
    assert!(name.starts_with("preprocess-sm_89-nvrtc"), "{name}");
    assert!(name.ends_with(".cubin"), "{name}");
    assert_eq!(std::fs::read(&files[0]).unwrap(), first.bytes);
    // Same process: served from memory, the same Arc.
    assert!(std::sync::Arc::ptr_eq(
        &first,
        &kernels::module_for_device(src, 89).unwrap()
    ));
    // The PTX form is a different entry of its own.
    let ptx = kernels::module(src, ModuleForm::Ptx, 89).unwrap();
    assert!(
        ptx.is_intact() && ptx.ptx_isa().is_some(),
        "PTX with its ISA version"
    );
    assert!(
        dir.path()
            .join(kernels::cache_file_name(src, ModuleForm::Ptx, 89, version))
            .exists()
    );
    // A damaged entry (truncated by a crash, say) is recompiled and replaced.
    let post = &kernels::POSTPROCESS;
    let damaged = dir.path().join(kernels::cache_file_name(
        post,
        ModuleForm::Cubin,
        80,
        version,
    ));
    std::fs::write(&damaged, b"\x7fELF\x02\x01").unwrap();
    let fresh = kernels::module(post, ModuleForm::Cubin, 80).unwrap();
    assert!(fresh.is_intact());
    assert_eq!(std::fs::read(&damaged).unwrap(), fresh.bytes);
    // The fingerprint follows the source, the options, the form and the architecture.
    let c = ModuleForm::Cubin;
    assert_ne!(src.fingerprint(c, 89), src.fingerprint(c, 90));
    assert_ne!(src.fingerprint(c, 89), src.fingerprint(ModuleForm::Ptx, 89));
    assert_ne!(
        src.fingerprint(c, 89),
        kernels::POSTPROCESS.fingerprint(c, 89)
    );
}

/// This NVRTC emits CUBINs for every CI architecture, and a GPU newer than it gets PTX for the
/// newest architecture it knows.
#[test]
fn the_module_form_follows_what_nvrtc_supports() {
    if !nvrtc_or_skip("the_module_form_follows_what_nvrtc_supports") {
        return;
    }
    let supported = kernels::supported_archs().unwrap();
    for arch in CI_ARCHS {
        assert!(supported.contains(&arch), "sm_{arch} not in {supported:?}");
        assert_eq!(
            kernels::choose_form(&supported, arch).unwrap(),
            (ModuleForm::Cubin, arch)
        );
    }
    let newest = *supported.last().unwrap();
    assert_eq!(
        kernels::choose_form(&supported, newest + 1).unwrap(),
        (ModuleForm::Ptx, newest)
    );
}

/// `EFFDET_NVRTC_VERBOSE=1` gets ptxas's register and spill report into the compile log (the
/// GPU lane's tune.log shows it); it is information, not a warning, so the compile succeeds.
#[test]
fn ptxas_reports_registers_and_spills_when_asked() {
    if !nvrtc_or_skip("ptxas_reports_registers_and_spills_when_asked") {
        return;
    }
    // Other tests here may see the variable too: it only adds the report to their logs.
    // SAFETY: no thread of this binary writes the environment concurrently; readers of this
    // variable only read it.
    unsafe { std::env::set_var("EFFDET_NVRTC_VERBOSE", "1") };
    let c = kernels::compile(&kernels::CONV, 90).unwrap();
    assert!(c.log.contains("registers"), "{}", c.log);
    assert!(c.log.contains("spill"), "{}", c.log);
}
