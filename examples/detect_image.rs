//! Detect objects in an image with the library API.
//!
//! ```sh
//! cargo run --release --example detect_image -- WEIGHTS.safetensors IMAGE.png
//! ```

use effdet::image_io::load_image;
use effdet::postprocess::PostprocessConfig;
use effdet::{Detector, DetectorOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(weights), Some(image)) = (args.next(), args.next()) else {
        eprintln!("usage: detect_image WEIGHTS.safetensors IMAGE");
        std::process::exit(2);
    };
    let options = DetectorOptions {
        postprocess: PostprocessConfig {
            score_threshold: 0.3,
            ..PostprocessConfig::default()
        },
        ..DetectorOptions::default()
    };
    let detector = Detector::new(&weights, options)?;
    let img = load_image(&image)?;
    // Any supported layout works the same way, e.g. Frame::new(PixelFormat::Nv12, w, h, bytes,
    // &[y_stride, uv_stride], &[0, uv_offset]) for a decoder's output.
    let detections = detector.detect(&img.frame()?)?;
    println!(
        "{} detections ({} engine)",
        detections.len(),
        detector.backend_name()
    );
    for d in detections {
        println!(
            "{:>14} {:.3} [{:.1}, {:.1}, {:.1}, {:.1}]",
            d.label, d.score, d.x1, d.y1, d.x2, d.y2
        );
    }
    Ok(())
}
