//! Training data: dataset validation (every bad-input case, default and `strict`), the
//! augmentation's box geometry, the loader's determinism, and atomic checkpoints.

use std::path::Path;
use std::sync::Arc;

use effdet::compute::Tensor;
use effdet::model::EfficientDetConfig;
use effdet::preprocess::RgbImage;
use effdet::rng::Rng;
use effdet::train::checkpoint::{Checkpoint, temp_path};
use effdet::train::dataset::{Dataset, DatasetOptions};
use effdet::train::loader::{Augment, Loader, LoaderConfig, augment};
use effdet::train::model::TrainNet;

fn write_png(path: &Path, w: u32, h: u32, seed: u8) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x as u8).wrapping_mul(3) ^ seed,
            (y as u8).wrapping_mul(5),
            seed,
        ])
    });
    img.save(path).unwrap();
}

/// A small dataset: 4 good images (64x48) with boxes, plus the problems named by `extra`.
fn dataset_dir(extra_annotations: &str, extra_images: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("img")).unwrap();
    for i in 0..4u8 {
        write_png(&dir.path().join(format!("img/{i}.png")), 64, 48, i * 40);
    }
    let json = format!(
        r#"{{"images": [
            {{"id": 1, "file_name": "0.png", "width": 64, "height": 48}},
            {{"id": 2, "file_name": "1.png", "width": 64, "height": 48}},
            {{"id": 3, "file_name": "2.png", "width": 64, "height": 48}},
            {{"id": 4, "file_name": "3.png", "width": 64, "height": 48}}{extra_images}],
          "categories": [{{"id": 5, "name": "five"}}, {{"id": 9, "name": "nine"}}],
          "annotations": [
            {{"id": 1, "image_id": 1, "category_id": 5, "bbox": [4, 4, 20, 10]}},
            {{"id": 2, "image_id": 2, "category_id": 9, "bbox": [10, 20, 30, 20]}},
            {{"id": 3, "image_id": 3, "category_id": 5, "bbox": [0, 0, 64, 48]}},
            {{"id": 4, "image_id": 4, "category_id": 9, "bbox": [30, 5, 8, 8]}},
            {{"id": 5, "image_id": 4, "category_id": 5, "bbox": [1, 1, 5, 5], "iscrowd": 1}}{extra_annotations}]}}"#
    );
    std::fs::write(dir.path().join("ann.json"), json).unwrap();
    dir
}

fn open(dir: &tempfile::TempDir, strict: bool) -> effdet::Result<Dataset> {
    Dataset::open(
        dir.path().join("ann.json"),
        dir.path().join("img"),
        DatasetOptions { strict },
    )
}

#[test]
fn a_clean_dataset_maps_categories_to_contiguous_classes() {
    let dir = dataset_dir("", "");
    let ds = open(&dir, true).unwrap();
    assert_eq!(ds.samples.len(), 4);
    assert!(ds.report.is_clean(), "{}", ds.report);
    assert_eq!(ds.report.crowd_or_ignored, 1);
    assert_eq!(ds.num_classes(), 2);
    assert_eq!(ds.class_of_category(9), Some(2));
    assert_eq!(ds.category_of_class(1), Some(5));
    assert_eq!(ds.samples[1].classes, vec![2]);
    // yxyx in image pixels.
    assert_eq!(ds.samples[1].boxes, vec![[20.0, 10.0, 40.0, 40.0]]);
    let labels = ds.labels_file();
    assert!(labels.contains("1 five\n2 nine\n"), "{labels}");
}

#[test]
fn each_problem_is_skipped_and_reported_or_an_error_with_strict() {
    type Count = fn(&effdet::train::dataset::ValidationReport) -> usize;
    let cases: [(&str, &str, &str, Count); 8] = [
        (
            r#", {"id": 9, "image_id": 77, "category_id": 5, "bbox": [1, 1, 5, 5]}"#,
            "",
            "unknown image id",
            |r| r.annotations_unknown_image,
        ),
        (
            r#", {"id": 9, "image_id": 1, "category_id": 6, "bbox": [1, 1, 5, 5]}"#,
            "",
            "unknown category",
            |r| r.boxes_unknown_category,
        ),
        (
            r#", {"id": 9, "image_id": 1, "category_id": 5, "bbox": [1, 1, 0.5, 5]}"#,
            "",
            "box under 1 px",
            |r| r.boxes_too_small,
        ),
        (
            r#", {"id": 9, "image_id": 1, "category_id": 5, "bbox": [100, 1, 5, 5]}"#,
            "",
            "box outside image",
            |r| r.boxes_outside,
        ),
        (
            r#", {"id": 9, "image_id": 1, "category_id": 5, "bbox": [50, 1, 30, 5]}"#,
            "",
            "box partly outside image",
            |r| r.boxes_clipped,
        ),
        (
            r#", {"id": 9, "image_id": 1, "category_id": 5, "bbox": [1, 1, -5, 5]}"#,
            "",
            "invalid box",
            |r| r.boxes_invalid,
        ),
        (
            "",
            r#", {"id": 5, "file_name": "missing.png"}"#,
            "missing image",
            |r| r.images_missing,
        ),
        (
            "",
            r#", {"id": 5, "file_name": "3.png"}"#,
            "image without annotations",
            |r| r.images_without_annotations,
        ),
    ];
    for (ann, imgs, msg, count) in cases {
        let dir = dataset_dir(ann, imgs);
        let ds = open(&dir, false).unwrap_or_else(|e| panic!("{msg}: {e}"));
        assert_eq!(count(&ds.report), 1, "{msg}: {}", ds.report);
        assert!(!ds.report.is_clean());
        assert!(ds.report.to_string().contains(msg) || !ds.report.examples.is_empty());
        let err = open(&dir, true).unwrap_err().to_string();
        assert!(
            err.contains(msg) && err.contains("--strict"),
            "{msg}: {err}"
        );
    }
    // The clipped box is kept, clipped to the image.
    let dir = dataset_dir(
        r#", {"id": 9, "image_id": 1, "category_id": 5, "bbox": [50, 1, 30, 5]}"#,
        "",
    );
    let ds = open(&dir, false).unwrap();
    assert_eq!(ds.samples[0].boxes[1], [1.0, 50.0, 6.0, 64.0]);
}

