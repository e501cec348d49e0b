//! Golden tests: the whole pipeline against fixtures written by effdet itself
//! (`tools/make_golden.py`: tf_efficientdet_d0 with seeded random weights whose BN statistics
//! were calibrated on images and whose predictors were scaled so scores spread over (0, 1)).
//!
//! Tolerances and why:
//! - Resized images: bit-exact (both sides implement Pillow's fixed-point bilinear).
//! - Raw outputs: relative L2 <= 1e-4 per level and head. Both sides compute in f32 with
//!   different summation orders (GEMM blocking, BN folded here but not in PyTorch), which leaves
//!   ~1e-6; 1e-4 is the bound and still catches any wrong layer (errors there are O(1)).
//! - Detections: class equal, score within 1e-4, box within 0.01 px. Where two candidates' scores
//!   are within 1e-4 of each other their order may legitimately swap; at the 100-detection cut-off
//!   such a near-tie can swap which one is kept, so unmatched detections are allowed only when
//!   their score is within 1e-4 of the cut-off score.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use effdet::compute::Tensor;
use effdet::image_io::{DecodedImage, load_image};
use effdet::postprocess::{NmsMethod, PostprocessConfig};
use effdet::preprocess::{Letterbox, RgbImage, resize_bilinear};
use effdet::{Detection, Detector, DetectorOptions, Frame, PixelFormat};
use safetensors::Dtype;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/golden");
const IMAGES: usize = 3;

/// The golden tensors, decoded by dtype.
struct Golden {
    f32s: HashMap<String, Vec<f32>>,
    f64s: HashMap<String, Vec<f64>>,
    i64s: HashMap<String, Vec<i64>>,
}

impl Golden {
    fn f32(&self, k: &str) -> &[f32] {
        self.f32s
            .get(k)
            .unwrap_or_else(|| panic!("fixture lacks {k}"))
    }
    fn f64(&self, k: &str) -> f64 {
        self.f64s
            .get(k)
            .unwrap_or_else(|| panic!("fixture lacks {k}"))[0]
    }
}

fn golden() -> &'static Golden {
    static G: OnceLock<Golden> = OnceLock::new();
    G.get_or_init(|| {
        let bytes = std::fs::read(Path::new(DIR).join("golden.safetensors"))
            .expect("golden fixture present");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden fixture parses");
        let mut g = Golden {
            f32s: HashMap::new(),
            f64s: HashMap::new(),
            i64s: HashMap::new(),
        };
        for (k, v) in st.tensors() {
            let d = v.data();
            match v.dtype() {
                Dtype::F32 => {
                    g.f32s.insert(
                        k,
                        d.chunks_exact(4)
                            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                            .collect(),
                    );
                }
                Dtype::F64 => {
                    g.f64s.insert(
                        k,
                        d.chunks_exact(8)
                            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                            .collect(),
                    );
                }
                Dtype::I64 => {
                    g.i64s.insert(
                        k,
                        d.chunks_exact(8)
                            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                            .collect(),
                    );
                }
                other => panic!("unexpected dtype {other:?} for {k}"),
            }
        }
        g
    })
}

fn detector() -> &'static Detector {
    static D: OnceLock<Detector> = OnceLock::new();
    D.get_or_init(|| {
        Detector::new(
            Path::new(DIR).join("weights_f16.safetensors"),
            DetectorOptions::default(),
        )
        .expect("fixture weights load")
    })
}

fn image(i: usize) -> DecodedImage {
    load_image(Path::new(DIR).join(format!("img{i}.png"))).expect("fixture image decodes")
}

fn all_detections(nms: NmsMethod) -> PostprocessConfig {
    PostprocessConfig {
        score_threshold: 0.0,
        nms,
        ..PostprocessConfig::default()
    }
}

#[test]
fn resize_is_bit_exact_with_effdet() {
    let g = golden();
    for i in 0..IMAGES {
        let img = image(i);
        let lb = Letterbox::new(img.width, img.height, 512).unwrap();
        assert_eq!(
            lb.img_scale,
            g.f64(&format!("img{i}.img_scale")),
            "img{i} img_scale"
        );
        let src = RgbImage::new(img.width, img.height, img.rgb.clone()).unwrap();
        let ours = resize_bilinear(&src, lb.resized_width, lb.resized_height);
        let want = load_image(Path::new(DIR).join(format!("img{i}_resized.png"))).unwrap();
        assert_eq!(
            (want.width, want.height),
            (lb.resized_width, lb.resized_height),
            "img{i} resized size"
        );
        assert!(
            ours.data == want.rgb,
            "img{i}: resized pixels differ from Pillow's"
        );
    }
}

