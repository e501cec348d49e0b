//! `effdet detect`: detect objects in one image.

use std::path::PathBuf;

use anyhow::Context;
use effdet::Error;
use effdet::image_io::{draw_boxes, load_image, save_png};
use effdet::postprocess::{NmsMethod, PostprocessConfig};

use super::common::*;

#[derive(clap::Args)]
pub struct DetectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Input image (PNG or JPEG, any size).
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
    /// Drop detections scoring below this (0 keeps all 100, as effdet does).
    #[arg(long, default_value_t = 0.3, value_name = "T")]
    pub score_threshold: f32,
    /// IoU above which hard NMS suppresses a box of the same class.
    #[arg(long, default_value_t = 0.5, value_name = "U")]
    pub iou_threshold: f32,
    /// Keep at most this many detections (best first).
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub max_detections: usize,
    /// Use Gaussian soft-NMS (sigma 0.5, as the automl evaluation) instead of hard NMS.
    #[arg(long)]
    pub soft_nms: bool,
    /// Label file ("<id> <name>" per line, or one name per line); default: COCO names.
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
    /// Print exactly one JSON array of detections to stdout.
    #[arg(long)]
    pub json: bool,
    /// Write a copy of the image with the boxes drawn (PNG).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

pub fn detect(a: DetectArgs) -> anyhow::Result<()> {
    let post = PostprocessConfig {
        score_threshold: a.score_threshold,
        iou_threshold: a.iou_threshold,
        max_detections: a.max_detections,
        nms: if a.soft_nms {
            NmsMethod::SoftGaussian {
                sigma: 0.5,
                min_score: 0.001,
            }
        } else {
            NmsMethod::Hard
        },
        ..PostprocessConfig::default()
    };
    if !(0.0..=1.0).contains(&a.score_threshold) || !(0.0..=1.0).contains(&a.iou_threshold) {
        anyhow::bail!(Error::InvalidArgument(
            "--score-threshold and --iou-threshold must lie in [0, 1]".into()
        ));
    }
    let detector = load_detector(&a.model, options(&a.model, post, a.labels.clone())?)?;
    let mut img = load_image(&a.image)?;
    let detections = detector.detect(&img.frame()?)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&detections).context("serialising detections")?
        );
    } else {
        println!(
            "{} detection(s) in {} ({}x{}):",
            detections.len(),
            a.image.display(),
            img.width,
            img.height
        );
        for d in &detections {
            println!(
                "  {:<16} {:.3}  [{:.1}, {:.1}, {:.1}, {:.1}]",
                d.label, d.score, d.x1, d.y1, d.x2, d.y2
            );
        }
    }
    if let Some(out) = &a.out {
        draw_boxes(&mut img, &detections, 2);
        save_png(&img, out)?;
        if !a.json {
            println!("annotated image written to {}", out.display());
        }
    }
    Ok(())
}