#[test]
fn corrupt_images_malformed_json_missing_folder_and_empty_datasets_are_clear_errors() {
    // A corrupt image is skipped (or an error with --strict).
    let dir = dataset_dir("", "");
    std::fs::write(dir.path().join("img/2.png"), b"not a png").unwrap();
    let ds = open(&dir, false).unwrap();
    assert_eq!(ds.report.images_unreadable, 1);
    assert!(
        open(&dir, true)
            .unwrap_err()
            .to_string()
            .contains("unreadable image")
    );

    std::fs::write(dir.path().join("ann.json"), "{ not json").unwrap();
    let e = open(&dir, false).unwrap_err().to_string();
    assert!(e.contains("not COCO JSON"), "{e}");

    let dir = dataset_dir("", "");
    let e = Dataset::open(
        dir.path().join("ann.json"),
        dir.path().join("nope"),
        DatasetOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("image directory") && e.contains("nope"), "{e}");

    for f in ["0.png", "1.png", "2.png", "3.png"] {
        std::fs::remove_file(dir.path().join("img").join(f)).unwrap();
    }
    let e = open(&dir, false).unwrap_err().to_string();
    assert!(e.contains("no usable training image"), "{e}");
    assert!(e.contains("images skipped: file missing"), "{e}");
}

#[test]
fn augmentation_moves_boxes_with_the_pixels() {
    // A 40x20 image, black with a white block at x 10..20, y 4..12.
    let (w, h) = (40usize, 20usize);
    let mut data = vec![0u8; w * h * 3];
    for y in 4..12 {
        for x in 10..20 {
            data[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&[255, 255, 255]);
        }
    }
    let img = RgbImage::new(w, h, data).unwrap();
    let boxes = [[4.0f32, 10.0, 12.0, 20.0]];
    // Letterbox only: scale 64/40 = 1.6, no flip.
    let p = augment(
        img.clone(),
        &boxes,
        &[1],
        64,
        Augment::None,
        &mut Rng::new(0),
    )
    .unwrap();
    assert_eq!(p.boxes, vec![[6.4, 16.0, 19.2, 32.0]]);
    // Always flip, fixed scale 1 (target 64): the box mirrors within the 40-wide image first.
    let flip = Augment::Train {
        hflip_prob: 1.0,
        scale_min: 1.0,
        scale_max: 1.0,
    };
    let p = augment(img.clone(), &boxes, &[1], 64, flip, &mut Rng::new(0)).unwrap();
    assert_eq!(p.boxes, vec![[6.4, 32.0, 19.2, 48.0]]);
    // The pixel at the box centre is white (normalised > 1), just outside it is black.
    let at = |x: usize, y: usize| p.chw[y * 64 + x];
    assert!(
        at(40, 12) > 1.5 && at(28, 12) < -1.5,
        "{} {}",
        at(40, 12),
        at(28, 12)
    );
    // Scale 2 (target 128 > 64): a random crop; boxes stay inside the 64x64 input, or go.
    for seed in 0..20 {
        let big = Augment::Train {
            hflip_prob: 0.0,
            scale_min: 2.0,
            scale_max: 2.0,
        };
        let p = augment(img.clone(), &boxes, &[1], 64, big, &mut Rng::new(seed)).unwrap();
        for b in &p.boxes {
            assert!(
                b[0] >= 0.0
                    && b[1] >= 0.0
                    && b[2] <= 64.0
                    && b[3] <= 64.0
                    && b[0] < b[2]
                    && b[1] < b[3]
            );
        }
    }
}

