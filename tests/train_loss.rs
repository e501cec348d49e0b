//! Anchor labeling and detection loss against effdet 0.4.1 (`AnchorLabeler`, `DetectionLoss` and
//! torch autograd).
//!
//! Fixtures in tests/fixtures/train/ come from tools/make_train_fixtures.py: a 128x128 D0 config
//! (levels 16, 8, 4, 2, 1) with 8 classes, two images of hand-placed ground truth and seeded
//! random head outputs; and the real 512x512 D0 anchors with one box.

use std::collections::HashMap;
use std::path::Path;

use effdet::Error;
use effdet::postprocess::{AnchorConfig, Anchors, LevelOutput};
use effdet::train::labeler::{AnchorLabeler, BACKGROUND, LevelTargets};
use effdet::train::loss::{DetectionLoss, LossOutput, detection_loss, detection_loss_batched};
use safetensors::Dtype;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/train");
const NUM_CLASSES_128: usize = 8;

/// A fixture tensor widened to f64 (f16/f32/i32/i64 are exact in f64), with its shape.
struct T {
    shape: Vec<usize>,
    data: Vec<f64>,
}

impl T {
    fn f32(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }
    fn i32(&self) -> Vec<i32> {
        self.data.iter().map(|&v| v as i32).collect()
    }
}

fn load(name: &str) -> HashMap<String, T> {
    let bytes = std::fs::read(Path::new(DIR).join(name)).expect("fixture readable");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("fixture parses");
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let b = v.data();
            let data: Vec<f64> = match v.dtype() {
                Dtype::F16 => b
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                    .collect(),
                Dtype::F32 => b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                    .collect(),
                Dtype::I32 => b
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                    .collect(),
                Dtype::I64 => b
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                d => panic!("{k}: unexpected dtype {d:?}"),
            };
            (
                k,
                T {
                    shape: v.shape().to_vec(),
                    data,
                },
            )
        })
        .collect()
}

struct Fixture128 {
    t: HashMap<String, T>,
    anchors: Anchors,
}

impl Fixture128 {
    fn new() -> Self {
        Fixture128 {
            t: load("train_128.safetensors"),
            anchors: Anchors::new(&AnchorConfig::d0().with_image_size(128, 128)).unwrap(),
        }
    }

    fn get(&self, key: &str) -> &T {
        self.t
            .get(key)
            .unwrap_or_else(|| panic!("fixture key {key}"))
    }

    fn levels(&self) -> usize {
        self.anchors.num_levels()
    }

    /// Per image: the padded gt rows as effdet saw them.
    fn gt(&self, image: usize) -> (Vec<[f32; 4]>, Vec<i64>) {
        let boxes = self.get("gt_boxes");
        let classes = self.get("gt_classes");
        let g = boxes.shape[1];
        let b = (0..g)
            .map(|i| {
                let o = (image * g + i) * 4;
                [0, 1, 2, 3].map(|j| boxes.data[o + j] as f32)
            })
            .collect();
        let c = (0..g).map(|i| classes.data[image * g + i] as i64).collect();
        (b, c)
    }

    /// effdet's targets for `image`, as `LevelTargets`.
    fn effdet_targets(&self, image: usize) -> LevelTargets {
        let a = self.anchors.anchors_per_location();
        let mut cls = Vec::new();
        let mut boxes = Vec::new();
        for l in 0..self.levels() {
            let (h, w) = self.anchors.feat_sizes()[l];
            let ct = self.get(&format!("cls_target_{l}"));
            let bt = self.get(&format!("box_target_{l}"));
            assert_eq!(ct.shape, vec![2, h, w, a]);
            assert_eq!(bt.shape, vec![2, h, w, a * 4]);
            let n = h * w * a;
            cls.push(ct.i32()[image * n..(image + 1) * n].to_vec());
            boxes.push(bt.f32()[image * n * 4..(image + 1) * n * 4].to_vec());
        }
        LevelTargets {
            cls,
            boxes,
            feat_sizes: self.anchors.feat_sizes().to_vec(),
            anchors_per_location: a,
            num_positives: self.get("num_positives").data[image] as usize,
        }
    }

    fn outputs(&self) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        (0..self.levels())
            .map(|l| {
                (
                    self.get(&format!("cls_out_{l}")).f32(),
                    self.get(&format!("box_out_{l}")).f32(),
                )
            })
            .unzip()
    }
}

