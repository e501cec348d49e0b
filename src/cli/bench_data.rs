//! `effdet bench-data`: the training input pipeline alone.

use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchDataArgs {
    /// Training annotations (COCO JSON).
    #[arg(long, value_name = "FILE")]
    pub annotations: PathBuf,
    /// Folder of the training images.
    #[arg(long, value_name = "DIR")]
    pub images: PathBuf,
    /// Square network input size the images are letterboxed to.
    #[arg(long, default_value_t = 512, value_name = "S")]
    pub size: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 8, value_name = "B")]
    pub batch: usize,
    /// Loader worker threads.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub workers: usize,
    /// Batches to time.
    #[arg(long, default_value_t = 50, value_name = "K")]
    pub batches: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn bench_data(a: BenchDataArgs) -> anyhow::Result<()> {
    use effdet::train::dataset::{Dataset, DatasetOptions};
    use effdet::train::loader::{Augment, Loader, LoaderConfig};
    use effdet::train::model::TrainNet;
    use std::sync::Arc;

    let ds = Arc::new(Dataset::open(
        &a.annotations,
        &a.images,
        DatasetOptions::default(),
    )?);
    let mut cfg = effdet::model::EfficientDetConfig::d0();
    cfg.num_classes = ds.num_classes();
    cfg.image_size = (a.size, a.size);
    let labeler = Arc::new(TrainNet::init(cfg, 0)?.labeler()?);
    let lc = LoaderConfig {
        input_size: a.size,
        batch_size: a.batch,
        augment: Augment::effdet(),
        workers: a.workers,
        prefetch: 4,
        seed: 0,
        shuffle: true,
        drop_last: true,
        rank: 0,
        world: 1,
    };
    let mut epoch = 0;
    let mut done = 0usize;
    // The first batch includes thread start-up; time the rest.
    let mut start: Option<Instant> = None;
    while done < a.batches + 1 {
        for b in Loader::new(Arc::clone(&ds), Arc::clone(&labeler), &lc, epoch)? {
            std::hint::black_box(b?);
            done += 1;
            if done == 1 {
                start = Some(Instant::now());
            }
            if done == a.batches + 1 {
                break;
            }
        }
        epoch += 1;
    }
    let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    let ips = (a.batches * a.batch) as f64 / secs.max(1e-9);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"size": a.size, "batch": a.batch, "workers": a.workers,
                "batches": a.batches, "images_per_s": ips})
        );
    } else {
        println!(
            "input pipeline: {ips:.1} images/s ({} workers, {}x{}, batch {}, {} batches)",
            a.workers, a.size, a.size, a.batch, a.batches
        );
    }
    Ok(())
}
