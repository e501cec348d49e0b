//! The CUDA driver as found on a user's machine, without a GPU:
//!
//! - a CUDA toolkit's *stub* `libcuda.so` first on the library path loses to the driver's own
//!   `libcuda.so.1` further down (cudarc, patched in vendor/cudarc, opens the soname first);
//! - where there is only the stub, it is reported as such, with its path, instead of a bare
//!   `CUDA_ERROR_STUB_LIBRARY` or a panic.
//!
//! The stub and the stand-in driver are small C libraries built here with `cc`: the stub answers
//! every call with `CUDA_ERROR_STUB_LIBRARY` (34) as NVIDIA's does; the stand-in initialises and
//! reports no GPU. The library path is read by the dynamic loader at process start, so each
//! check runs in a child process (this test binary again, for an `#[ignore]`d child test).
#![cfg(all(feature = "cuda", target_os = "linux"))]

use std::process::Command;

use effdet::compute::cuda::GpuContext;
use effdet::error::Error;

const STUB: &str = r#"
int cuInit(unsigned int flags) { (void)flags; return 34; }
int cuDriverGetVersion(int *v) { (void)v; return 34; }
int cuDeviceGetCount(int *n) { (void)n; return 34; }
"#;

/// A driver that starts and has no GPU.
const DRIVER: &str = r#"
int cuInit(unsigned int flags) { (void)flags; return 0; }
int cuDriverGetVersion(int *v) { *v = 13000; return 0; }
int cuDeviceGetCount(int *n) { *n = 0; return 0; }
"#;

/// The `libcuda*` files mapped into this process.
fn mapped_libcuda() -> Vec<String> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.contains("/libcuda."))
        .map(str::to_string)
        .collect()
}

/// Builds `code` into `dir/name` with `cc`.
fn build(dir: &std::path::Path, name: &str, code: &str) {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, code).unwrap();
    let cc = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(dir.join(name))
        .arg(&src)
        .output()
        .expect("a C compiler (cc) to build the stand-in libraries");
    assert!(
        cc.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
}

/// Runs the ignored test `child` of this binary with `dirs` first on `LD_LIBRARY_PATH`.
fn run_child(child: &str, dirs: &[&std::path::Path]) {
    let mut path: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    if let Ok(p) = std::env::var("LD_LIBRARY_PATH")
        && !p.is_empty()
    {
        path.push(p);
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", child, "--ignored", "--nocapture"])
        .env("LD_LIBRARY_PATH", path.join(":"))
        .env("EFFDET_TEST_STUB_DIR", dirs[0])
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{child} failed:\n{log}");
    assert!(log.contains("1 passed"), "{child} ran:\n{log}");
}

/// Whether this machine has a loadable NVIDIA driver of its own (then the stub-only case
/// cannot be set up: the real `libcuda.so.1` is found first, as it should be).
fn system_driver() -> bool {
    // SAFETY: only opens and closes the library.
    unsafe { libloading::Library::new("libcuda.so.1") }.is_ok()
}

fn nvrtc_or_skip() -> bool {
    if effdet::compute::cuda::kernels::nvrtc_available() {
        return true;
    }
    // The probe checks NVRTC before the driver: without it the driver is never reached.
    let required = std::env::var("EFFDET_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "EFFDET_REQUIRE_NVRTC=1 but NVRTC is not loadable"
    );
    eprintln!("skipped: NVRTC not on the library path");
    false
}

/// The child: the stub's folder is first on the path, the stand-in driver's second.
#[test]
#[ignore = "run by the_driver_soname_wins_over_a_stub_first_on_the_path, in a child process"]
fn child_opens_a_gpu_with_a_stub_and_the_driver_on_the_path() {
    let e = GpuContext::new(0).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("reports no GPU"),
        "the stand-in driver answered, not the stub: {text}"
    );
    let mapped = mapped_libcuda();
    assert!(
        mapped.iter().all(|p| p.ends_with("libcuda.so.1")),
        "only the driver's soname is loaded: {mapped:?}"
    );
}

#[test]
fn the_driver_soname_wins_over_a_stub_first_on_the_path() {
    if !nvrtc_or_skip() {
        return;
    }
    let (stub, driver) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    build(stub.path(), "libcuda.so", STUB);
    build(driver.path(), "libcuda.so.1", DRIVER);
    run_child(
        "child_opens_a_gpu_with_a_stub_and_the_driver_on_the_path",
        &[stub.path(), driver.path()],
    );
}

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
    if !nvrtc_or_skip() {
        return;
    }
    if system_driver() {
        eprintln!("skipped: this machine's own libcuda.so.1 is found before any stub");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), "libcuda.so", STUB);
    run_child(
        "child_opens_a_gpu_with_the_stub_first_on_the_path",
        &[dir.path()],
    );
}
