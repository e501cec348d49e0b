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
    /// reads). Required for now: evaluating a model directly on a dataset is not available yet.
    #[arg(long, value_name = "FILE")]
    pub detections: Option<PathBuf>,
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
    let Some(dets_path) = &a.detections else {
        anyhow::bail!(Error::InvalidArgument(
            "--detections FILE is required (a COCO results JSON array; evaluating a model on a \
             dataset is not available yet)"
                .into()
        ));
    };
    // Library errors stay the root cause, so main's exit_code() maps them (5 for data).
    let gt = CocoAnnotations::open(&a.annotations)?;
    let dets = Detections::open(dets_path)?;
    let stats = evaluate(&gt, &dets)?;
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
