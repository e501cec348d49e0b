//! Every CUDA kernel source compiles cleanly (no error, no warning) with NVRTC for every
//! architecture CI targets: sm_75, sm_80, sm_87, sm_89, sm_90. Runs without a GPU: NVRTC only
//! needs its library (pip's `nvidia-cuda-nvrtc`, which `scripts/test.sh` installs).
//!
//! Without NVRTC on the library path these tests say so and pass, unless
//! `EFFDET_REQUIRE_NVRTC=1` (set by the README's test command), which makes absence a failure.
#![cfg(feature = "cuda")]

use effdet::compute::cuda::kernels::{self, CI_ARCHS, KernelSource, SOURCES};
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
                }
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
fn compiled_ptx_is_cached_on_disk_by_source_arch_and_version() {
    if !nvrtc_or_skip("compiled_ptx_is_cached_on_disk_by_source_arch_and_version") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Only this test in this binary reads the cache location.
    // SAFETY: set before any thread of this test binary reads the variable.
    unsafe { std::env::set_var("EFFDET_KERNEL_CACHE", dir.path()) };
    let src = &kernels::PREPROCESS;
    let first = kernels::ptx(src, 89).unwrap();
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "one cache entry: {files:?}");
    let (major, minor) = kernels::nvrtc_version().unwrap();
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("preprocess-sm_89-"), "{name}");
    assert!(
        name.contains(&format!(
            "nvrtc{major}.{minor}-{:016x}",
            src.fingerprint(89)
        )),
        "{name}"
    );
    assert_eq!(std::fs::read_to_string(&files[0]).unwrap(), *first);
    // Same process: served from memory, the same Arc.
    assert!(std::sync::Arc::ptr_eq(
        &first,
        &kernels::ptx(src, 89).unwrap()
    ));
    // The fingerprint follows the source, the options and the architecture.
    assert_ne!(src.fingerprint(89), src.fingerprint(90));
    assert_ne!(src.fingerprint(89), kernels::POSTPROCESS.fingerprint(89));
}