#[test]
fn the_loader_is_deterministic_whatever_the_worker_count() {
    let dir = dataset_dir("", "");
    let ds = Arc::new(open(&dir, false).unwrap());
    let mut cfg = EfficientDetConfig::d0();
    cfg.num_classes = 2;
    cfg.image_size = (128, 128);
    let net = TrainNet::init(cfg, 1).unwrap();
    let labeler = Arc::new(net.labeler().unwrap());
    let run = |workers: usize, epoch: u64| -> Vec<(Vec<usize>, Vec<f32>)> {
        let lc = LoaderConfig {
            input_size: 128,
            batch_size: 2,
            augment: Augment::effdet(),
            workers,
            prefetch: 1,
            seed: 7,
            shuffle: true,
            drop_last: true,
            rank: 0,
            world: 1,
        };
        Loader::new(Arc::clone(&ds), Arc::clone(&labeler), &lc, epoch)
            .unwrap()
            .map(|b| {
                let b = b.unwrap();
                (b.samples, b.input.data().to_vec())
            })
            .collect()
    };
    let a = run(1, 0);
    assert_eq!(a.len(), 2);
    assert_eq!(a, run(3, 0), "worker count changes nothing");
    assert_ne!(a, run(1, 1), "another epoch, another order/augmentation");
    // Dropping a loader half-way stops its workers.
    let lc = LoaderConfig {
        input_size: 128,
        batch_size: 1,
        augment: Augment::effdet(),
        workers: 2,
        prefetch: 1,
        seed: 7,
        shuffle: true,
        drop_last: false,
        rank: 0,
        world: 1,
    };
    let mut l = Loader::new(Arc::clone(&ds), labeler, &lc, 0).unwrap();
    assert!(l.next().unwrap().is_ok());
    drop(l);
}

#[test]
fn checkpoints_are_atomic_and_a_full_disk_keeps_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    let mut ck = Checkpoint::default();
    ck.tensors.insert(
        "model.w".into(),
        Tensor::new(vec![2], vec![1.0, 2.0]).unwrap(),
    );
    ck.metadata
        .insert("progress".into(), "{\"epoch\": 1}".into());
    ck.save(&path).unwrap();
    let back = Checkpoint::load(&path).unwrap();
    assert_eq!(back.tensors, ck.tensors);
    assert_eq!(back.metadata["progress"], "{\"epoch\": 1}");

    // Simulate a full disk: the temporary file is /dev/full, where every write fails ENOSPC.
    #[cfg(target_os = "linux")]
    {
        std::os::unix::fs::symlink("/dev/full", temp_path(&path)).unwrap();
        let mut bigger = ck.clone();
        bigger.tensors.insert(
            "model.v".into(),
            Tensor::new(vec![1 << 16], vec![3.0; 1 << 16]).unwrap(),
        );
        let err = bigger.save(&path).unwrap_err().to_string();
        assert!(
            err.contains("cannot write") && err.contains("No space left"),
            "{err}"
        );
        assert_eq!(
            Checkpoint::load(&path).unwrap().tensors,
            ck.tensors,
            "previous checkpoint intact"
        );
        assert!(!temp_path(&path).exists(), "temporary file removed");
    }

    // Not a checkpoint.
    std::fs::write(dir.path().join("x.safetensors"), b"junk").unwrap();
    assert!(Checkpoint::load(dir.path().join("x.safetensors")).is_err());
}

#[test]
fn a_fresh_network_has_exactly_the_tensors_of_effdet_weights() {
    let store = effdet::model::WeightStore::open(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/golden/weights_f16.safetensors"
    ))
    .unwrap();
    let golden = TrainNet::from_store(&store, EfficientDetConfig::d0()).unwrap();
    let fresh = TrainNet::init(EfficientDetConfig::d0(), 3).unwrap();
    let shapes = |n: &TrainNet| -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<_> = n
            .state_dict()
            .into_iter()
            .map(|(k, t)| (k, t.shape().to_vec()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(shapes(&fresh), shapes(&golden));
    assert_eq!(fresh.params().len(), 460);
    // effdet's initial values where they are fixed.
    let sd = fresh.state_dict();
    let prior = -(99f32.ln());
    assert!(
        sd["class_net.predict.conv_pw.bias"]
            .data()
            .iter()
            .all(|&v| v == prior)
    );
    assert!(
        sd["fpn.cell.0.fnode.0.combine.edge_weights"]
            .data()
            .iter()
            .all(|&v| v == 1.0)
    );
    assert!(
        sd["backbone.bn1.running_var"]
            .data()
            .iter()
            .all(|&v| v == 1.0)
    );
    // Stem: normal with std sqrt(2 / fan_out), fan_out = 3 * 3 * 32.
    let w = sd["backbone.conv_stem.weight"].data();
    let std = (w.iter().map(|v| (v * v) as f64).sum::<f64>() / w.len() as f64).sqrt();
    let want = (2.0f64 / 288.0).sqrt();
    assert!((std / want - 1.0).abs() < 0.1, "stem std {std} vs {want}");
    // Deterministic from the seed.
    assert_eq!(
        TrainNet::init(EfficientDetConfig::d0(), 3)
            .unwrap()
            .state_dict(),
        sd
    );
}
