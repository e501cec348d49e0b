//! The CUDA driver as found on a user's machine, without a GPU: a CUDA toolkit's *stub*
//! `libcuda.so` earlier on the library path than the real driver is reported as such (with its
//! path), instead of a bare `CUDA_ERROR_STUB_LIBRARY` or a panic.
//!
//! The stub is a three-function C library built here with `cc`, behaving as NVIDIA's does
//! (every call returns `CUDA_ERROR_STUB_LIBRARY`, 34). The library path is read by the dynamic
//! loader at process start, so the check runs in a child process (this test binary again,
//! for the `#[ignore]`d child test) started with the stub's folder first on
//! `LD_LIBRARY_PATH`.
#![cfg(all(feature = "cuda", target_os = "linux"))]

use std::process::Command;

use effdet::compute::cuda::GpuContext;
use effdet::error::Error;

const STUB: &str = r#"
int cuInit(unsigned int flags) { (void)flags; return 34; }
int cuDriverGetVersion(int *v) { (void)v; return 34; }
int cuDeviceGetCount(int *n) { (void)n; return 34; }
"#;

/// The child: with the stub first on the path, opening a GPU names the stub.
#[test]
#[ignore = "run by a_stub_libcuda_is_named_with_its_path, in a child process"]
fn child_opens_a_gpu_with_the_stub_first_on_the_path() {
    let stub_dir = std::env::var("EFFDET_TEST_STUB_DIR").expect("set by the parent test");
    let e = GpuContext::new(0).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, Error::BackendUnavailable { .. }), "{text}");
    assert!(text.contains("stub"), "{text}");
    assert!(
        text.contains(&format!("{stub_dir}/libcuda.so")),
        "the message names the stub's path: {text}"
    );
    assert!(text.contains("LD_LIBRARY_PATH"), "and the fix: {text}");
    println!("error as the user sees it: {text}");
}

#[test]
fn a_stub_libcuda_is_named_with_its_path() {
    if !effdet::compute::cuda::kernels::nvrtc_available() {
        // The probe checks NVRTC before the driver: without it the stub is never reached.
        let required = std::env::var("EFFDET_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "EFFDET_REQUIRE_NVRTC=1 but NVRTC is not loadable"
        );
        eprintln!("skipped: NVRTC not on the library path");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("stub.c");
    std::fs::write(&src, STUB).unwrap();
    let lib = dir.path().join("libcuda.so");
    let cc = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .expect("a C compiler (cc) to build the stub");
    assert!(
        cc.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", dir.path().display()),
        _ => dir.path().display().to_string(),
    };
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_opens_a_gpu_with_the_stub_first_on_the_path",
            "--ignored",
            "--nocapture",
        ])
        .env("LD_LIBRARY_PATH", path)
        .env("EFFDET_TEST_STUB_DIR", dir.path())
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    assert!(child.status.success(), "child failed:\n{log}");
    assert!(log.contains("1 passed"), "the child test ran:\n{log}");
}
