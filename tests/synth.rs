//! The synthetic dataset generator (`effdet::synth`, `effdet synth`): determinism, exact and
//! tight ground truth, the COCO / label / Y4M outputs, and the command line.

use std::path::Path;
use std::process::{Command, Output};

use effdet::Error;
use effdet::eval::{CocoDetection, Detections, evaluate};
use effdet::labels::Labels;
use effdet::rng::Rng;
use effdet::synth::{
    Background, DatasetOptions, Effects, MIN_VISIBLE_FRACTION, NUM_CLASSES, ShapeKind, ShapeSpec,
    Split, SynthImage, dataset_video, i420_frame_len, render_dataset_image, render_scene,
    rgb_to_i420, write_dataset, y4m_header,
};
use effdet::train::coco::CocoAnnotations;

/// Small images keep the suite fast.
const SIZE: usize = 192;

fn small_options() -> DatasetOptions {
    DatasetOptions {
        train: 5,
        val: 3,
        seed: 7,
        val_seed: 7,
        size: 128,
        video_frames: 4,
        video_size: (96, 64),
        force: false,
        command: None,
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

#[test]
fn same_seed_same_image_and_boxes_other_seed_or_split_differs() {
    let a = render_dataset_image(3, Split::Train, 5, SIZE);
    let b = render_dataset_image(3, Split::Train, 5, SIZE);
    assert_eq!(a, b);
    assert_eq!(a.rgb.len(), SIZE * SIZE * 3);
    assert_ne!(a.rgb, render_dataset_image(4, Split::Train, 5, SIZE).rgb);
    assert_ne!(a.rgb, render_dataset_image(3, Split::Train, 6, SIZE).rgb);
    assert_ne!(a.rgb, render_dataset_image(3, Split::Val, 5, SIZE).rgb);
}

#[test]
fn written_dataset_is_byte_identical_for_the_same_seed() {
    let (d1, d2, d3) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let opts = small_options();
    write_dataset(d1.path(), &opts).unwrap();
    write_dataset(d2.path(), &opts).unwrap();
    for f in [
        "train/annotations.json",
        "val/annotations.json",
        "video/annotations.json",
        "video/test.y4m",
        "labels.txt",
        "dataset.json",
        "train/images/000000.png",
        "train/images/000004.png",
        "val/images/000002.png",
    ] {
        assert_eq!(read(&d1.path().join(f)), read(&d2.path().join(f)), "{f}");
    }
    // The files hold exactly what the library renders for each index (rendering in parallel
    // changes nothing).
    for i in 0..opts.train {
        let img = effdet::image_io::load_image(d1.path().join(format!("train/images/{i:06}.png")))
            .unwrap();
        assert_eq!(
            img.rgb,
            render_dataset_image(opts.seed, Split::Train, i as u64, opts.size).rgb
        );
    }
    // Another validation seed changes the validation split and the video, not the training one.
    let other = DatasetOptions {
        val_seed: 8,
        ..small_options()
    };
    write_dataset(d3.path(), &other).unwrap();
    let same = |f: &str| read(&d1.path().join(f)) == read(&d3.path().join(f));
    assert!(same("train/annotations.json") && same("train/images/000003.png"));
    assert!(!same("val/annotations.json") && !same("val/images/000000.png"));
    assert!(!same("video/test.y4m"));
}

/// Renders `n` training images.
fn sample(n: u64) -> Vec<SynthImage> {
    (0..n)
        .map(|i| render_dataset_image(1, Split::Train, i, SIZE))
        .collect()
}

#[test]
fn boxes_are_inside_and_every_class_tiny_objects_and_occlusion_occur() {
    let images = sample(60);
    let mut per_class = [0usize; NUM_CLASSES];
    let (mut tiny, mut occluded, mut objects) = (0, 0, 0);
    for img in &images {
        assert_eq!(
            img.dropped, 0,
            "composition keeps every drawn object annotated"
        );
        for o in &img.objects {
            let [x, y, w, h] = o.bbox;
            assert!(w >= 4 && h >= 4, "{o:?}");
            assert!(
                (x + w) as usize <= SIZE && (y + h) as usize <= SIZE,
                "{o:?}"
            );
            let [fx, fy, fw, fh] = o.full_bbox;
            // The visible box lies inside the unoccluded one.
            assert!(
                x >= fx && y >= fy && x + w <= fx + fw && y + h <= fy + fh,
                "{o:?}"
            );
            assert!(
                (MIN_VISIBLE_FRACTION..=1.0).contains(&o.visible_fraction),
                "{o:?}"
            );
            assert!(o.visible_area > 0.0 && o.visible_area <= (w * h) as f64 + 1e-6);
            per_class[o.class_id() as usize - 1] += 1;
            tiny += o.is_tiny() as usize;
            if o.is_occluded() {
                occluded += 1;
                assert!(w * h < fw * fh, "occluded box shrank: {o:?}");
            }
            objects += 1;
        }
    }
    assert!(per_class.iter().all(|&c| c >= 20), "{per_class:?}");
    assert!(objects > 200, "{objects} objects in 60 images");
    assert!(tiny * 25 > objects, "{tiny} tiny of {objects}");
    assert!(occluded * 50 > objects, "{occluded} occluded of {objects}");
}

/// Fraction of the way from `bg` to `fg` a pixel's colour is (its apparent coverage).
fn apparent_coverage(px: &[u8], bg: [f32; 3], fg: [f32; 3]) -> f32 {
    let d: Vec<f32> = (0..3).map(|k| fg[k] - bg[k]).collect();
    let norm: f32 = d.iter().map(|v| v * v).sum();
    (0..3).map(|k| (px[k] as f32 - bg[k]) * d[k]).sum::<f32>() / norm
}

#[test]
fn box_of_an_isolated_object_is_tight() {
    let (bg, fg) = ([40.0, 60.0, 200.0], [250.0, 220.0, 10.0]);
    let background = Background::flat(bg);
    let mut rng = Rng::new(5);
    // Quantisation to u8 moves apparent coverage by at most 0.5 / |fg - bg|.
    let tol = 0.01;
    for kind in ShapeKind::ALL {
        for _ in 0..5 {
            // At most 43 px from the centre: always entirely inside the 128 x 128 image.
            let w = rng.range_f64(30.0, 50.0);
            let stretch = rng.range_f64(0.7, 1.4);
            let shape = ShapeSpec {
                kind,
                center: [rng.range_f64(54.0, 74.0), rng.range_f64(54.0, 74.0)],
                half_size: [w / 2.0 * stretch, w / 2.0 / stretch],
                angle: rng.range_f64(0.0, 6.3),
                colour: fg,
                shading: 0.0,
            };
            let img = render_scene(
                128,
                128,
                &background,
                std::slice::from_ref(&shape),
                Effects::default(),
                &mut rng,
            );
            assert_eq!(img.objects.len(), 1, "{shape:?}");
            let o = &img.objects[0];
            assert_eq!(o.bbox, o.full_bbox);
            assert!(o.visible_fraction > 0.97, "{o:?}");
            let [x0, y0, w, h] = o.bbox.map(|v| v as usize);
            let cov =
                |x: usize, y: usize| apparent_coverage(&img.rgb[(y * 128 + x) * 3..][..3], bg, fg);
            for y in 0..128 {
                for x in 0..128 {
                    let inside = (x0..x0 + w).contains(&x) && (y0..y0 + h).contains(&y);
                    if !inside {
                        assert!(
                            cov(x, y) <= 0.5 + tol,
                            "{shape:?}: ({x}, {y}) outside {o:?}"
                        );
                    }
                }
            }
            // Each side of the box touches a pixel the object covers by more than half.
            let max_on = |pts: &mut dyn Iterator<Item = (usize, usize)>| {
                pts.map(|(x, y)| cov(x, y)).fold(f32::MIN, f32::max)
            };
            let left = max_on(&mut (y0..y0 + h).map(|y| (x0, y)));
            let right = max_on(&mut (y0..y0 + h).map(|y| (x0 + w - 1, y)));
            let top = max_on(&mut (x0..x0 + w).map(|x| (x, y0)));
            let bottom = max_on(&mut (x0..x0 + w).map(|x| (x, y0 + h - 1)));
            for (side, v) in [
                ("left", left),
                ("right", right),
                ("top", top),
                ("bottom", bottom),
            ] {
                assert!(
                    v > 0.5 - tol,
                    "{shape:?}: {side} side of {o:?} peaks at {v}"
                );
            }
        }
    }
}

/// An axis-aligned square with corners on whole pixels, so its coverage is exactly 0 or 1.
fn square(x0: f64, y0: f64, x1: f64, y1: f64, colour: [f32; 3]) -> ShapeSpec {
    ShapeSpec {
        kind: ShapeKind::Square,
        center: [(x0 + x1) / 2.0, (y0 + y1) / 2.0],
        half_size: [(x1 - x0) / 2.0, (y1 - y0) / 2.0],
        angle: 0.0,
        colour,
        shading: 0.0,
    }
}

#[test]
fn occlusion_shrinks_boxes_exactly_and_drops_hidden_or_small_objects() {
    let bg = Background::flat([0.0; 3]);
    let mut rng = Rng::new(0);
    // B covers the right half of A.
    let a = square(20.0, 20.0, 60.0, 60.0, [255.0, 0.0, 0.0]);
    let b = square(40.0, 10.0, 80.0, 70.0, [0.0, 255.0, 0.0]);
    let img = render_scene(100, 100, &bg, &[a.clone(), b], Effects::default(), &mut rng);
    assert_eq!(img.objects.len(), 2);
    let (oa, ob) = (&img.objects[0], &img.objects[1]);
    assert_eq!(oa.full_bbox, [20, 20, 40, 40]);
    assert_eq!(oa.bbox, [20, 20, 20, 40]);
    assert!(oa.is_occluded() && !ob.is_occluded());
    assert!((oa.visible_fraction - 0.5).abs() < 1e-4 && (oa.visible_area - 800.0).abs() < 1e-2);
    assert_eq!(ob.bbox, [40, 10, 40, 60]);
    // C hides 80% of A: A is no longer annotated. D is 3 pixels high: never annotated.
    let c = square(28.0, 0.0, 100.0, 100.0, [0.0, 0.0, 255.0]);
    let d = square(5.0, 80.0, 15.0, 83.0, [255.0; 3]);
    let img = render_scene(100, 100, &bg, &[a, c, d], Effects::default(), &mut rng);
    assert_eq!(img.objects.len(), 1);
    assert_eq!(img.objects[0].bbox, [28, 0, 72, 100]);
    assert_eq!(img.dropped, 2);
}

#[test]
fn coco_and_label_files_parse() {
    let dir = tempfile::tempdir().unwrap();
    let opts = small_options();
    let report = write_dataset(dir.path(), &opts).unwrap();
    for (split, n, stats) in [
        ("train", opts.train, &report.train),
        ("val", opts.val, &report.val),
    ] {
        let anns = CocoAnnotations::open(dir.path().join(split).join("annotations.json")).unwrap();
        let f = anns.file();
        assert_eq!(f.images.len(), n);
        assert_eq!(f.annotations.len(), stats.objects);
        let names: Vec<_> = f
            .categories
            .iter()
            .map(|c| (c.id, c.name.as_str()))
            .collect();
        assert_eq!(
            names,
            ShapeKind::ALL
                .map(|k| (k.class_id() as u64, k.name()))
                .to_vec()
        );
        let mut ids: Vec<u64> = f.annotations.iter().filter_map(|a| a.id).collect();
        ids.dedup();
        assert_eq!(ids, (1..=stats.objects as u64).collect::<Vec<_>>());
        let seed = if split == "train" {
            opts.seed
        } else {
            opts.val_seed
        };
        let which = if split == "train" {
            Split::Train
        } else {
            Split::Val
        };
        for i in 0..n {
            let im = anns.image_by_file_name(&format!("{i:06}.png")).unwrap();
            assert_eq!(
                (im.id, im.width, im.height),
                (i as u64, Some(128), Some(128))
            );
            assert!(
                dir.path()
                    .join(split)
                    .join("images")
                    .join(&im.file_name)
                    .is_file()
            );
            let expected = render_dataset_image(seed, which, i as u64, opts.size);
            let got: Vec<_> = anns.annotations_of(im.id).collect();
            assert_eq!(got.len(), expected.objects.len());
            for (a, o) in got.iter().zip(&expected.objects) {
                assert_eq!(a.category_id, o.class_id() as u64);
                assert_eq!(a.bbox, o.bbox.map(f64::from));
                assert_eq!(a.iscrowd, 0);
            }
        }
    }
    // The training reader accepts both splits without skipping or changing anything.
    for split in ["train", "val"] {
        let ds = effdet::train::dataset::Dataset::open(
            dir.path().join(split).join("annotations.json"),
            dir.path().join(split).join("images"),
            effdet::train::dataset::DatasetOptions { strict: true },
        )
        .unwrap();
        assert!(ds.report.is_clean(), "{split}: {}", ds.report);
        assert_eq!(ds.num_classes(), NUM_CLASSES);
    }
    let video = CocoAnnotations::open(dir.path().join("video/annotations.json")).unwrap();
    assert_eq!(video.file().images.len(), opts.video_frames);
    assert_eq!(video.image_by_file_name("frame_000003").unwrap().id, 3);
    // The ground truth scored as detections is perfect for the project's COCO evaluator.
    for split in ["train", "video"] {
        let gt = CocoAnnotations::open(dir.path().join(split).join("annotations.json")).unwrap();
        let perfect = gt
            .file()
            .annotations
            .iter()
            .map(|a| CocoDetection {
                image_id: a.image_id,
                category_id: a.category_id,
                bbox: a.bbox,
                score: 1.0,
            })
            .collect();
        let stats = evaluate(&gt, &Detections::new(split, perfect).unwrap()).unwrap();
        assert_eq!((stats.ap, stats.ap50), (1.0, 1.0), "{split}: {stats}");
    }

    let labels = Labels::from_file(dir.path().join("labels.txt")).unwrap();
    assert_eq!(labels.len(), NUM_CLASSES);
    for k in ShapeKind::ALL {
        assert_eq!(labels.name(k.class_id()), k.name());
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&read(&dir.path().join("dataset.json"))).unwrap();
    assert_eq!(meta["generator_version"], effdet::synth::GENERATOR_VERSION);
    assert_eq!(meta["seed"], 7);
    assert_eq!(meta["train"]["images"], 5);
}

#[test]
fn y4m_header_and_frames_have_the_right_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let opts = DatasetOptions {
        train: 0,
        val: 0,
        video_frames: 3,
        video_size: (98, 66),
        ..small_options()
    };
    write_dataset(dir.path(), &opts).unwrap();
    let bytes = read(&dir.path().join("video/test.y4m"));
    let header = y4m_header(98, 66, 30);
    assert!(header.starts_with("YUV4MPEG2 W98 H66 F30:1 ") && header.contains(" C420jpeg"));
    assert!(bytes.starts_with(header.as_bytes()));
    let frame = i420_frame_len(98, 66);
    assert_eq!(frame, 98 * 66 + 2 * 49 * 33);
    assert_eq!(bytes.len(), header.len() + 3 * (6 + frame));
    let scene = dataset_video(opts.val_seed, 98, 66, 3);
    for t in 0..3 {
        let at = header.len() + t * (6 + frame);
        assert_eq!(&bytes[at..at + 6], b"FRAME\n");
        let img = scene.render_frame(t);
        assert_eq!(
            &bytes[at + 6..at + 6 + frame],
            &rgb_to_i420(&img.rgb, 98, 66)[..]
        );
    }
    // Limited range: luma within 16..=235.
    let y0 = &bytes[header.len() + 6..header.len() + 6 + 98 * 66];
    assert!(y0.iter().all(|v| (16..=235).contains(v)));
}

fn effdet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_effdet"))
        .args(args)
        .output()
        .expect("the effdet binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_fails(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "expected {needle:?} in stderr: {err}");
    assert!(!err.contains("panicked"), "panic in stderr: {err}");
}

#[test]
fn cli_writes_the_layout_and_refuses_a_non_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let out_s = out.to_str().unwrap();
    let args = |train: &str, extra: &[&str]| -> Vec<String> {
        [
            "synth",
            "--out",
            out_s,
            "--train",
            train,
            "--val",
            "2",
            "--size",
            "96",
            "--video-frames",
            "2",
            "--video-size",
            "80x64",
            "--seed",
            "9",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    let run = |a: Vec<String>| effdet(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let o = run(args("3", &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    for word in ["train", "val", "circle", "tiny", "video"] {
        assert!(text.contains(word), "summary lacks {word}: {text}");
    }
    for f in [
        "labels.txt",
        "dataset.json",
        "train/annotations.json",
        "train/images/000000.png",
        "train/images/000002.png",
        "val/annotations.json",
        "val/images/000001.png",
        "video/test.y4m",
        "video/annotations.json",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    assert!(!out.join("train/images/000003.png").exists());
    let meta: serde_json::Value = serde_json::from_slice(&read(&out.join("dataset.json"))).unwrap();
    assert!(meta["command"].as_str().unwrap().contains("--train 3"));
    assert_eq!(meta["val_seed"], 9);

    // Not again without --force.
    let o = run(args("3", &[]));
    assert_fails(&o, 2, "not empty");
    assert!(out.join("train/images/000002.png").is_file());

    // --force replaces the dataset (and leaves other files alone); --json prints one object.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let o = run(args("1", &["--force", "--json"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["train"]["images"], 1);
    assert!(v["seconds"].as_f64().is_some());
    assert!(!out.join("train/images/000001.png").exists());
    assert!(out.join("notes.txt").is_file());
}

#[test]
fn cli_rejects_bad_arguments_and_unwritable_output_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let out_s = out.to_str().unwrap();
    let o = effdet(&["synth", "--out", out_s, "--video-size", "640by360"]);
    assert_fails(&o, 2, "--video-size");
    let o = effdet(&["synth", "--out", out_s, "--video-size", "8x8"]);
    assert_fails(&o, 2, "video size");
    let o = effdet(&["synth", "--out", out_s, "--size", "10"]);
    assert_fails(&o, 2, "image size");
    assert!(!out.exists(), "nothing is written for bad arguments");

    // An existing file as the output directory.
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let o = effdet(&["synth", "--out", file.to_str().unwrap(), "--train", "1"]);
    assert_fails(&o, 2, "not a directory");
    // A directory that cannot be created (its parent is a file): an I/O error naming it.
    let below = file.join("sub");
    let o = effdet(&["synth", "--out", below.to_str().unwrap(), "--train", "1"]);
    assert_fails(&o, 1, &format!("cannot write {}", below.display()));
    // The library's errors: I/O for the output, invalid argument for a non-empty directory.
    assert!(matches!(
        write_dataset(&below, &small_options()),
        Err(Error::Io { .. })
    ));
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("a"), "x").unwrap();
    assert!(matches!(
        write_dataset(&out, &small_options()),
        Err(Error::InvalidArgument(_))
    ));
}
