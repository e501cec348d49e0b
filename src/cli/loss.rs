//! `effdet loss`: the training loss (and gradients) of one batch, as effdet's DetBenchTrain.

use std::path::PathBuf;

use effdet::Error;

use super::common::*;

#[derive(clap::Args)]
pub struct LossArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated images forming the batch (PNG or JPEG; letterboxed to the model's input
    /// size as for inference).
    #[arg(
        long,
        value_name = "A.png,B.png",
        value_delimiter = ',',
        required = true
    )]
    pub images: Vec<PathBuf>,
    /// COCO-format annotations; images are matched by `file_name` (boxes `[x, y, w, h]` in
    /// image pixels, COCO category ids = class ids 1..=K for the model's K classes).
    #[arg(long, value_name = "FILE")]
    pub annotations: PathBuf,
    /// Write d loss / d parameter for every trainable parameter (effdet key names) as
    /// safetensors (f32).
    #[arg(long, value_name = "FILE")]
    pub grads_out: Option<PathBuf>,
    /// Normalise batch norms with the running statistics (inference mode, PyTorch's
    /// `model.eval()`) instead of the batch's: the loss of what inference computes.
    #[arg(long)]
    pub freeze_bn: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn loss(a: LossArgs) -> anyhow::Result<()> {
    use effdet::compute::Tensor;
    use effdet::compute::cpu::CpuBackend;

    use effdet::train::coco::{CocoAnnotations, load_batch};
    use effdet::train::loss::DetectionLoss;
    use effdet::train::model::TrainOptions;

    if a.model.backend != "auto" && a.model.backend != "cpu" {
        anyhow::bail!(Error::InvalidArgument(format!(
            "--backend {}: training runs on the cpu backend only",
            a.model.backend
        )));
    }
    effdet::train::keep_freed_memory();
    let (mut net, size) = train_net(&a.model)?;
    let anns = CocoAnnotations::open(&a.annotations)?;
    let labeler = net.labeler()?;
    let num_classes = net.config().num_classes;
    let batch = load_batch(&a.images, &anns, size, &labeler)?;
    let n = a.images.len();
    let backend = CpuBackend::new(a.model.threads)?;
    let opts = TrainOptions {
        update_running_stats: false,
        frozen_bn: a.freeze_bn,
        ..TrainOptions::default()
    };
    let stats = net.forward_backward(
        &backend,
        &batch.input,
        &batch.labels,
        &DetectionLoss::d0().with_num_classes(num_classes),
        &opts,
        None,
    )?;
    if let Some(out) = &a.grads_out {
        let grads: std::collections::BTreeMap<String, Tensor> = net
            .params()
            .iter()
            .map(|p| {
                let g = p
                    .grad
                    .clone()
                    .unwrap_or_else(|| Tensor::zeros(p.value.shape().to_vec()));
                (p.name.clone(), g)
            })
            .collect();
        effdet::train::optim::save_tensors(out, &grads)?;
    }
    if a.json {
        let o = serde_json::json!({
            "loss": stats.loss,
            "class_loss": stats.class_loss,
            "box_loss": stats.box_loss,
            "num_positives": stats.num_positives,
        });
        println!("{o}");
    } else {
        println!(
            "{} image(s), {} box(es): loss {:.6} = class {:.6} + 50 x box {:.6}; {} positive anchors; peak tape memory {:.1} MiB",
            n,
            batch.targets.iter().map(|t| t.boxes.len()).sum::<usize>(),
            stats.loss,
            stats.class_loss,
            stats.box_loss,
            stats.num_positives,
            stats.peak_bytes as f64 / (1 << 20) as f64
        );
        if let Some(out) = &a.grads_out {
            println!("gradients written to {}", out.display());
        }
    }
    Ok(())
}
