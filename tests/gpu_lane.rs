//! The GPU lane's script (`scripts/gpu/run.sh`) on a machine without a GPU, as CI is: it must
//! stop within seconds, say why, exit non-zero, and still leave exactly its eight result files
//! (the device returns at most eight) with the reason in each, writing nothing else under
//! `$OUT`. What it does on a GPU is checked on the GPU host itself (scripts/gpu/README.md).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const FILES: [&str; 8] = [
    "bench/machine.txt",
    "bench/ours.jsonl",
    "bench/peer.jsonl",
    "ncu.txt",
    "run.log",
    "sanitizer.log",
    "tests.log",
    "tune.log",
];

fn files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                found.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    found.sort();
    found
}

#[test]
fn without_a_gpu_the_lane_stops_at_once_and_leaves_its_eight_files() {
    if Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("skipped: this machine has a GPU (the lane would run for minutes)");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu/run.sh");
    let t = Instant::now();
    let run = Command::new("bash")
        .arg(&script)
        .env("OUT", out.path())
        .env("EFFDET_LANE_WORK", work.path())
        .env_remove("EFFDET_LANE_DRY")
        .output()
        .unwrap();
    let took = t.elapsed();
    let log = String::from_utf8_lossy(&run.stdout);
    assert_eq!(
        run.status.code(),
        Some(2),
        "exit status 2 for no GPU:\n{log}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(log.contains("FAILED: no usable NVIDIA GPU here"), "{log}");
    assert_eq!(files_under(out.path()), FILES, "exactly the eight files");
    for f in ["tests.log", "sanitizer.log", "tune.log", "ncu.txt"] {
        let text = std::fs::read_to_string(out.path().join(f)).unwrap();
        assert!(
            text.starts_with("not run: no usable NVIDIA GPU"),
            "{f}: {text}"
        );
    }
    for f in ["bench/ours.jsonl", "bench/peer.jsonl"] {
        let text = std::fs::read_to_string(out.path().join(f)).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("no usable NVIDIA GPU"),
            "{f}"
        );
    }
    let machine = std::fs::read_to_string(out.path().join("bench/machine.txt")).unwrap();
    assert!(
        machine.contains("commit ") && machine.contains("host "),
        "{machine}"
    );
    let run_log = std::fs::read_to_string(out.path().join("run.log")).unwrap();
    assert!(
        run_log.contains("FAILED: no usable NVIDIA GPU here"),
        "{run_log}"
    );
}
