//! Post-processing against effdet 0.4.1 / torchvision: anchors, box decoding, hard and soft NMS,
//! and the whole `DetBenchPredict` post-processing end to end.
//!
//! Fixtures in tests/fixtures/postprocess/ come from tools/make_postprocess_fixtures.py.

use std::path::{Path, PathBuf};
use std::time::Instant;

use effdet::Error;
use effdet::postprocess::{
    AnchorConfig, Anchors, ImageInfo, LevelOutput, NmsMethod, PostprocessConfig, batched_nms,
    clip_box, decode_box, decode_boxes, decode_candidates, nms_hard, nms_hard_offset, nms_single,
    postprocess, sigmoid, soft_nms_gaussian, top_k_logits,
};
use serde::Deserialize;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/postprocess")
        .join(name)
}

fn read_json<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let text = std::fs::read_to_string(fixture(name)).expect("fixture readable");
    serde_json::from_str(&text).expect("fixture parses")
}

fn rel_close(a: f32, b: f32, rel: f32) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(f32::MIN_POSITIVE)
}

// ------------------------------------------------------------------------------------------------
// Anchors
// ------------------------------------------------------------------------------------------------

/// FNV-1a 64 over the little-endian bytes of all anchor coordinates.
fn fnv1a64(boxes: &[[f32; 4]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in boxes.iter().flatten() {
        for byte in v.to_le_bytes() {
            h ^= byte as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[test]
fn anchors_d0_match_effdet() {
    let a = Anchors::new(&AnchorConfig::d0()).unwrap();
    assert_eq!(a.len(), 49_104);
    assert_eq!(a.anchors_per_location(), 9);
    assert_eq!(
        a.feat_sizes(),
        &[(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    );
    assert_eq!(a.level_offset(1), Some(64 * 64 * 9));
    // Values printed by effdet: Anchors(3, 7, 3, [(1, 1), (1.4, 0.7), (0.7, 1.4)], 4.0,
    // (512, 512)).boxes[i] (tools/make_postprocess_fixtures.py prints them), i.e. the f32
    // anchors widened to f64 exactly.
    let expected: [(usize, [f64; 4]); 11] = [
        (0, [-12.0, -12.0, 20.0, 20.0]),
        (
            1,
            [
                -7.199999809265137,
                -18.399999618530273,
                15.199999809265137,
                26.399999618530273,
            ],
        ),
        (
            2,
            [
                -18.399999618530273,
                -7.199999809265137,
                26.399999618530273,
                15.199999809265137,
            ],
        ),
        (
            4,
            [
                -10.111115455627441,
                -24.222230911254883,
                18.111116409301758,
                32.222232818603516,
            ],
        ),
        (
            8,
            [
                -31.557783126831055,
                -13.778891563415527,
                39.55778503417969,
                21.778892517089844,
            ],
        ),
        (9, [-12.0, -4.0, 20.0, 28.0]),
        (
            1000,
            [
                0.800000011920929,
                357.6000061035156,
                23.200000762939453,
                402.3999938964844,
            ],
        ),
        (
            36863,
            [
                472.4422302246094,
                490.2210998535156,
                543.5578002929688,
                525.7788696289062,
            ],
        ),
        (36864, [-24.0, -24.0, 40.0, 40.0]),
        (45000, [424.0, 104.0, 488.0, 168.0]),
        (
            49103,
            [
                -120.9245376586914,
                163.53773498535156,
                1016.924560546875,
                732.4622802734375,
            ],
        ),
    ];
    for (i, b) in expected {
        assert_eq!(a.boxes()[i].map(f64::from), b, "anchor {i}");
    }
    // Every anchor bit-exact: FNV-1a 64 of effdet's anchor bytes, computed by the generator.
    assert_eq!(fnv1a64(a.boxes()), 0x34d4_fe4b_8dda_8e4d);
}

#[test]
fn anchors_odd_image_size_match_effdet() {
    // 100x150 is not divisible by the strides: non-integer strides and numpy's arange rule.
    let cfg = AnchorConfig::d0().with_image_size(100, 150);
    let a = Anchors::new(&cfg).unwrap();
    assert_eq!(a.feat_sizes(), &[(13, 19), (7, 10), (4, 5), (2, 3), (1, 2)]);
    let bytes = std::fs::read(fixture("anchors_100x150.bin")).unwrap();
    let expected: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(expected.len(), a.len() * 4);
    for (i, (got, want)) in a.boxes().iter().zip(expected.chunks_exact(4)).enumerate() {
        assert_eq!(got.as_slice(), want, "anchor {i}");
    }
}

#[test]
fn anchor_config_errors() {
    let bad = [
        AnchorConfig {
            min_level: 5,
            max_level: 3,
            ..AnchorConfig::d0()
        },
        AnchorConfig {
            num_scales: 0,
            ..AnchorConfig::d0()
        },
        AnchorConfig {
            aspect_ratios: vec![],
            ..AnchorConfig::d0()
        },
        AnchorConfig {
            aspect_ratios: vec![(1.0, 0.0)],
            ..AnchorConfig::d0()
        },
        AnchorConfig {
            anchor_scale: f64::NAN,
            ..AnchorConfig::d0()
        },
        AnchorConfig::d0().with_image_size(0, 512),
        AnchorConfig {
            max_level: 64,
            ..AnchorConfig::d0()
        },
        // 2^24 x 2^24 input: far too many anchors, refused before allocating.
        AnchorConfig::d0().with_image_size(1 << 24, 1 << 24),
    ];
    for cfg in bad {
        assert!(
            matches!(Anchors::new(&cfg), Err(Error::InvalidArgument(_))),
            "{cfg:?}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Decode and clip
// ------------------------------------------------------------------------------------------------

#[test]
fn decode_matches_hand_computation() {
    // anchor [ymin, xmin, ymax, xmax] = [0, 0, 10, 20]: centre (y 5, x 10), ha 10, wa 20.
    // code (ty 0.5, tx 0.25, th 0, tw 0): centre y = 0.5 * 10 + 5 = 10, x = 0.25 * 20 + 10 = 15,
    // h = 10, w = 20 -> [x1, y1, x2, y2] = [5, 5, 25, 15].
    assert_eq!(
        decode_box([0.5, 0.25, 0.0, 0.0], [0.0, 0.0, 10.0, 20.0]),
        [5.0, 5.0, 25.0, 15.0]
    );
    // ty 0, tx -0.5, th ln 2, tw -ln 2 on anchor [-12, -12, 20, 20] (centre (4, 4), size 32):
    // centre y = 4, x = -0.5 * 32 + 4 = -12; h = 64, w = 16 -> [-20, -28, -4, 36].
    let b = decode_box(
        [0.0, -0.5, std::f32::consts::LN_2, -std::f32::consts::LN_2],
        [-12.0, -12.0, 20.0, 20.0],
    );
    let want = [-20.0, -28.0, -4.0, 36.0];
    for (g, w) in b.iter().zip(want) {
        assert!((g - w).abs() < 1e-4, "{b:?} vs {want:?}");
    }
    // The slice version is the same, and checks lengths.
    let codes = [[0.5, 0.25, 0.0, 0.0], [0.0; 4]];
    let anchors = [[0.0, 0.0, 10.0, 20.0], [1.0, 2.0, 3.0, 4.0]];
    let out = decode_boxes(&codes, &anchors).unwrap();
    assert_eq!(out, vec![[5.0, 5.0, 25.0, 15.0], [2.0, 1.0, 4.0, 3.0]]);
    assert!(matches!(
        decode_boxes(&codes, &anchors[..1]),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn clip_is_clamp_then_min() {
    let size = (128.0, 85.333_336);
    assert_eq!(
        clip_box([-3.0, 10.0, 200.0, 90.0], size),
        [0.0, 10.0, 128.0, 85.333_336]
    );
    let info = ImageInfo {
        img_scale: 150.0 / 128.0,
        orig_width: 150.0,
        orig_height: 100.0,
    };
    assert_eq!(info.clip_size(), (128.0, 100.0f32 / (150.0f32 / 128.0)));
}

// ------------------------------------------------------------------------------------------------
// NMS against torchvision / effdet
// ------------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct NmsFixture {
    boxes: Vec<[f32; 4]>,
    scores: Vec<f32>,
    classes: Vec<u32>,
    cases: Vec<NmsCase>,
}

#[derive(Deserialize)]
struct NmsCase {
    name: String,
    kind: String,
    count: usize,
    keep: Vec<usize>,
    iou_threshold: Option<f32>,
    sigma: Option<f32>,
    min_score: Option<f32>,
    scores: Option<Vec<f32>>,
}

#[test]
fn nms_matches_torchvision_and_effdet() {
    let fx: NmsFixture = read_json("nms.json");
    assert!(fx.cases.len() >= 8);
    for case in &fx.cases {
        let n = case.count;
        let (b, s, c) = (&fx.boxes[..n], &fx.scores[..n], &fx.classes[..n]);
        let all = usize::MAX;
        match case.kind.as_str() {
            "hard" | "hard_offset" | "single" => {
                let thr = case.iou_threshold.unwrap();
                let keep = match case.kind.as_str() {
                    "hard" => nms_hard(b, s, c, thr, all).unwrap(),
                    "hard_offset" => nms_hard_offset(b, s, c, thr, all).unwrap(),
                    _ => nms_single(b, s, thr, all).unwrap(),
                };
                assert_eq!(keep, case.keep, "{}", case.name);
                if case.kind != "single" {
                    // torchvision.ops.batched_nms picked the path the fixture names, except the
                    // forced small per-class case.
                    let dispatched = batched_nms(b, s, c, thr, all).unwrap();
                    if !case.name.contains("small") {
                        assert_eq!(dispatched, case.keep, "{} (dispatch)", case.name);
                    }
                }
                // Early stop is exact.
                let k = keep.len() / 3;
                let short = match case.kind.as_str() {
                    "hard" => nms_hard(b, s, c, thr, k).unwrap(),
                    "hard_offset" => nms_hard_offset(b, s, c, thr, k).unwrap(),
                    _ => nms_single(b, s, thr, k).unwrap(),
                };
                assert_eq!(short, keep[..k], "{} (max_keep {k})", case.name);
            }
            "soft" => {
                let (sigma, min_score) = (case.sigma.unwrap(), case.min_score.unwrap());
                let want = case.scores.as_ref().unwrap();
                let got = soft_nms_gaussian(b, s, c, sigma, min_score, all).unwrap();
                let idx: Vec<usize> = got.iter().map(|g| g.0).collect();
                assert_eq!(idx, case.keep, "{}", case.name);
                let max_err = got
                    .iter()
                    .zip(want)
                    .map(|(g, w)| (g.1 - w).abs() / w)
                    .fold(0f32, f32::max);
                eprintln!("{}: max relative score error {max_err:e}", case.name);
                for (i, (g, w)) in got.iter().zip(want).enumerate() {
                    assert!(
                        rel_close(g.1, *w, 1e-6),
                        "{} #{i}: score {} vs effdet {w}",
                        case.name,
                        g.1
                    );
                }
                let short = soft_nms_gaussian(b, s, c, sigma, min_score, 25).unwrap();
                assert_eq!(short, got[..25], "{} (max_keep 25)", case.name);
            }
            other => panic!("unknown case kind {other}"),
        }
    }
}

#[test]
fn nms_ties_and_edge_cases() {
    // Equal scores: the earlier box wins (stable order), for hard and soft NMS.
    let b = [
        [0.0, 0.0, 10.0, 10.0],
        [0.0, 0.0, 10.0, 10.0],
        [50.0, 50.0, 60.0, 60.0],
    ];
    let s = [0.5, 0.5, 0.5];
    let c = [0, 0, 0];
    assert_eq!(nms_hard(&b, &s, &c, 0.5, usize::MAX).unwrap(), vec![0, 2]);
    assert_eq!(
        nms_hard_offset(&b, &s, &c, 0.5, usize::MAX).unwrap(),
        vec![0, 2]
    );
    let soft = soft_nms_gaussian(&b, &s, &c, 0.5, 0.001, usize::MAX).unwrap();
    assert_eq!(soft[0], (0, 0.5));
    assert_eq!(soft[1], (2, 0.5));
    assert_eq!(soft[2].0, 1);
    assert!((soft[2].1 - 0.5 * (-2.0f32).exp()).abs() < 1e-7);
    // Different classes never suppress each other (positive coordinates).
    assert_eq!(
        nms_hard(&b, &s, &[0, 1, 0], 0.5, usize::MAX).unwrap(),
        vec![0, 1, 2]
    );
    // IoU exactly at the threshold is kept (strictly greater suppresses): IoU([0,0,2,1],
    // [0,0,1,1]) = 0.5.
    let b2 = [[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]];
    assert_eq!(
        nms_single(&b2, &[0.9, 0.8], 0.5, usize::MAX).unwrap(),
        vec![0, 1]
    );
    // Empty input, length mismatches.
    assert!(nms_hard(&[], &[], &[], 0.5, 10).unwrap().is_empty());
    assert!(batched_nms(&[], &[], &[], 0.5, 10).unwrap().is_empty());
    assert!(
        soft_nms_gaussian(&[], &[], &[], 0.5, 0.0, 10)
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        nms_hard(&b, &s[..2], &c, 0.5, 10),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        nms_single(&b, &s[..1], 0.5, 10),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        soft_nms_gaussian(&b, &s, &c[..1], 0.5, 0.0, 10),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        soft_nms_gaussian(&b, &s, &c, 0.0, 0.0, 10),
        Err(Error::InvalidArgument(_))
    ));
}

// ------------------------------------------------------------------------------------------------
// Synthetic head outputs (mirror of tools/make_postprocess_fixtures.py `synthetic_levels`)
// ------------------------------------------------------------------------------------------------

const MASK24: u64 = 0xff_ffff;
const CLASS_SEED: u64 = 12345;
const BOX_SEED: u64 = 777_777;
const OBJECTS: [(usize, usize, usize, usize, usize); 7] = [
    (0, 10, 10, 60, 50),
    (0, 40, 30, 100, 90),
    (2, 60, 0, 128, 40),
    (5, 0, 60, 70, 128),
    (17, 20, 20, 110, 110),
    (5, 50, 70, 90, 110),
    (44, 0, 0, 128, 128),
];
const OBJECT_BONUS: f32 = 7.0;

fn perm24(x: u64) -> u64 {
    let mut x = x & MASK24;
    x = (x * 0x9e3b5) & MASK24;
    x ^= x >> 12;
    x = (x * 0xc2b2af) & MASK24;
    x ^= x >> 11;
    x = (x * 0x2c1b3d) & MASK24;
    x ^= x >> 13;
    x
}

fn unit(i: u64, seed: u64) -> f32 {
    perm24((i + seed) & MASK24) as f32 * (1.0 / 16_777_216.0)
}

/// Per level (class [A*K, H, W], boxes [A*4, H, W]) for square inputs, bit-exact with Python.
fn synthetic_levels(anchors: &Anchors, num_classes: usize) -> LevelData {
    let a = anchors.anchors_per_location();
    let img_w = anchors.image_size().1;
    let (mut cls_base, mut box_base) = (0u64, 0u64);
    let mut out = Vec::new();
    for &(h, w) in anchors.feat_sizes() {
        let stride = img_w / w;
        let hw = h * w;
        let n_cls = a * num_classes * hw;
        let cls: Vec<f32> = (0..n_cls)
            .map(|p| {
                let u = unit(cls_base + p as u64, CLASS_SEED);
                let s = (1.0 - u).sqrt().sqrt();
                let mut logit = 0.0 - 20.0 * s;
                let class = (p / hw) % num_classes;
                let col2 = (2 * (p % w) + 1) * stride;
                let row2 = (2 * ((p / w) % h) + 1) * stride;
                for &(oc, x0, y0, x1, y1) in &OBJECTS {
                    if class == oc
                        && col2 >= 2 * x0
                        && col2 < 2 * x1
                        && row2 >= 2 * y0
                        && row2 < 2 * y1
                    {
                        logit += OBJECT_BONUS;
                    }
                }
                logit
            })
            .collect();
        cls_base += n_cls as u64;
        let n_box = a * 4 * hw;
        let boxes: Vec<f32> = (0..n_box)
            .map(|p| {
                let centred = unit(box_base + p as u64, BOX_SEED) - 0.5;
                let scale = if (p / hw) % 4 < 2 { 0.25 } else { 0.5 };
                centred * scale
            })
            .collect();
        box_base += n_box as u64;
        out.push((cls, boxes));
    }
    out
}

fn level_views<'a>(anchors: &Anchors, data: &'a [(Vec<f32>, Vec<f32>)]) -> Vec<LevelOutput<'a>> {
    data.iter()
        .zip(anchors.feat_sizes())
        .map(|((c, b), &(h, w))| LevelOutput {
            class: c,
            boxes: b,
            height: h,
            width: w,
        })
        .collect()
}

// ------------------------------------------------------------------------------------------------
// End to end against effdet `_post_process` + `_batch_detection`
// ------------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct E2eFixture {
    image_size: (usize, usize),
    num_classes: usize,
    feat_sizes: Vec<(usize, usize)>,
    input_samples: Vec<InputSample>,
    topk_flat_indices: Vec<usize>,
    cases: Vec<E2eCase>,
}

#[derive(Deserialize)]
struct InputSample {
    level: usize,
    tensor: String,
    index: usize,
    value: f32,
}

#[derive(Deserialize)]
struct E2eCase {
    name: String,
    nms: String,
    max_detection_points: usize,
    img_info: Option<E2eInfo>,
    detections: Vec<(f32, f32, f32, f32, f32, u32)>,
}

#[derive(Deserialize)]
struct E2eInfo {
    img_scale: f32,
    orig_width: f32,
    orig_height: f32,
}

/// Per level: (class logits, box codes), NCHW.
type LevelData = Vec<(Vec<f32>, Vec<f32>)>;

fn e2e_setup() -> (E2eFixture, Anchors, LevelData) {
    let fx: E2eFixture = read_json("e2e.json");
    let cfg = AnchorConfig::d0().with_image_size(fx.image_size.0, fx.image_size.1);
    let anchors = Anchors::new(&cfg).unwrap();
    assert_eq!(anchors.feat_sizes(), fx.feat_sizes.as_slice());
    let data = synthetic_levels(&anchors, fx.num_classes);
    for s in &fx.input_samples {
        let t = match s.tensor.as_str() {
            "class" => &data[s.level].0,
            _ => &data[s.level].1,
        };
        assert_eq!(
            t[s.index].to_bits(),
            s.value.to_bits(),
            "synthetic input differs from the generator's: level {} {} [{}]",
            s.level,
            s.tensor,
            s.index
        );
    }
    (fx, anchors, data)
}

#[test]
fn top_k_matches_torch_topk() {
    let (fx, anchors, data) = e2e_setup();
    let levels = level_views(&anchors, &data);
    let k = fx.topk_flat_indices.len();
    let got = top_k_logits(&levels, &anchors, fx.num_classes, k).unwrap();
    let flat: Vec<usize> = got
        .iter()
        .map(|c| c.anchor * fx.num_classes + c.class)
        .collect();
    assert_eq!(flat, fx.topk_flat_indices);
}

#[test]
fn end_to_end_matches_effdet() {
    let (fx, anchors, data) = e2e_setup();
    let levels = level_views(&anchors, &data);
    assert!(fx.cases.len() >= 6);
    for case in &fx.cases {
        let cfg = PostprocessConfig {
            num_classes: fx.num_classes,
            max_detection_points: case.max_detection_points,
            nms: match case.nms.as_str() {
                "soft" => NmsMethod::EFFDET_SOFT,
                _ => NmsMethod::Hard,
            },
            ..PostprocessConfig::default()
        };
        let info = case.img_info.as_ref().map(|i| ImageInfo {
            img_scale: i.img_scale,
            orig_width: i.orig_width,
            orig_height: i.orig_height,
        });
        let dets = postprocess(&levels, &anchors, info, &cfg).unwrap();
        assert_eq!(dets.len(), case.detections.len(), "{}", case.name);
        let (mut score_err, mut box_err) = (0f32, 0f32);
        for (i, (d, w)) in dets.iter().zip(&case.detections).enumerate() {
            let want_box = [w.0, w.1, w.2, w.3];
            score_err = score_err.max((d.score - w.4).abs() / w.4);
            for (g, e) in d.bbox.iter().zip(want_box) {
                box_err = box_err.max((g - e).abs());
            }
            assert_eq!(d.class_id, w.5, "{} #{i}: class", case.name);
            assert!(
                rel_close(d.score, w.4, 1e-6),
                "{} #{i}: score {} vs effdet {}",
                case.name,
                d.score,
                w.4
            );
            for (g, e) in d.bbox.iter().zip(want_box) {
                assert!(
                    (g - e).abs() <= 1e-4,
                    "{} #{i}: box {:?} vs effdet {want_box:?}",
                    case.name,
                    d.bbox
                );
            }
        }
        eprintln!(
            "{}: {} detections, max relative score error {score_err:e}, max box error {box_err:e} px",
            case.name,
            dets.len()
        );
    }
}

/// The public stages (top-k, decode + clip, sigmoid, NMS, scale) reproduce `postprocess`.
#[test]
fn staged_pipeline_equals_postprocess() {
    let (fx, anchors, data) = e2e_setup();
    let levels = level_views(&anchors, &data);
    let info = ImageInfo {
        img_scale: 150.0 / 128.0,
        orig_width: 150.0,
        orig_height: 100.0,
    };
    let cands = top_k_logits(&levels, &anchors, fx.num_classes, 5000).unwrap();
    let boxes = decode_candidates(&levels, &anchors, &cands, Some(info)).unwrap();
    assert!(boxes.iter().flatten().all(|&v| (0.0..=128.0).contains(&v)));
    let scores: Vec<f32> = cands.iter().map(|c| sigmoid(c.logit)).collect();
    let classes: Vec<u32> = cands.iter().map(|c| c.class as u32).collect();
    let cfg = PostprocessConfig {
        num_classes: fx.num_classes,
        ..PostprocessConfig::default()
    };
    let whole = postprocess(&levels, &anchors, Some(info), &cfg).unwrap();
    let keep = nms_hard(&boxes, &scores, &classes, 0.5, 100).unwrap();
    assert_eq!(keep.len(), whole.len());
    for (&i, d) in keep.iter().zip(&whole) {
        assert_eq!(boxes[i].map(|v| v * info.img_scale), d.bbox);
        assert_eq!((scores[i], classes[i] + 1), (d.score, d.class_id));
    }
    let soft = PostprocessConfig {
        nms: NmsMethod::EFFDET_SOFT,
        ..cfg
    };
    let whole = postprocess(&levels, &anchors, Some(info), &soft).unwrap();
    let kept = soft_nms_gaussian(&boxes, &scores, &classes, 0.5, 0.001, 100).unwrap();
    assert_eq!(kept.len(), whole.len());
    for (&(i, s), d) in kept.iter().zip(&whole) {
        assert_eq!((s, classes[i] + 1), (d.score, d.class_id));
    }
    // Out-of-range candidates are an error, not a panic.
    let mut bad = cands[..1].to_vec();
    bad[0].anchor = anchors.len();
    assert!(matches!(
        decode_candidates(&levels, &anchors, &bad, None),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn score_threshold_and_empty_results() {
    let (fx, anchors, data) = e2e_setup();
    let levels = level_views(&anchors, &data);
    let base = PostprocessConfig {
        num_classes: fx.num_classes,
        ..PostprocessConfig::default()
    };
    let all = postprocess(&levels, &anchors, None, &base).unwrap();
    assert_eq!(all.len(), 100);
    let thr = PostprocessConfig {
        score_threshold: 0.8,
        ..base.clone()
    };
    let kept = postprocess(&levels, &anchors, None, &thr).unwrap();
    let expect: Vec<_> = all.iter().copied().filter(|d| d.score >= 0.8).collect();
    assert!(!kept.is_empty() && kept.len() < all.len());
    assert_eq!(kept, expect);
    // Nothing passes: empty, not padded.
    let none = PostprocessConfig {
        score_threshold: 1.5,
        ..base.clone()
    };
    assert!(
        postprocess(&levels, &anchors, None, &none)
            .unwrap()
            .is_empty()
    );
    let zero = PostprocessConfig {
        max_detections: 0,
        ..base.clone()
    };
    assert!(
        postprocess(&levels, &anchors, None, &zero)
            .unwrap()
            .is_empty()
    );
    // Fewer candidates than max_detections.
    let few = PostprocessConfig {
        max_detection_points: 7,
        ..base
    };
    let d = postprocess(&levels, &anchors, None, &few).unwrap();
    assert!(!d.is_empty() && d.len() <= 7);
}

#[test]
fn postprocess_input_errors() {
    let (fx, anchors, data) = e2e_setup();
    let levels = level_views(&anchors, &data);
    let cfg = PostprocessConfig {
        num_classes: fx.num_classes,
        ..PostprocessConfig::default()
    };
    let is_invalid = |r: effdet::Result<_>| matches!(r, Err(Error::InvalidArgument(_)));
    // Zero levels, missing level.
    assert!(is_invalid(postprocess(&[], &anchors, None, &cfg)));
    assert!(is_invalid(postprocess(&levels[..4], &anchors, None, &cfg)));
    // Wrong class / box slice lengths.
    let mut l = levels.clone();
    l[2].class = &data[2].0[1..];
    assert!(is_invalid(postprocess(&l, &anchors, None, &cfg)));
    let mut l = levels.clone();
    l[4].boxes = &data[4].1[..8];
    assert!(is_invalid(postprocess(&l, &anchors, None, &cfg)));
    // Level size disagreeing with the anchors.
    let mut l = levels.clone();
    l[0].height = 8;
    l[0].width = 32;
    assert!(is_invalid(postprocess(&l, &anchors, None, &cfg)));
    // num_classes disagreeing with the class outputs, and zero classes.
    for num_classes in [0, 80] {
        let c = PostprocessConfig {
            num_classes,
            ..cfg.clone()
        };
        assert!(is_invalid(postprocess(&levels, &anchors, None, &c)));
    }
    // Bad parameters.
    let c = PostprocessConfig {
        iou_threshold: f32::NAN,
        ..cfg.clone()
    };
    assert!(is_invalid(postprocess(&levels, &anchors, None, &c)));
    let c = PostprocessConfig {
        nms: NmsMethod::SoftGaussian {
            sigma: -1.0,
            min_score: 0.001,
        },
        ..cfg.clone()
    };
    assert!(is_invalid(postprocess(&levels, &anchors, None, &c)));
    let info = ImageInfo {
        img_scale: 0.0,
        orig_width: 10.0,
        orig_height: 10.0,
    };
    assert!(is_invalid(postprocess(&levels, &anchors, Some(info), &cfg)));
    // The wrong anchors (D0 512x512 vs 128x128 outputs).
    let d0 = Anchors::new(&AnchorConfig::d0()).unwrap();
    assert!(is_invalid(postprocess(&levels, &d0, None, &cfg)));
    // top_k_logits checks its own inputs.
    assert!(matches!(
        top_k_logits(&levels[..3], &anchors, 90, 10),
        Err(Error::InvalidArgument(_))
    ));
}

// ------------------------------------------------------------------------------------------------
// D0 scale: top-k against a full sort, including heavy ties; timing
// ------------------------------------------------------------------------------------------------

/// Reference top-k: sort everything by (value desc, flat index asc); NaN largest.
fn naive_top_k(levels: &[LevelOutput], anchors: &Anchors, k: usize) -> Vec<(usize, usize)> {
    let a = anchors.anchors_per_location();
    let mut all = Vec::new();
    for (l, level) in levels.iter().enumerate() {
        let hw = level.height * level.width;
        let off = anchors.level_offset(l).unwrap();
        for (p, &v) in level.class.iter().enumerate() {
            let (ch, s) = (p / hw, p % hw);
            let (an, c) = (ch / 90, ch % 90);
            all.push((v, (off + s * a + an) * 90 + c));
        }
    }
    all.sort_by(|x, y| {
        let (vx, vy) = (x.0, y.0);
        let ord = match (vx.is_nan(), vy.is_nan()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Less,
            (false, true) => std::cmp::Ordering::Greater,
            _ => vy.partial_cmp(&vx).unwrap(),
        };
        ord.then(x.1.cmp(&y.1))
    });
    all.truncate(k);
    all.into_iter().map(|(_, f)| (f / 90, f % 90)).collect()
}

#[test]
fn d0_scale_top_k_and_ties() {
    let anchors = Anchors::new(&AnchorConfig::d0()).unwrap();
    let mut data = synthetic_levels(&anchors, 90);
    {
        let levels = level_views(&anchors, &data);
        assert_eq!(
            levels.iter().map(|l| l.class.len()).sum::<usize>(),
            49_104 * 90
        );
        let t = Instant::now();
        let got = top_k_logits(&levels, &anchors, 90, 5000).unwrap();
        let topk_time = t.elapsed();
        let want = naive_top_k(&levels, &anchors, 5000);
        let got_pairs: Vec<_> = got.iter().map(|c| (c.anchor, c.class)).collect();
        assert_eq!(got_pairs, want);
        let t = Instant::now();
        let dets = postprocess(&levels, &anchors, None, &PostprocessConfig::default()).unwrap();
        let hard_time = t.elapsed();
        let soft = PostprocessConfig {
            nms: NmsMethod::EFFDET_SOFT,
            ..PostprocessConfig::default()
        };
        let t = Instant::now();
        let soft_dets = postprocess(&levels, &anchors, None, &soft).unwrap();
        let soft_time = t.elapsed();
        assert_eq!(dets.len(), 100);
        assert_eq!(soft_dets.len(), 100);
        eprintln!(
            "D0 (4.4M logits): top-k {topk_time:?}, postprocess hard {hard_time:?}, soft {soft_time:?}"
        );
    }
    // Heavy ties: quantise the logits to 1/2 steps plus some NaN and -0.0 / 0.0 values; the k-th
    // boundary then falls inside a large group of equal values, resolved by lowest index.
    for (l, (cls, _)) in data.iter_mut().enumerate() {
        for (i, v) in cls.iter_mut().enumerate() {
            *v = (*v * 2.0).round() / 2.0;
            if (i + l) % 100_003 == 7 {
                *v = f32::NAN;
            } else if *v == 0.0 && i % 2 == 0 {
                *v = -0.0;
            }
        }
    }
    let levels = level_views(&anchors, &data);
    for k in [1, 100, 5000, 20_000] {
        let got = top_k_logits(&levels, &anchors, 90, k).unwrap();
        let got_pairs: Vec<_> = got.iter().map(|c| (c.anchor, c.class)).collect();
        assert_eq!(got_pairs, naive_top_k(&levels, &anchors, k), "k = {k}");
    }
    // k larger than the number of logits: everything, sorted.
    let small = Anchors::new(&AnchorConfig::d0().with_image_size(16, 16)).unwrap();
    let sd = synthetic_levels(&small, 90);
    let sl = level_views(&small, &sd);
    let total: usize = sl.iter().map(|l| l.class.len()).sum();
    let got = top_k_logits(&sl, &small, 90, total + 10).unwrap();
    assert_eq!(got.len(), total);
    assert!(got.windows(2).all(|w| w[0].logit >= w[1].logit));
}