fn run(
    class: &[Vec<f32>],
    boxes: &[Vec<f32>],
    targets: &[LevelTargets],
    cfg: &DetectionLoss,
) -> LossOutput {
    let c: Vec<&[f32]> = class.iter().map(|v| v.as_slice()).collect();
    let b: Vec<&[f32]> = boxes.iter().map(|v| v.as_slice()).collect();
    detection_loss_batched(&c, &b, targets, cfg).unwrap()
}

fn rel_l2(ours: &[f32], theirs: &[f64]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&a, &b) in ours.iter().zip(theirs) {
        num += (a as f64 - b).powi(2);
        den += b * b;
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn assert_losses(out: &LossOutput, expected: &T, what: &str) {
    let e = &expected.data;
    for (name, ours, theirs) in [
        ("loss", out.loss, e[0]),
        ("class_loss", out.class_loss, e[1]),
        ("box_loss", out.box_loss, e[2]),
    ] {
        let rel = (ours as f64 - theirs).abs() / theirs.abs();
        eprintln!("{what} {name}: ours {ours}, effdet {theirs}, relative error {rel:.2e}");
        assert!(
            rel <= 1e-5,
            "{what} {name}: ours {ours}, effdet {theirs} (relative error {rel:.2e})"
        );
    }
}

/// Box targets are bit-identical, except `th`/`tw` (codes 2 and 3, `ln` of a ratio), which may
/// differ by one ulp: torch's f32 `log` (MKL) is not correctly rounded, ours is. Returns the
/// number of such one-ulp differences.
fn assert_box_targets(ours: &[f32], theirs: &[f32], what: &str) -> usize {
    assert_eq!(ours.len(), theirs.len(), "{what}");
    let mut ulp_diffs = 0;
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        if a.to_bits() == b.to_bits() {
            continue;
        }
        let ulps = (a.to_bits() as i64 - b.to_bits() as i64).abs();
        assert!(
            i % 4 >= 2 && ulps == 1,
            "{what} box target {i} (code {}): ours {a}, effdet {b}",
            i % 4
        );
        ulp_diffs += 1;
    }
    ulp_diffs
}

#[test]
fn labeler_targets_match_effdet_128() {
    let f = Fixture128::new();
    let labeler = AnchorLabeler::new(&f.anchors, NUM_CLASSES_128, 0.5).unwrap();
    for image in 0..2 {
        let (boxes, classes) = f.gt(image);
        assert!(classes.contains(&-1), "fixture has padding rows");
        let ours = labeler.label_padded(&boxes, &classes).unwrap();
        let theirs = f.effdet_targets(image);
        assert_eq!(ours.num_positives, theirs.num_positives, "image {image}");
        assert_eq!(ours.feat_sizes, theirs.feat_sizes);
        assert_eq!(ours.anchors_per_location, theirs.anchors_per_location);
        let mut ulp_diffs = 0;
        for l in 0..f.levels() {
            assert_eq!(
                ours.cls[l], theirs.cls[l],
                "image {image} level {l} class targets"
            );
            ulp_diffs += assert_box_targets(
                &ours.boxes[l],
                &theirs.boxes[l],
                &format!("image {image} level {l}"),
            );
        }
        eprintln!(
            "image {image}: {} positives, {ulp_diffs} th/tw targets 1 ulp from effdet",
            ours.num_positives
        );
        // The unpadded call gives the same targets.
        let (vb, vc): (Vec<[f32; 4]>, Vec<u32>) = boxes
            .iter()
            .zip(&classes)
            .filter(|&(_, &c)| c > 0)
            .map(|(b, &c)| (*b, c as u32))
            .unzip();
        assert_eq!(labeler.label(&vb, &vc).unwrap(), ours);
    }
}

