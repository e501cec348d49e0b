//! Evaluating a model on a COCO-format dataset: run the [`Detector`] on every image of the
//! ground truth and score the detections with `effdet::eval` (pycocotools' rules). Used by
//! `effdet eval --weights` and by `effdet train` for its periodic validation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use effdet::compute::Tensor;
use effdet::eval::{CocoDetection, CocoStats, Detections, evaluate};
use effdet::model::WeightStore;
use effdet::postprocess::PostprocessConfig;
use effdet::train::coco::CocoAnnotations;
use effdet::train::trainer::{Evaluator, Trainer};
use effdet::{Detector, DetectorOptions, Error};

/// Detector settings for evaluation: effdet's (all 100 detections above 0.001, hard NMS), at
/// `input_size` (`None`: the size the model was trained at).
pub fn eval_options(input_size: Option<usize>, threads: usize) -> DetectorOptions {
    DetectorOptions {
        input_size,
        threads,
        postprocess: PostprocessConfig {
            score_threshold: 0.001,
            ..PostprocessConfig::default()
        },
        ..DetectorOptions::default()
    }
}

/// How model classes map to the ground truth's category ids: a 90-class (COCO) model's class is
/// the COCO category id; any other model was trained on categories sorted by id, class `k` being
/// the `k`-th (as `effdet train` numbers them).
pub fn class_to_category(gt: &CocoAnnotations, num_classes: usize) -> Result<Vec<u64>, Error> {
    let mut ids: Vec<u64> = gt.file().categories.iter().map(|c| c.id).collect();
    ids.sort_unstable();
    if num_classes == 90 && ids.iter().all(|&id| (1..=90).contains(&id)) {
        return Ok((1..=90).collect());
    }
    if ids.len() != num_classes {
        return Err(Error::Annotations {
            path: gt.path().to_path_buf(),
            reason: format!(
                "the model has {num_classes} classes but the annotations list {} categories",
                ids.len()
            ),
        });
    }
    Ok(ids)
}

/// Runs `detector` on every image of `gt` (files under `image_dir`) and returns the detections
/// in the COCO results format.
pub fn detect_dataset(
    detector: &Detector,
    gt: &CocoAnnotations,
    image_dir: &Path,
) -> anyhow::Result<Detections> {
    let categories = class_to_category(gt, detector.config().num_classes)?;
    let mut out = Vec::new();
    for im in &gt.file().images {
        let path = image_dir.join(&im.file_name);
        let img = effdet::image_io::load_image(&path)?;
        for d in detector.detect(&img.frame()?)? {
            let mut c = CocoDetection::from_detection(im.id, &d);
            let Some(&cat) = (d.class_id as usize)
                .checked_sub(1)
                .and_then(|i| categories.get(i))
            else {
                continue;
            };
            c.category_id = cat;
            out.push(c);
        }
    }
    Ok(Detections::new(PathBuf::from("<model detections>"), out)?)
}

/// Evaluates effdet-named weights on a dataset, at `input_size` (`None`: as trained).
pub fn evaluate_weights(
    store: &WeightStore,
    gt: &CocoAnnotations,
    image_dir: &Path,
    input_size: Option<usize>,
    threads: usize,
) -> anyhow::Result<(CocoStats, Detections)> {
    let detector = Detector::from_weights(store, eval_options(input_size, threads))?;
    let dets = detect_dataset(&detector, gt, image_dir)?;
    let stats = evaluate(gt, &dets)?;
    Ok((stats, dets))
}

/// The trainer's validation callback: COCO AP and AP50 of the given weights on `annotations`.
pub fn evaluator(
    annotations: &Path,
    image_dir: &Path,
    trainer: &Trainer,
) -> anyhow::Result<Box<Evaluator<'static>>> {
    let gt = CocoAnnotations::open(annotations)?;
    class_to_category(&gt, trainer.net.config().num_classes)?;
    if !image_dir.is_dir() {
        anyhow::bail!(Error::Annotations {
            path: annotations.to_path_buf(),
            reason: format!(
                "validation image folder {} does not exist",
                image_dir.display()
            ),
        });
    }
    let image_dir = image_dir.to_path_buf();
    let (size, threads) = (trainer.cfg.input_size, trainer.cfg.threads);
    Ok(Box::new(move |weights: &BTreeMap<String, Tensor>| {
        let store = WeightStore::from_tensors("<EMA weights>", weights);
        let (stats, _) = evaluate_weights(&store, &gt, &image_dir, Some(size), threads)
            .map_err(|e| Error::InvalidArgument(format!("validation failed: {e:#}")))?;
        Ok((stats.ap, stats.ap50))
    }))
}
