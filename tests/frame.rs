//! Frame validation (the first line of defence for buffers from GStreamer or applications) and
//! the Detector's handling of every pixel layout and of user label files.

use std::path::Path;
use std::sync::OnceLock;

use effdet::image_io::load_image;
use effdet::{Detector, DetectorOptions, Error, Frame, PixelFormat, YuvMatrix, YuvRange};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/golden");

fn invalid(r: effdet::Result<Frame<'_>>, needle: &str) {
    match r {
        Err(Error::InvalidFrame(msg)) => assert!(msg.contains(needle), "{needle:?} not in {msg:?}"),
        Err(e) => panic!("expected InvalidFrame, got {e}"),
        Ok(_) => panic!("expected InvalidFrame containing {needle:?}, got a frame"),
    }
}

#[test]
fn buffers_shorter_than_declared_are_rejected_for_every_format() {
    let (w, h) = (33usize, 17usize);
    for format in PixelFormat::ALL {
        let strides = format.packed_strides(w);
        let mut offsets = vec![0usize];
        let mut total = 0usize;
        for (p, s) in strides.iter().enumerate() {
            if p > 0 {
                offsets.push(total);
            }
            total += s * format.plane_extent(p, w, h).1;
        }
        let data = vec![0u8; total];
        assert!(
            Frame::new(format, w, h, &data, &strides, &offsets).is_ok(),
            "{format}: exact size"
        );
        invalid(
            Frame::new(format, w, h, &data[..total - 1], &strides, &offsets),
            "needs more than",
        );
        // Padded strides make the same data too short.
        let padded: Vec<usize> = strides.iter().map(|s| s + 64).collect();
        invalid(
            Frame::new(format, w, h, &data, &padded, &offsets),
            "needs more than",
        );
        invalid(
            Frame::packed(format, w, h, &data[..total / 2]),
            "needs more than",
        );
    }
}

#[test]
fn inconsistent_descriptions_are_rejected() {
    let data = vec![0u8; 4096];
    invalid(
        Frame::new(PixelFormat::Rgb, 0, 10, &data, &[0], &[0]),
        "zero size",
    );
    invalid(
        Frame::new(PixelFormat::Rgb, 10, 0, &data, &[30], &[0]),
        "zero size",
    );
    invalid(
        Frame::new(PixelFormat::Rgb, 10, 10, &data, &[29], &[0]),
        "smaller than its row",
    );
    invalid(
        Frame::new(PixelFormat::Nv12, 10, 10, &data, &[10], &[0]),
        "2 plane(s)",
    );
    invalid(
        Frame::new(PixelFormat::I420, 10, 10, &data, &[10, 5, 5], &[0, 100]),
        "3 plane(s)",
    );
    // Offsets or strides so large their arithmetic would overflow are errors, not panics.
    invalid(
        Frame::new(PixelFormat::Rgb, 10, 10, &data, &[usize::MAX], &[0]),
        "needs more than",
    );
    invalid(
        Frame::new(PixelFormat::Rgb, 10, 10, &data, &[30], &[usize::MAX]),
        "needs more than",
    );
}

fn detector_with(labels: Option<&Path>) -> Detector {
    let opts = DetectorOptions {
        labels: labels.map(Path::to_path_buf),
        ..DetectorOptions::default()
    };
    Detector::new(Path::new(DIR).join("weights_f16.safetensors"), opts)
        .expect("fixture weights load")
}

fn shared_detector() -> &'static Detector {
    static D: OnceLock<Detector> = OnceLock::new();
    D.get_or_init(|| detector_with(None))
}

/// RGB -> limited-range BT.601 YUV 4:2:0 planes (Y full size; U, V averaged over 2x2 blocks).
fn to_yuv420(rgb: &[u8], w: usize, h: usize) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let px = |x: usize, y: usize| {
        let i = (y.min(h - 1) * w + x.min(w - 1)) * 3;
        (rgb[i] as f64, rgb[i + 1] as f64, rgb[i + 2] as f64)
    };
    let mut yp = vec![0u8; w * h];
    for y in 0..h {
        for x in 0..w {
            let (r, g, b) = px(x, y);
            yp[y * w + x] = (16.0 + 0.2568 * r + 0.5041 * g + 0.0979 * b).round() as u8;
        }
    }
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    let (mut u, mut v) = (vec![0u8; cw * ch], vec![0u8; cw * ch]);
    for y in 0..ch {
        for x in 0..cw {
            let (mut r, mut g, mut b) = (0.0, 0.0, 0.0);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let p = px(2 * x + dx, 2 * y + dy);
                r += p.0 / 4.0;
                g += p.1 / 4.0;
                b += p.2 / 4.0;
            }
            u[y * cw + x] = (128.0 - 0.1482 * r - 0.2910 * g + 0.4392 * b).round() as u8;
            v[y * cw + x] = (128.0 + 0.4392 * r - 0.3678 * g - 0.0714 * b).round() as u8;
        }
    }
    (yp, u, v)
}

