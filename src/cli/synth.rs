//! `effdet synth`: writes the synthetic shapes dataset and test video (see `effdet::synth` for
//! what is rendered and the output layout) and prints a summary.

use std::path::PathBuf;

use effdet::Error;
use effdet::synth::{DatasetOptions, DatasetReport, ShapeKind, SplitStats, write_dataset};

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Output directory (created if missing; must be empty unless --force).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Training images.
    #[arg(long, default_value_t = 2000, value_name = "N")]
    train: usize,
    /// Validation images.
    #[arg(long, default_value_t = 200, value_name = "M")]
    val: usize,
    /// Seed of the training split (and, without --val-seed, of the validation split and video).
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// Seed of the validation split and the video (default: --seed); a different value gives
    /// a held-out set independent of the training data.
    #[arg(long, value_name = "S2")]
    val_seed: Option<u64>,
    /// Image side in pixels (square images, 64..=4096).
    #[arg(long, default_value_t = 512, value_name = "PX")]
    size: usize,
    /// Frames of the test video (0: no video).
    #[arg(long, default_value_t = 150, value_name = "N")]
    video_frames: usize,
    /// Test video frame size.
    #[arg(long, default_value = "640x360", value_name = "WxH")]
    video_size: String,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0, value_name = "N")]
    threads: usize,
    /// Replace a previous dataset in a non-empty output directory (removes its train/, val/,
    /// video/, labels.txt and dataset.json; nothing else).
    #[arg(long)]
    force: bool,
    /// Print one JSON object (the contents of dataset.json plus "seconds") instead of text.
    #[arg(long)]
    json: bool,
}

/// Parses `WxH`.
fn parse_size(s: &str) -> Result<(usize, usize), Error> {
    let bad = || Error::InvalidArgument(format!("--video-size {s:?}: expected WxH, e.g. 640x360"));
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    Ok((
        w.trim().parse().map_err(|_| bad())?,
        h.trim().parse().map_err(|_| bad())?,
    ))
}

/// The command line as typed, quoted where a shell would need it.
fn command_line() -> String {
    std::env::args()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn run(a: SynthArgs) -> anyhow::Result<()> {
    let opts = DatasetOptions {
        train: a.train,
        val: a.val,
        seed: a.seed,
        val_seed: a.val_seed.unwrap_or(a.seed),
        size: a.size,
        video_frames: a.video_frames,
        video_size: parse_size(&a.video_size)?,
        force: a.force,
        command: Some(command_line()),
    };
    opts.validate()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build()
        .map_err(|e| Error::InvalidArgument(format!("--threads {}: {e}", a.threads)))?;
    let threads = pool.current_num_threads();
    // The library reports unwritable output as `Error::Io`, whose message says "cannot read"
    // (and whose exit status is the weights file's): say what failed instead.
    let report = pool
        .install(|| write_dataset(&a.out, &opts))
        .map_err(|e| match e {
            Error::Io { path, source } => {
                anyhow::Error::new(source).context(format!("cannot write {}", path.display()))
            }
            other => other.into(),
        })?;
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["seconds"] = serde_json::json!(report.seconds);
        println!("{v}");
    } else {
        print_summary(&a, &report, threads);
    }
    Ok(())
}

fn pct(n: usize, of: usize) -> f64 {
    100.0 * n as f64 / of.max(1) as f64
}

fn print_split(name: &str, s: &SplitStats) {
    println!(
        "  {name:<6} {} images, {} objects ({:.1}/image), tiny (<= 12 px) {} ({:.1}%), \
         occluded {} ({:.1}%), dropped {}",
        s.images,
        s.objects,
        s.objects as f64 / s.images.max(1) as f64,
        s.tiny,
        pct(s.tiny, s.objects),
        s.occluded,
        pct(s.occluded, s.objects),
        s.dropped
    );
    let classes: Vec<String> = ShapeKind::ALL
        .iter()
        .zip(s.per_class)
        .map(|(k, n)| format!("{} {n} ({:.1}%)", k.name(), pct(n, s.objects)))
        .collect();
    println!("         {}", classes.join(", "));
}

fn print_summary(a: &SynthArgs, r: &DatasetReport, threads: usize) {
    let images = r.train.images + r.val.images;
    println!(
        "effdet synth v{}: wrote {} in {:.1} s ({} threads, {:.1} ms of one thread per image)",
        r.generator_version,
        a.out.display(),
        r.seconds,
        threads,
        r.seconds * 1000.0 * threads as f64
            / (images + r.video.as_ref().map_or(0, |v| v.stats.images)).max(1) as f64
    );
    println!(
        "  seed {}, val seed {}, {}x{} images, {} classes (labels.txt)",
        r.seed,
        r.val_seed,
        r.image_size,
        r.image_size,
        ShapeKind::ALL.len()
    );
    print_split("train", &r.train);
    print_split("val", &r.val);
    if let Some(v) = &r.video {
        println!(
            "  video  {} ({}x{}, {} frames at {} fps)",
            v.file, v.width, v.height, v.stats.images, v.fps
        );
        print_split("frames", &v.stats);
    }
}
