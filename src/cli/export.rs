//! `effdet export`: a model's network as an ONNX file (see `effdet::onnx`).

use std::path::PathBuf;

use effdet::Error;
use effdet::onnx::{BatchDim, ExportOptions, OPSET, PostprocessGraph, export};

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The model: effdet-named weights (safetensors), e.g. models/effdet-d0-shapes256.safetensors.
    #[arg(long, value_name = "FILE")]
    weights: PathBuf,
    /// The ONNX file to write (replaced atomically; nothing is left behind on failure).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Square input size, a multiple of 128 [default: the size the weights were trained at
    /// (their effdet.image_size metadata), else 512].
    #[arg(long, value_name = "S")]
    size: Option<usize>,
    /// A fixed batch size [default: a dynamic batch, see --dynamic-batch].
    #[arg(long, value_name = "N", conflicts_with = "dynamic_batch")]
    batch: Option<usize>,
    /// A dynamic batch dimension `N`, with MAX recorded as the metadata effdet.max_batch (the
    /// top of a TensorRT optimisation profile) [default: dynamic, MAX 32].
    #[arg(long, value_name = "MAX")]
    dynamic_batch: Option<usize>,
    /// What follows the network: `none` (the ten raw head outputs class_3..7, box_3..7) or
    /// `onnx` (top-k, decoding, clipping and per-class NMS in standard ONNX ops, with the four
    /// outputs of TensorRT's EfficientNMS_TRT: num_detections, detection_boxes,
    /// detection_scores, detection_classes).
    #[arg(long, value_name = "KIND", default_value = "none")]
    postprocess: PostprocessGraph,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    let batch = match (a.batch, a.dynamic_batch) {
        (Some(n), _) => BatchDim::Fixed(n),
        (None, max) => BatchDim::Dynamic {
            max: max.unwrap_or(32),
        },
    };
    let opts = ExportOptions {
        input_size: a.size,
        batch,
        postprocess: a.postprocess,
    };
    let report = match export(&a.weights, &a.out, &opts) {
        Ok(r) => r,
        // The output could not be written: not a weights problem (exit status 1).
        Err(Error::Io { path, source }) if path == a.out => {
            anyhow::bail!("cannot write {}: {source}", path.display())
        }
        Err(e) => return Err(e.into()),
    };
    let outputs = match a.postprocess {
        PostprocessGraph::None => "class_3..7 / box_3..7",
        PostprocessGraph::Onnx => {
            "num_detections / detection_boxes / detection_scores / detection_classes"
        }
    };
    let batch_text = match batch {
        BatchDim::Fixed(n) => n.to_string(),
        BatchDim::Dynamic { max } => format!("N (dynamic, max {max})"),
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "out": a.out,
                "opset": OPSET,
                "image_size": report.image_size,
                "num_classes": report.num_classes,
                "batch": batch_text,
                "outputs": outputs,
                "nodes": report.nodes,
                "initializers": report.initializers,
                "bytes": report.bytes,
            })
        );
    } else {
        println!(
            "wrote {} ({:.1} MB, opset {OPSET}): input images [{batch_text}, 3, {s}, {s}], \
             outputs {outputs}, {} classes, {} nodes, {} initializers",
            a.out.display(),
            report.bytes as f64 / 1e6,
            report.num_classes,
            report.nodes,
            report.initializers,
            s = report.image_size,
        );
    }
    Ok(())
}