#[test]
fn yuv_frames_with_strides_detect_like_the_rgb_image() {
    let d = shared_detector();
    let img = load_image(Path::new(DIR).join("img1.png")).unwrap(); // 333x500, odd width
    let rgb_dets = d.detect(&img.frame().unwrap()).unwrap();
    let (w, h) = (img.width, img.height);
    let (yp, u, v) = to_yuv420(&img.rgb, w, h);
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));

    // NV12 with padded strides and an offset between planes.
    let ys = w + 3;
    let uvs = 2 * cw + 5;
    let uv_off = ys * h + 11;
    let mut nv12 = vec![0x55u8; uv_off + uvs * ch];
    for y in 0..h {
        nv12[y * ys..y * ys + w].copy_from_slice(&yp[y * w..(y + 1) * w]);
    }
    for y in 0..ch {
        for x in 0..cw {
            nv12[uv_off + y * uvs + 2 * x] = u[y * cw + x];
            nv12[uv_off + y * uvs + 2 * x + 1] = v[y * cw + x];
        }
    }
    let f_nv12 = Frame::new(PixelFormat::Nv12, w, h, &nv12, &[ys, uvs], &[0, uv_off])
        .unwrap()
        .with_colorimetry(YuvMatrix::Bt601, YuvRange::Limited);
    let nv12_dets = d.detect(&f_nv12).unwrap();

    // I420 of the same planes, packed.
    let mut i420 = yp.clone();
    i420.extend_from_slice(&u);
    i420.extend_from_slice(&v);
    let f_i420 = Frame::packed(PixelFormat::I420, w, h, &i420).unwrap();
    assert_eq!(
        d.detect(&f_i420).unwrap(),
        nv12_dets,
        "NV12 and I420 of the same planes"
    );

    // The detector on a YUV frame is the detector on that frame's RGB conversion, exactly.
    let conv = effdet::preprocess::frame_to_rgb(&f_nv12);
    let conv_frame = Frame::packed(PixelFormat::Rgb, w, h, &conv.data).unwrap();
    assert_eq!(d.detect(&conv_frame).unwrap(), nv12_dets);

    // And the conversion reproduces the picture: chroma subsampling and rounding move most values
    // by a few levels (only sharp colour edges move more). A swapped chroma plane, wrong matrix or
    // wrong range moves most pixels by tens of levels. (The random golden network amplifies such
    // small input changes too much for its detection lists to be compared directly.)
    let close = conv
        .data
        .iter()
        .zip(&img.rgb)
        .filter(|(a, b)| (**a as i32 - **b as i32).abs() <= 8)
        .count();
    assert!(
        close * 100 >= img.rgb.len() * 95,
        "only {close} of {} channel values within 8 levels of the original",
        img.rgb.len()
    );
    assert!(!rgb_dets.is_empty());
}

#[test]
fn user_label_files_name_the_classes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("labels.txt");
    let names: String = (1..=90).map(|i| format!("thing-{i}\n")).collect();
    std::fs::write(&path, names).unwrap();
    let d = detector_with(Some(&path));
    let img = load_image(Path::new(DIR).join("img0.png")).unwrap();
    let dets = d.detect(&img.frame().unwrap()).unwrap();
    assert!(!dets.is_empty());
    for x in dets {
        assert_eq!(x.label, format!("thing-{}", x.class_id));
    }
    // A malformed or unreadable file is a clear error.
    std::fs::write(&path, "1 a\n1 b\n").unwrap();
    let opts = DetectorOptions {
        labels: Some(path.clone()),
        ..DetectorOptions::default()
    };
    let err = Detector::new(Path::new(DIR).join("weights_f16.safetensors"), opts).unwrap_err();
    assert!(matches!(err, Error::Labels { .. }), "{err}");
    assert!(err.to_string().contains("appears twice"), "{err}");
}

#[test]
fn empty_batches_and_thread_counts() {
    let d = shared_detector();
    assert!(d.detect_batch(&[]).unwrap().is_empty());
    let img = load_image(Path::new(DIR).join("img2.png")).unwrap();
    let one = Detector::new(
        Path::new(DIR).join("weights_f16.safetensors"),
        DetectorOptions {
            threads: 1,
            ..DetectorOptions::default()
        },
    )
    .unwrap();
    // Results do not depend on the number of threads.
    assert_eq!(
        one.detect(&img.frame().unwrap()).unwrap(),
        d.detect(&img.frame().unwrap()).unwrap()
    );
}