#[test]
fn loss_and_gradients_match_effdet_128() {
    let f = Fixture128::new();
    let targets = [f.effdet_targets(0), f.effdet_targets(1)];
    let (class, boxes) = f.outputs();
    let cfg = DetectionLoss::d0().with_num_classes(NUM_CLASSES_128);
    let out = run(&class, &boxes, &targets, &cfg);
    let npos = f.get("num_positives").data.iter().sum::<f64>();
    assert_eq!(out.num_positives as f64, npos);
    assert_losses(&out, f.get("losses"), "default");
    for l in 0..f.levels() {
        let gc = f.get(&format!("grad_cls_{l}"));
        let gb = f.get(&format!("grad_box_{l}"));
        let (h, w) = f.anchors.feat_sizes()[l];
        assert_eq!((out.grads[l].height, out.grads[l].width), (h, w));
        let rc = rel_l2(&out.grads[l].class, &gc.data);
        let rb = rel_l2(&out.grads[l].boxes, &gb.data);
        eprintln!("level {l}: gradient relative L2 error class {rc:.2e}, box {rb:.2e}");
        assert!(
            rc <= 1e-4,
            "level {l} class gradient relative L2 error {rc:.2e}"
        );
        assert!(
            rb <= 1e-4,
            "level {l} box gradient relative L2 error {rb:.2e}"
        );
        // Masked codes (target exactly 0) get exactly zero gradient, like autograd.
        for (&g, &t) in out.grads[l].boxes.iter().zip(&gb.data) {
            assert_eq!(g == 0.0, t == 0.0);
        }
    }
}

#[test]
fn labeler_then_loss_matches_effdet() {
    // The whole path on our own targets (whose th/tw may be 1 ulp from effdet's).
    let f = Fixture128::new();
    let labeler = AnchorLabeler::new(&f.anchors, NUM_CLASSES_128, 0.5).unwrap();
    let targets: Vec<LevelTargets> = (0..2)
        .map(|image| {
            let (boxes, classes) = f.gt(image);
            labeler.label_padded(&boxes, &classes).unwrap()
        })
        .collect();
    let (class, boxes) = f.outputs();
    let cfg = DetectionLoss::d0().with_num_classes(NUM_CLASSES_128);
    let out = run(&class, &boxes, &targets, &cfg);
    assert_losses(&out, f.get("losses"), "labeler + loss");
    for l in 0..f.levels() {
        let rc = rel_l2(&out.grads[l].class, &f.get(&format!("grad_cls_{l}")).data);
        let rb = rel_l2(&out.grads[l].boxes, &f.get(&format!("grad_box_{l}")).data);
        assert!(rc <= 1e-4 && rb <= 1e-4, "level {l}: {rc:.2e} {rb:.2e}");
    }
}

#[test]
fn legacy_focal_label_smoothing_and_ignore_match_effdet() {
    let f = Fixture128::new();
    let targets = [f.effdet_targets(0), f.effdet_targets(1)];
    let (class, boxes) = f.outputs();
    let base = DetectionLoss::d0().with_num_classes(NUM_CLASSES_128);

    let legacy = DetectionLoss {
        legacy_focal: true,
        ..base.clone()
    };
    let smooth = DetectionLoss {
        label_smoothing: 0.1,
        ..base.clone()
    };
    let mut ignore_targets = targets.clone();
    let ign = f.get("cls_target_1_ignore").i32();
    let n = ign.len() / 2;
    for (image, t) in ignore_targets.iter_mut().enumerate() {
        t.cls[1] = ign[image * n..(image + 1) * n].to_vec();
        assert!(t.cls[1].contains(&-2));
    }
    for (what, cfg, tg) in [
        ("legacy", &legacy, &targets),
        ("smooth", &smooth, &targets),
        ("ignore", &base, &ignore_targets),
    ] {
        let out = run(&class, &boxes, tg, cfg);
        assert_losses(&out, f.get(&format!("losses_{what}")), what);
        let r = rel_l2(
            &out.grads[1].class,
            &f.get(&format!("grad_cls_1_{what}")).data,
        );
        eprintln!("{what}: level 1 class gradient relative L2 error {r:.2e}");
        assert!(
            r <= 1e-4,
            "{what}: level 1 class gradient relative L2 error {r:.2e}"
        );
    }
}

