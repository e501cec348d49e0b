//! The `effdet` command-line tool. `main` parses the command line and dispatches; each
//! subcommand lives in `src/cli/` (its arguments, with every flag's help and default, and its
//! code), and `cli::common` holds what they share (model arguments, exit statuses).

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cli::common::exit_code;

#[derive(Parser)]
#[command(
    name = "effdet",
    version,
    about = "EfficientDet-D0 object detection (effdet-compatible weights, CPU engine)",
    after_help = "Exit status: 0 success, 2 bad command line or argument value, \
                  3 weights file problem, 4 image problem, 5 annotations problem, \
                  1 other errors.\n\
                  Logging: set RUST_LOG=effdet=debug to see per-stage timings."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Detect objects in a PNG or JPEG image.
    Detect(cli::detect::DetectArgs),
    /// Measure per-image latency of the network alone and end to end.
    Bench(cli::bench::BenchArgs),
    /// Compute the training loss of one batch (and optionally every parameter gradient), as
    /// effdet's DetBenchTrain does: training-mode batch norm, drop-path off.
    Loss(cli::loss::LossArgs),
    /// Train EfficientDet-D0 on a COCO-format dataset (the reference recipe by default).
    Train(Box<cli::train::TrainArgs>),
    /// Measure the training input pipeline alone (decode, augment, label, batch): images/s.
    BenchData(cli::bench_data::BenchDataArgs),
    /// Measure training-step time (forward, loss, backward, clipping, SGD) and peak memory.
    BenchTrain(cli::bench_train::BenchTrainArgs),
    /// Generate a synthetic shapes detection dataset (COCO train/val, labels) and a test video.
    Synth(cli::synth::SynthArgs),
    /// Evaluate detections against COCO ground truth: AP/AR exactly as pycocotools' COCOeval.
    Eval(cli::eval::EvalArgs),
    /// Export a model's network to ONNX (input images [N, 3, S, S], the ten raw head outputs).
    Export(cli::export::ExportArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Detect(a) => cli::detect::detect(a),
        Command::Bench(a) => cli::bench::bench(a),
        Command::Loss(a) => cli::loss::loss(a),
        Command::BenchTrain(a) => cli::bench_train::bench_train(a),
        Command::BenchData(a) => cli::bench_data::bench_data(a),
        Command::Synth(a) => cli::synth::run(a),
        Command::Train(a) => cli::train::train(*a),
        Command::Eval(a) => cli::eval::eval(a),
        Command::Export(a) => cli::export::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("effdet: error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}