#[test]
fn normalised_input_matches_effdet() {
    let g = golden();
    let d = detector();
    for i in 0..IMAGES {
        let img = image(i);
        let (input, _) = d.preprocess(&[img.frame().unwrap()]).unwrap();
        let sum: f64 = input.data().iter().map(|&v| v as f64).sum();
        let want = g.f64(&format!("img{i}.input_sum"));
        // Same f32 values summed in a different order: agreement to ~1e-9 relative.
        assert!(
            (sum - want).abs() <= 1e-7 * want.abs().max(1.0),
            "img{i}: input sum {sum} vs {want}"
        );
    }
}

fn rel_l2(ours: &[f32], want: &[f32]) -> f64 {
    let num: f64 = ours
        .iter()
        .zip(want)
        .map(|(a, b)| ((*a - *b) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Values of `t` ([1, C, H, W]) at the flat positions, laid out [P, C] like the fixture.
fn gather(t: &Tensor, positions: &[i64]) -> Vec<f32> {
    let [_, c, h, w] = t.dims4("gather").unwrap();
    let mut out = Vec::with_capacity(positions.len() * c);
    for &p in positions {
        for ch in 0..c {
            out.push(t.data()[ch * h * w + p as usize]);
        }
    }
    out
}

#[test]
fn raw_outputs_match_effdet() {
    let g = golden();
    let d = detector();
    for i in 0..IMAGES {
        let img = image(i);
        let (input, _) = d.preprocess(&[img.frame().unwrap()]).unwrap();
        let outputs = d.forward(&input).unwrap();
        assert_eq!(outputs.len(), 5);
        for (l, o) in outputs.iter().enumerate() {
            let pos = &g.i64s[&format!("level{l}.positions")];
            for (name, t) in [("class", &o.class), ("box", &o.boxes)] {
                let key = format!("img{i}.level{l}.{name}");
                let err = rel_l2(&gather(t, pos), g.f32(&key));
                assert!(err <= 1e-4, "{key}: relative L2 {err:.3e} > 1e-4");
                // Whole-tensor check: sum of squares (all positions, not only the sampled ones).
                let sumsq: f64 = t.data().iter().map(|&v| (v as f64).powi(2)).sum();
                let want = g.f64(&format!("img{i}.level{l}.{name}_sumsq"));
                assert!(
                    ((sumsq - want) / want).abs() <= 2e-4,
                    "{key}: sum of squares {sumsq} vs {want}"
                );
            }
        }
    }
}

/// The fixture's detections (effdet pads with zero rows; those are dropped).
fn fixture_detections(g: &Golden, key: &str) -> Vec<[f32; 6]> {
    g.f32(key)
        .chunks_exact(6)
        .map(|r| [r[0], r[1], r[2], r[3], r[4], r[5]])
        .filter(|r| r[5] != 0.0)
        .collect()
}

fn same(d: &Detection, r: &[f32; 6]) -> bool {
    d.class_id as f32 == r[5]
        && (d.score - r[4]).abs() <= 1e-4
        && [d.x1, d.y1, d.x2, d.y2]
            .iter()
            .zip(r)
            .all(|(a, b)| (a - b).abs() <= 0.01)
}

fn assert_detections_match(ours: &[Detection], want: &[[f32; 6]], what: &str) {
    assert_eq!(ours.len(), want.len(), "{what}: number of detections");
    let cutoff = want.last().map_or(0.0, |r| r[4]);
    let mut used = vec![false; want.len()];
    let mut unmatched = Vec::new();
    for (k, d) in ours.iter().enumerate() {
        // In order where possible; otherwise any unused fixture row (near-tie reordering).
        let hit = if same(d, &want[k]) && !used[k] {
            Some(k)
        } else {
            (0..want.len()).find(|&j| !used[j] && same(d, &want[j]))
        };
        match hit {
            Some(j) => used[j] = true,
            None => unmatched.push(d.clone()),
        }
    }
    for d in &unmatched {
        assert!(
            (d.score - cutoff).abs() <= 1e-4,
            "{what}: detection {d:?} has no counterpart in effdet's output and is not a cut-off near-tie"
        );
    }
    // Scores are sorted best first, like effdet's.
    assert!(
        ours.windows(2).all(|w| w[0].score >= w[1].score),
        "{what}: not sorted"
    );
}

#[test]
fn detections_match_effdet_hard_nms() {
    let g = golden();
    let d = detector();
    for i in 0..IMAGES {
        let img = image(i);
        let ours = d
            .detect_batch_with(&[img.frame().unwrap()], &all_detections(NmsMethod::Hard))
            .unwrap()
            .remove(0);
        let want = fixture_detections(g, &format!("img{i}.detections"));
        assert_eq!(want.len(), 100, "fixture img{i} should have 100 detections");
        assert_detections_match(&ours, &want, &format!("img{i} hard NMS"));
    }
}

#[test]
fn detections_match_effdet_soft_nms() {
    let g = golden();
    let d = detector();
    for i in 0..IMAGES {
        let img = image(i);
        let ours = d
            .detect_batch_with(
                &[img.frame().unwrap()],
                &all_detections(NmsMethod::EFFDET_SOFT),
            )
            .unwrap()
            .remove(0);
        let want = fixture_detections(g, &format!("img{i}.detections_soft"));
        assert_detections_match(&ours, &want, &format!("img{i} soft NMS"));
    }
}

#[test]
fn batch_equals_one_by_one() {
    let d = detector();
    let imgs: Vec<_> = (0..IMAGES).map(image).collect();
    let frames: Vec<Frame> = imgs.iter().map(|m| m.frame().unwrap()).collect();
    let batch = d.detect_batch(&frames).unwrap();
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(
            batch[i],
            d.detect(f).unwrap(),
            "img{i}: batched result differs"
        );
    }
}

#[test]
fn packed_rgb_formats_with_padded_strides_give_identical_detections() {
    let d = detector();
    let img = image(1); // 333x500: odd width
    let want = d.detect(&img.frame().unwrap()).unwrap();
    for (format, order) in [
        (PixelFormat::Bgrx, [2usize, 1, 0]),
        (PixelFormat::Rgba, [0, 1, 2]),
        (PixelFormat::Bgra, [2, 1, 0]),
    ] {
        let stride = img.width * 4 + 12; // padded rows
        let offset = 7;
        let mut buf = vec![0xAAu8; offset + stride * img.height];
        for y in 0..img.height {
            for x in 0..img.width {
                let s = (y * img.width + x) * 3;
                let o = offset + y * stride + x * 4;
                for c in 0..3 {
                    buf[o + order[c]] = img.rgb[s + c];
                }
            }
        }
        let frame = Frame::new(format, img.width, img.height, &buf, &[stride], &[offset]).unwrap();
        assert_eq!(d.detect(&frame).unwrap(), want, "{format}");
    }
}

#[test]
fn f16_and_f32_weight_files_give_identical_results() {
    // Re-save the f16 fixture as f32: the values are identical, so must be every output.
    let bytes = std::fs::read(Path::new(DIR).join("weights_f16.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let converted: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            if v.dtype() == Dtype::F16 {
                let data = v
                    .data()
                    .chunks_exact(2)
                    .flat_map(|b| {
                        half::f16::from_le_bytes([b[0], b[1]])
                            .to_f32()
                            .to_le_bytes()
                    })
                    .collect();
                (k, Dtype::F32, v.shape().to_vec(), data)
            } else {
                (k, v.dtype(), v.shape().to_vec(), v.data().to_vec())
            }
        })
        .collect();
    let views: HashMap<String, safetensors::tensor::TensorView<'_>> = converted
        .iter()
        .map(|(k, dt, s, d)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), d).unwrap(),
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights_f32.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let d32 = Detector::new(&path, DetectorOptions::default()).unwrap();
    let img = image(0);
    assert_eq!(
        d32.detect(&img.frame().unwrap()).unwrap(),
        detector().detect(&img.frame().unwrap()).unwrap()
    );
}