#[test]
fn per_image_and_batched_apis_agree() {
    let f = Fixture128::new();
    let targets = [f.effdet_targets(0), f.effdet_targets(1)];
    let (class, boxes) = f.outputs();
    let cfg = DetectionLoss::d0().with_num_classes(NUM_CLASSES_128);
    let batched = run(&class, &boxes, &targets, &cfg);
    let a = f.anchors.anchors_per_location();
    let outputs: Vec<Vec<LevelOutput<'_>>> = (0..2)
        .map(|b| {
            f.anchors
                .feat_sizes()
                .iter()
                .enumerate()
                .map(|(l, &(h, w))| {
                    let (cn, bn) = (a * NUM_CLASSES_128 * h * w, a * 4 * h * w);
                    LevelOutput {
                        class: &class[l][b * cn..(b + 1) * cn],
                        boxes: &boxes[l][b * bn..(b + 1) * bn],
                        height: h,
                        width: w,
                    }
                })
                .collect()
        })
        .collect();
    let per_image = detection_loss(&outputs, &targets, &cfg).unwrap();
    assert_eq!(batched, per_image);

    // Mismatched shapes are errors, not panics.
    let mut short = outputs.clone();
    short[1].pop();
    assert!(matches!(
        detection_loss(&short, &targets, &cfg),
        Err(Error::InvalidArgument(_))
    ));
    let mut wrong = outputs.clone();
    wrong[0][2].height = 5;
    assert!(matches!(
        detection_loss(&wrong, &targets, &cfg),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        detection_loss(&outputs, &targets[..1], &cfg),
        Err(Error::InvalidArgument(_))
    ));
    let d0 = DetectionLoss::d0();
    assert!(matches!(
        detection_loss(&outputs, &targets, &d0),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn d0_512_single_box_matches_effdet() {
    let t = load("train_512.safetensors");
    let anchors = Anchors::new(&AnchorConfig::d0()).unwrap();
    let labeler = AnchorLabeler::new(&anchors, 90, 0.5).unwrap();
    let b = &t["gt_boxes"].data;
    let gt = [[b[0] as f32, b[1] as f32, b[2] as f32, b[3] as f32]];
    let class = t["gt_classes"].data[0] as u32;
    let ours = labeler.label(&gt, &[class]).unwrap();
    assert_eq!(ours.num_positives as f64, t["num_positives"].data[0]);
    assert_eq!(ours.feat_sizes, anchors.feat_sizes());
    let cls: Vec<i32> = ours.cls.iter().flatten().copied().collect();
    let boxes: Vec<f32> = ours.boxes.iter().flatten().copied().collect();
    assert_eq!(cls.len(), 49_104);
    let pos_index: Vec<usize> = t["pos_index"].data.iter().map(|&v| v as usize).collect();
    let pos_cls = t["pos_cls"].i32();
    let pos_box = t["pos_box"].f32();
    let our_pos: Vec<usize> = (0..cls.len()).filter(|&i| cls[i] != BACKGROUND).collect();
    assert_eq!(our_pos, pos_index);
    let mut ulp_diffs = 0;
    for (n, &i) in pos_index.iter().enumerate() {
        assert_eq!(cls[i], pos_cls[n], "anchor {i}");
        ulp_diffs += assert_box_targets(
            &boxes[i * 4..i * 4 + 4],
            &pos_box[n * 4..n * 4 + 4],
            &format!("D0 anchor {i}"),
        );
    }
    eprintln!(
        "D0: {} positives, {ulp_diffs} th/tw targets 1 ulp from effdet",
        pos_index.len()
    );
    for i in (0..cls.len()).filter(|&i| cls[i] == BACKGROUND) {
        assert_eq!(&boxes[i * 4..i * 4 + 4], &[0.0; 4]);
    }
}

#[test]
fn labeler_input_errors() {
    let anchors = Anchors::new(&AnchorConfig::d0().with_image_size(128, 128)).unwrap();
    let labeler = AnchorLabeler::new(&anchors, 90, 0.5).unwrap();
    let b = [10.0, 10.0, 40.0, 40.0];
    for (boxes, classes) in [
        (vec![b], vec![]),
        (vec![b], vec![0]),
        (vec![b], vec![91]),
        (vec![[40.0, 10.0, 10.0, 40.0]], vec![1]),
        (vec![[10.0, f32::INFINITY, 40.0, 40.0]], vec![1]),
    ] {
        assert!(matches!(
            labeler.label(&boxes, &classes),
            Err(Error::InvalidArgument(_))
        ));
    }
    // Empty ground truth is valid: no positives, all background.
    let t = labeler.label(&[], &[]).unwrap();
    assert_eq!(t.num_positives, 0);
    assert!(t.cls.iter().flatten().all(|&c| c == BACKGROUND));
}
