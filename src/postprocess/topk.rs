//! Top-k selection of (anchor, class) logits over all levels (effdet's `_post_process`).
//!
//! effdet flattens every level to `[H*W*A, K]` (NHWC), concatenates the levels and runs
//! `torch.topk` over the `N_anchors * K` logits. This module reads the NCHW head outputs in
//! place, without permuting or sorting the ~4.4 million logits of D0: a threshold at or below
//! the k-th largest logit is guessed from a strided sample of order-preserving keys, one
//! parallel pass gathers the few thousand logits at or above it, and only those are selected
//! and sorted. If the guess admits fewer than k logits (unlucky or adversarial data), an exact
//! threshold from a parallel 16-bit radix histogram is used instead, so the result never
//! depends on the sample.
//!
//! Order and ties: the result is sorted by logit descending; equal logits are ordered by their
//! flat effdet index `anchor * K + class` ascending, so at the k-th value the lowest indices
//! win. (`torch.topk` leaves tie order unspecified; with distinct logits both agree exactly.)
//! NaN counts as larger than every number (as in `torch.topk`), and `-0.0` equals `0.0`.

use rayon::prelude::*;

use super::{Anchors, LevelOutput, check_levels};
use crate::error::Result;

/// One selected logit: which anchor (index into [`super::Anchors::boxes`]), which class
/// (0-based) and the raw logit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// Anchor index over all levels, in effdet order.
    pub anchor: usize,
    /// 0-based class index.
    pub class: usize,
    /// The class logit (before sigmoid).
    pub logit: f32,
}

/// Elements per parallel work item in the gather and histogram passes.
const CHUNK: usize = 1 << 16;
/// Bits of the key used by the histogram.
const HIST_BITS: u32 = 16;

/// Maps an f32 to a u32 whose unsigned order is the float order, with every NaN mapped to one
/// key above `+inf` and `-0.0` mapped onto `0.0` (branch-free apart from two selects).
#[inline(always)]
pub(crate) fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    // Negative floats: flip all bits; positive: set the sign bit.
    let k = b ^ ((((b as i32) >> 31) as u32) | 0x8000_0000);
    // NaNs sit above +inf (key 0xff80_0000) or, with the sign bit set, below -inf (0x007f_ffff).
    let k = if !(0x007f_ffff..=0xff80_0000).contains(&k) {
        NAN_KEY
    } else {
        k
    };
    // -0.0 sorts just below +0.0; make them equal.
    if k == 0x7fff_ffff { 0x8000_0000 } else { k }
}

/// The key of every NaN (that of the canonical quiet NaN `0x7fc0_0000`).
const NAN_KEY: u32 = 0xffc0_0000;

/// Geometry of one level's class tensor, to map a position in it to the flat effdet index.
#[derive(Clone, Copy)]
struct LevelGeom {
    anchor_offset: usize,
    hw: usize,
    num_anchors: usize,
    num_classes: usize,
}

impl LevelGeom {
    /// Flat effdet index `anchor * K + class` of element `p` of the NCHW `[A*K, H, W]` tensor.
    #[inline]
    fn flat_index(&self, p: usize) -> usize {
        let channel = p / self.hw;
        let spatial = p % self.hw;
        let a = channel / self.num_classes;
        let c = channel % self.num_classes;
        (self.anchor_offset + spatial * self.num_anchors + a) * self.num_classes + c
    }
}

