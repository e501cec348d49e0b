//! The `pipelines/` scripts, run for real against the plugin built for this test run.
//!
//! Which plugin: cargo compiles this crate's library once per test build with both crate types
//! (`cdylib` and `rlib`) into `target/<profile>/deps/`, the directory that also holds this test
//! binary. So `libgsteffdet.so` next to `std::env::current_exe()` is the plugin of exactly the
//! code under test, whatever the profile or `CARGO_TARGET_DIR`. It is copied into a private
//! directory (pointing GStreamer at `deps/` would make it try every `.so` there, proc macros
//! included) and handed to the scripts as `EFFDET_PLUGIN_DIR`; `GST_REGISTRY` points at a
//! private registry file so the run neither reads a stale cache nor writes the user's.
//!
//! The scripts need `gst-launch-1.0` with the base/good/ugly plugins (`videotestsrc`,
//! `x264enc`, `mp4mux`, `decodebin`). The model is the scripts' default, the bundled shapes
//! model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const N_FRAMES: usize = 30;

/// The repository root (this crate is `plugins/gst-effdet`).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// A private directory holding a copy of the plugin built for this test run, plus a registry.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let exe = std::env::current_exe().expect("test binary path");
        let deps = exe.parent().expect("test binary directory");
        let built = deps.join("libgsteffdet.so");
        assert!(
            built.is_file(),
            "{} not found: cargo builds the cdylib next to the test binary",
            built.display()
        );
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("plugin")).expect("plugin dir");
        std::fs::copy(&built, dir.path().join("plugin/libgsteffdet.so")).expect("copy plugin");
        Env { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A command with the environment the scripts need (the scripts read `EFFDET_PLUGIN_DIR`,
    /// a plain `gst-launch-1.0` reads `GST_PLUGIN_PATH`).
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(repo())
            .env("EFFDET_PLUGIN_DIR", self.path("plugin"))
            .env("GST_PLUGIN_PATH", self.path("plugin"))
            .env("GST_REGISTRY", self.path("registry.bin"))
            .env_remove("MODEL")
            .env_remove("EFFDET_OPTS");
        cmd
    }

    fn script(&self, name: &str, args: &[&Path]) -> Output {
        let script = repo().join("pipelines").join(name);
        let out = self
            .command(&script)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{name} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs `gst-launch-1.0 -q -e WORDS...` (with this environment) and asserts success. Each
    /// word is one argument, as in a shell script (gst-launch escapes each one).
    fn gst_launch<S: AsRef<std::ffi::OsStr>>(&self, words: &[S]) {
        let out = self
            .command("gst-launch-1.0")
            .args(["-q", "-e"])
            .args(words)
            .output()
            .expect("gst-launch-1.0 runs (install gstreamer1.0-tools)");
        let line: Vec<_> = words.iter().map(|w| w.as_ref().to_string_lossy()).collect();
        assert!(
            out.status.success(),
            "gst-launch-1.0 {} failed:\n{}{}",
            line.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A 30-frame 320x240 H.264 MP4 made with stock elements.
    fn synthetic_mp4(&self) -> PathBuf {
        let path = self.path("input.mp4");
        let n = format!("num-buffers={N_FRAMES}");
        let location = format!("location={}", path.display());
        self.gst_launch(&[
            "videotestsrc",
            &n,
            "!",
            "video/x-raw,width=320,height=240",
            "!",
            "x264enc",
            "!",
            "mp4mux",
            "!",
            "filesink",
            &location,
        ]);
        path
    }

    /// Asserts that `path` is a non-empty video GStreamer decodes, with `N_FRAMES` frames.
    fn check_decodes(&self, path: &Path) {
        let len = std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .len();
        assert!(len > 0, "{} is empty", path.display());
        let frames = self.path("frames.jsonl");
        // effdetjson counts the decoded frames (needs no model).
        let input = format!("location={}", path.display());
        let output = format!("location={}", frames.display());
        self.gst_launch(&[
            "filesrc",
            &input,
            "!",
            "decodebin",
            "!",
            "videoconvert",
            "!",
            "effdetjson",
            &output,
            "!",
            "fakesink",
        ]);
        assert_eq!(json_lines(&frames).len(), N_FRAMES, "decoded frames");
    }
}

/// Parses JSON Lines text and checks every line against the `effdetjson` schema.
fn parse_lines(text: &str, width: u64, height: u64) -> Vec<Value> {
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["frame"], i as u64, "{line}");
        assert!(line["pts"].is_u64(), "{line}");
        assert_eq!(line["width"], width, "{line}");
        assert_eq!(line["height"], height, "{line}");
        for d in line["detections"].as_array().expect("detections array") {
            for k in ["x1", "y1", "x2", "y2", "score"] {
                assert!(d[k].is_number(), "{k} in {d}");
            }
            assert!(d["class_id"].is_u64(), "{d}");
            assert!(d["label"].is_string(), "{d}");
            assert!(d["x1"].as_f64() <= d["x2"].as_f64(), "{d}");
            assert!(d["y1"].as_f64() <= d["y2"].as_f64(), "{d}");
        }
    }
    lines
}

fn json_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn test_source_prints_one_json_line_per_frame() {
    let env = Env::new();
    let out = env.script("test-source.sh", &[Path::new("30")]);
    let stdout = String::from_utf8(out.stdout).expect("utf-8 stdout");
    let lines = parse_lines(&stdout, 640, 480);
    assert_eq!(lines.len(), N_FRAMES, "stdout:\n{stdout}");
}

#[test]
fn annotate_file_writes_a_decodable_mp4() {
    let env = Env::new();
    let input = env.synthetic_mp4();
    let output = env.path("annotated.mp4");
    env.script("annotate-file.sh", &[&input, &output]);
    env.check_decodes(&output);
}

#[test]
fn json_export_writes_one_line_per_frame() {
    let env = Env::new();
    let input = env.synthetic_mp4();
    let output = env.path("detections.jsonl");
    env.script("json-export.sh", &[&input, &output]);
    let text = std::fs::read_to_string(&output).expect("JSONL written");
    assert_eq!(parse_lines(&text, 320, 240).len(), N_FRAMES);
}

#[test]
fn two_streams_writes_both_branches() {
    let env = Env::new();
    let input = env.synthetic_mp4();
    let out_dir = env.path("two");
    env.script("two-streams.sh", &[&input, &input, &out_dir]);
    for k in 1..=2 {
        env.check_decodes(&out_dir.join(format!("stream{k}.mp4")));
        let text = std::fs::read_to_string(out_dir.join(format!("stream{k}.jsonl")))
            .expect("JSONL written");
        assert_eq!(parse_lines(&text, 320, 240).len(), N_FRAMES);
    }
}

#[test]
fn scripts_reject_bad_arguments_with_status_2() {
    let env = Env::new();
    for (script, args) in [
        ("annotate-file.sh", vec![]),
        ("annotate-file.sh", vec!["only-one.mp4"]),
        ("json-export.sh", vec!["a", "b", "c"]),
        ("json-export.sh", vec!["/no/such/input.mp4", "out.jsonl"]),
        ("test-source.sh", vec!["zero"]),
        ("rtsp.sh", vec![]),
        ("rtsp.sh", vec!["not a url"]),
        ("two-streams.sh", vec!["one.mp4"]),
        ("camera.sh", vec!["/no/such/video9"]),
    ] {
        let out = env
            .command(repo().join("pipelines").join(script))
            .args(&args)
            .output()
            .expect("script runs");
        assert_eq!(out.status.code(), Some(2), "{script} {args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("Usage:"), "{script} {args:?}: {stderr}");
    }
}
