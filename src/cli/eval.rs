//! `effdet eval`: COCO bbox metrics of a detections file against COCO ground truth, computed
//! exactly as pycocotools' `COCOeval` (see `effdet::eval`).

use std::path::PathBuf;

use anyhow::Context;
use effdet::Error;
use effdet::eval::{Detections, detections_outside_categories, evaluate};
use effdet::train::coco::CocoAnnotations;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Detections in the COCO results format: a JSON array of
    /// {"image_id", "category_id", "bbox": [x, y, w, h], "score"} (what pycocotools' loadRes
    /// reads).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["weights", "images"])]
    pub detections: Option<PathBuf>,
    /// Instead of a detections file: evaluate these weights (effdet-named safetensors) on the
    /// images of the annotations, found under --images.
    #[arg(long, value_name = "FILE", requires = "images")]
    pub weights: Option<PathBuf>,
    /// Folder the annotations' `file_name`s are relative to (with --weights).
    #[arg(long, value_name = "DIR", requires = "weights")]
    pub images: Option<PathBuf>,
    /// Network input size to run the model at (with --weights; a multiple of 128). Default:
    /// the size it was trained at (its `effdet.image_size` metadata; 512 for D0 as released).
    #[arg(long, value_name = "S")]
    pub size: Option<usize>,
    /// CPU threads (with --weights; 0 = all cores).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    /// Also write the model's detections (COCO results JSON) here (with --weights).
    #[arg(long, value_name = "FILE", requires = "weights")]
    pub detections_out: Option<PathBuf>,
    /// Ground truth: a COCO instances file (images, annotations with id, bbox, area, iscrowd,
    /// categories). Every image and category in it is evaluated.
    #[arg(long, value_name = "FILE")]
    pub annotations: PathBuf,
    /// Print one JSON object {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10",
    /// "AR100", "ARs", "ARm", "ARl"} instead of pycocotools' summary table.
    #[arg(long)]
    pub json: bool,
}

pub fn eval(a: EvalArgs) -> anyhow::Result<()> {
    // Library errors stay the root cause, so main's exit_code() maps them (5 for data).
    let gt = CocoAnnotations::open(&a.annotations)?;
    let (stats, dets) = match (&a.detections, &a.weights, &a.images) {
        (Some(p), _, _) => {
            let dets = Detections::open(p)?;
            (evaluate(&gt, &dets)?, dets)
        }
        (None, Some(w), Some(dir)) => {
            let store = effdet::model::WeightStore::open(w)?;
            let (stats, dets) =
                super::eval_model::evaluate_weights(&store, &gt, dir, a.size, a.threads)?;
            if let Some(out) = &a.detections_out {
                let json = serde_json::to_string(dets.items()).context("serialising detections")?;
                std::fs::write(out, json).map_err(|e| Error::Write {
                    path: out.clone(),
                    source: e,
                })?;
            }
            (stats, dets)
        }
        _ => anyhow::bail!(Error::InvalidArgument(
            "give --detections FILE (COCO results JSON), or --weights FILE with --images DIR"
                .into()
        )),
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&stats).context("serialising the stats")?
        );
    } else {
        let file = gt.file();
        let skipped = detections_outside_categories(&gt, &dets);
        println!(
            "{} detection(s) on {} image(s), {} categories (bbox, pycocotools COCOeval rules){}",
            dets.items().len(),
            file.images.len(),
            file.categories.len(),
            if skipped > 0 {
                format!("; {skipped} detection(s) of categories not in the ground truth left out")
            } else {
                String::new()
            }
        );
        println!("{stats}");
    }
    Ok(())
}