/// Selects the `k` largest class logits over all levels (fewer if there are fewer logits;
/// effdet's `torch.topk` would raise instead), sorted by logit descending, ties by flat index
/// `anchor * num_classes + class` ascending.
///
/// `levels` must match `anchors` (one entry per level, same feature sizes) and each
/// `levels[l].class` must hold `anchors_per_location * num_classes * height * width` values
/// (NCHW, channel = `anchor * num_classes + class`); only the class slices are read.
pub fn top_k_logits(
    levels: &[LevelOutput],
    anchors: &Anchors,
    num_classes: usize,
    k: usize,
) -> Result<Vec<Candidate>> {
    check_levels(levels, anchors, Some(num_classes), false)?;
    let num_anchors = anchors.anchors_per_location();
    let geoms: Vec<LevelGeom> = levels
        .iter()
        .enumerate()
        .map(|(l, level)| LevelGeom {
            anchor_offset: anchors.level_offset(l).unwrap_or(0),
            hw: (level.height * level.width).max(1),
            num_anchors,
            num_classes,
        })
        .collect();
    let total: usize = levels.iter().map(|l| l.class.len()).sum();
    let k = k.min(total);
    if k == 0 {
        return Ok(Vec::new());
    }

    // A threshold key at or below the k-th largest: first guessed from a strided sample, then, if
    // the guess was too high (rare, or adversarial data), found exactly by a radix histogram.
    let mut picked = gather(levels, &geoms, sample_threshold(levels, k, total));
    if picked.len() < k {
        picked = gather(levels, &geoms, histogram_threshold(levels, k));
    }

    // Larger key first; equal keys: lower flat index first.
    let cmp = |a: &(u32, usize), b: &(u32, usize)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
    if picked.len() > k {
        picked.select_nth_unstable_by(k - 1, cmp);
        picked.truncate(k);
    }
    picked.sort_unstable_by(cmp);
    Ok(picked
        .into_iter()
        .map(|(key, flat)| Candidate {
            anchor: flat / num_classes,
            class: flat % num_classes,
            logit: key_to_f32(key),
        })
        .collect())
}

/// Sample size aimed at by [`sample_threshold`].
const SAMPLE_TARGET: usize = 1 << 16;

/// Guesses a key such that probably at least `k` (and not many more) of the `total` logits are
/// at or above it, from every `stride`-th logit; 0 (everything) for small inputs.
fn sample_threshold(levels: &[LevelOutput], k: usize, total: usize) -> u32 {
    let stride = total / SAMPLE_TARGET;
    if stride < 4 {
        // Small inputs: gather everything.
        return 0;
    }
    let mut sample: Vec<u32> = levels
        .iter()
        .flat_map(|l| l.class.iter().step_by(stride).map(|&x| order_key(x)))
        .collect();
    // Expected sample elements above the k-th largest logit, plus a safety margin.
    let expected = (k as f64 * sample.len() as f64 / total as f64).ceil();
    let rank = (expected * 1.25 + 4.0 * expected.sqrt() + 16.0) as usize;
    if rank >= sample.len() {
        return 0;
    }
    let (_, nth, _) = sample.select_nth_unstable_by(rank, |a, b| b.cmp(a));
    *nth
}

/// Exact threshold: the lower bound of the highest histogram bucket (top `HIST_BITS` bits of
/// the key) such that it and the buckets above it hold at least `k` logits.
fn histogram_threshold(levels: &[LevelOutput], k: usize) -> u32 {
    let hist = levels
        .par_iter()
        .flat_map(|level| level.class.par_chunks(CHUNK))
        .fold(
            || vec![0u32; 1 << HIST_BITS],
            |mut h, chunk| {
                for &x in chunk {
                    h[(order_key(x) >> (32 - HIST_BITS)) as usize] += 1;
                }
                h
            },
        )
        .reduce(
            || vec![0u32; 1 << HIST_BITS],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += y;
                }
                a
            },
        );
    let mut above = 0usize;
    for b in (0..hist.len()).rev() {
        above += hist[b] as usize;
        if above >= k {
            return (b as u32) << (32 - HIST_BITS);
        }
    }
    0
}

/// Every logit whose key is `>= min_key`, as (key, flat effdet index), in parallel.
fn gather(levels: &[LevelOutput], geoms: &[LevelGeom], min_key: u32) -> Vec<(u32, usize)> {
    levels
        .par_iter()
        .zip(geoms.par_iter())
        .flat_map(|(level, geom)| {
            level
                .class
                .par_chunks(CHUNK)
                .enumerate()
                .map(move |(ci, chunk)| (ci * CHUNK, chunk, *geom))
        })
        .map(|(base, chunk, geom)| {
            let mut out = Vec::new();
            for (i, &x) in chunk.iter().enumerate() {
                let key = order_key(x);
                if key >= min_key {
                    out.push((key, geom.flat_index(base + i)));
                }
            }
            out
        })
        .flatten()
        .collect()
}

/// Inverse of [`order_key`] (NaN and `-0.0` come back canonicalised).
#[inline]
fn key_to_f32(key: u32) -> f32 {
    let bits = if key & 0x8000_0000 != 0 {
        key & 0x7fff_ffff
    } else {
        !key
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_orders_floats() {
        let xs = [
            f32::NEG_INFINITY,
            -f32::MAX,
            -3.5,
            -1e-30,
            0.0,
            1e-30,
            2.0,
            f32::MAX,
            f32::INFINITY,
            f32::NAN,
        ];
        for w in xs.windows(2) {
            assert!(order_key(w[0]) < order_key(w[1]), "{w:?}");
        }
        assert_eq!(order_key(-0.0), order_key(0.0));
        for x in [
            -3.5f32,
            0.0,
            2.0,
            1e-30,
            -1e-30,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ] {
            assert_eq!(key_to_f32(order_key(x)), x);
        }
        // Every NaN (any sign or payload) gets the same key.
        for bits in [
            0x7fc0_0000u32,
            0xffc0_0000,
            0x7f80_0001,
            0xff80_0001,
            0xffff_ffff,
        ] {
            assert_eq!(order_key(f32::from_bits(bits)), NAN_KEY);
        }
    }

    /// Reference: sort everything by (key desc, flat index asc).
    fn naive(levels: &[LevelOutput], geoms: &[LevelGeom], k: usize) -> Vec<(u32, usize)> {
        let mut all: Vec<(u32, usize)> = levels
            .iter()
            .zip(geoms)
            .flat_map(|(l, g)| {
                l.class
                    .iter()
                    .enumerate()
                    .map(|(p, &x)| (order_key(x), g.flat_index(p)))
            })
            .collect();
        all.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        all.truncate(k);
        all
    }

    #[test]
    fn unrepresentative_sample_falls_back_to_histogram() {
        // One level, 9 anchors x 90 classes x 40 x 40 = 1,296,000 logits: sampling stride 19.
        // Sampled positions hold the largest values, so the sampled threshold admits only about
        // `rank` logits (< k) and the exact histogram pass must take over.
        let (h, w, a, kc) = (40, 40, 9, 90);
        let total = a * kc * h * w;
        let stride = total / SAMPLE_TARGET;
        assert!(stride >= 4);
        let class: Vec<f32> = (0..total)
            .map(|p| {
                if p % stride == 0 {
                    100.0 + (p % 977) as f32 * 0.01
                } else {
                    ((p * 7919) % 10007) as f32 * 0.001
                }
            })
            .collect();
        let boxes = vec![0.0; a * 4 * h * w];
        let levels = [LevelOutput {
            class: &class,
            boxes: &boxes,
            height: h,
            width: w,
        }];
        let geoms = [LevelGeom {
            anchor_offset: 0,
            hw: h * w,
            num_anchors: a,
            num_classes: kc,
        }];
        let k = 5000;
        let guess = sample_threshold(&levels, k, total);
        assert!(
            gather(&levels, &geoms, guess).len() < k,
            "fallback not exercised"
        );
        // Level 0 only: a 40x40 "image" is its own 40x40 feature map.
        let anchors = Anchors::new(&crate::postprocess::AnchorConfig {
            min_level: 0,
            max_level: 0,
            ..crate::postprocess::AnchorConfig::d0().with_image_size(h, w)
        })
        .unwrap();
        let got = top_k_logits(&levels, &anchors, kc, k).unwrap();
        let want = naive(&levels, &geoms, k);
        assert_eq!(got.len(), k);
        for (g, (key, flat)) in got.iter().zip(want) {
            assert_eq!((g.anchor * kc + g.class, g.logit), (flat, key_to_f32(key)));
        }
    }
}
