//! What a run leaves to look at: `metrics.jsonl` (every step, periodic recalls,
//! kept whole across a resume), `altc plot` of it, and datasets that fix their
//! held-out split (`altc data text --held-out` from token stores).

mod common;

use common::*;
use std::collections::HashMap;
use std::path::Path;

fn metric_lines(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn steps_of(lines: &[serde_json::Value], kind: &str) -> Vec<u64> {
    lines
        .iter()
        .filter(|l| l["kind"] == kind)
        .map(|l| l["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_run_records_every_step_and_periodic_recalls() {
    let data = scratch("metrics-data.safetensors");
    let run_dir = scratch("metrics-run");
    synth_tiny(&data, 256);
    let o = train_tiny(
        &data,
        &run_dir,
        &[
            "--steps",
            "12",
            "--eval-every",
            "5",
            "--checkpoint-every",
            "6",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = metric_lines(&run_dir);
    assert_eq!(steps_of(&lines, "step"), (1..=12).collect::<Vec<_>>());
    assert_eq!(steps_of(&lines, "recall"), [5, 10, 12]);
    let first = &lines[0];
    assert_eq!(first["task"], "image_to_text");
    assert_eq!(lines[1]["task"], "text_to_image", "the schedule alternates");
    for key in ["loss", "loss.regression", "loss.contrastive"] {
        assert!(first["losses"][key].as_f64().unwrap().is_finite(), "{key}");
    }
    assert!(first["lr"].as_f64().unwrap() > 0.0);
    assert!(first["grad_norm"].as_f64().unwrap() > 0.0);
    // The last recall line is the table the run printed.
    let last = lines.last().unwrap();
    assert_eq!(last["queries"], 32);
    let r1 = last["recalls"]["image_to_text"][0].as_f64().unwrap();
    assert!(
        stdout(&o).contains(&format!("{:6.1}%", 100.0 * r1)),
        "{}",
        stdout(&o)
    );

    // A run killed after its checkpoint at step 12 left lines past it, the last cut
    // short; resumed, it drops them and records each step once.
    let path = run_dir.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    let late = lines[0].to_string().replace("\"step\":1,", "\"step\":13,");
    text.push_str(&format!("{late}\n{{\"kind\":\"step\",\"st"));
    std::fs::write(&path, text).unwrap();
    let o = train_tiny(
        &data,
        &run_dir,
        &["--resume", "--steps", "16", "--eval-every", "5"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = metric_lines(&run_dir);
    assert_eq!(steps_of(&lines, "step"), (1..=16).collect::<Vec<_>>());
    assert_eq!(steps_of(&lines, "recall"), [5, 10, 12, 15, 16]);

    // A line that is not a metric anywhere but at the end is not silently dropped.
    let text = std::fs::read_to_string(&path).unwrap();
    let mut edited: Vec<&str> = text.lines().collect();
    edited.insert(2, "an edit");
    std::fs::write(&path, edited.join("\n") + "\n").unwrap();
    let err = assert_clean_failure(&train_tiny(&data, &run_dir, &["--resume", "--steps", "18"]));
    assert!(err.contains("metrics.jsonl:3: not a metric line"), "{err}");

    // --force starts the record afresh.
    let o = train_tiny(&data, &run_dir, &["--steps", "3", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(steps_of(&metric_lines(&run_dir), "step"), [1, 2, 3]);
}

/// The width and height of a PNG, from its IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is a PNG",
        path.display()
    );
    assert_eq!(&bytes[12..16], b"IHDR");
    let word = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (word(16), word(20))
}

#[test]
fn plot_draws_losses_and_recalls_of_a_run() {
    let data = scratch("plot-data.safetensors");
    let run_dir = scratch("plot-run");
    synth_tiny(&data, 256);
    let o = train_tiny(&data, &run_dir, &["--steps", "8", "--eval-every", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = scratch("plots");
    let o = altc(&[
        "plot",
        run_dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("loss.png"), "{}", stdout(&o));
    // Five panels (loss and its two terms, gradient norm, learning rate), two a
    // row; one recall panel per direction.
    assert_eq!(png_size(&out.join("loss.png")), (1120, 1140));
    assert_eq!(png_size(&out.join("recall.png")), (1120, 380));

    let empty = scratch("not-a-run");
    std::fs::create_dir_all(&empty).unwrap();
    let err = assert_clean_failure(&altc(&["plot", empty.to_str().unwrap()]));
    assert!(err.contains("metrics.jsonl"), "{err}");
}

#[test]
fn a_dataset_from_token_stores_fixes_its_held_out_split() {
    // The tiny model's two sides written as token stores, as a dataset builder does.
    let synthetic = scratch("split-synth.safetensors");
    synth_tiny(&synthetic, 128);
    let (tensors, _) = read_f32(&synthetic);
    let store_meta = HashMap::from([("altc.store".to_string(), "1".to_string())]);
    let text_store = scratch("split-text.safetensors");
    let image_store = scratch("split-image.safetensors");
    write_f32(
        &text_store,
        &[
            ("tokens".to_string(), tensors["text.tokens"].clone()),
            ("mask".to_string(), tensors["text.mask"].clone()),
        ]
        .into(),
        store_meta.clone(),
    );
    // The image store fixes its split, as the emoji builder's does.
    let mut image_meta = store_meta.clone();
    image_meta.insert("altc.held_out".to_string(), "20".to_string());
    write_f32(
        &image_store,
        &[("tokens".to_string(), tensors["image.tokens"].clone())].into(),
        image_meta,
    );
    let data = scratch("split-pairs.safetensors");
    let text_side = format!("text={}", text_store.display());
    let image_side = format!("image={}", image_store.display());
    // `altc data text` of the two stores into `out`, with `extra` flags.
    let pair_stores = |extra: &[&str], out: &Path| {
        let mut args = vec!["data", "text", "--modality", &text_side];
        args.extend(["--modality", &image_side, "-o", out.to_str().unwrap()]);
        args.extend(extra);
        altc(&args)
    };
    let o = pair_stores(&[], &data);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("the last 20 held out"),
        "{}",
        stdout(&o)
    );
    let (written, meta) = read_f32(&data);
    assert_eq!(meta["altc.held_out"], "20");
    for name in ["text.tokens", "text.mask", "image.tokens"] {
        assert_eq!(written[name], tensors[name], "{name} kept as it was");
    }

    // Every run on it holds out its last 20 pairs, whatever the seed.
    let run_dir = scratch("split-run");
    let o = run_model(
        "models/alt_moe_tiny.ron",
        &data,
        &run_dir,
        &["--steps", "2", "--batch-size", "16", "--seed", "7"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("20 queries"), "{}", stdout(&o));
    let o = altc(&["eval", run_dir.to_str().unwrap(), "--device", "reference"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("20 queries"), "{}", stdout(&o));
    // Refused before --force deletes the run already there.
    let err = assert_clean_failure(&run_model(
        "models/alt_moe_tiny.ron",
        &data,
        &run_dir,
        &[
            "--steps",
            "2",
            "--batch-size",
            "16",
            "--held-out",
            "30",
            "--force",
        ],
    ));
    assert!(
        err.contains("fixes its held-out split as its last 20 pairs"),
        "{err}"
    );
    for kept in [
        "run.ron",
        "model.altc",
        "checkpoint.safetensors",
        "metrics.jsonl",
    ] {
        assert!(run_dir.join(kept).exists(), "{kept} kept");
    }

    // More held out than half the pairs is refused before anything is written.
    let refused = scratch("split-refused.safetensors");
    let err = assert_clean_failure(&pair_stores(&["--held-out", "65"], &refused));
    assert!(err.contains("at most half of the 128 pairs"), "{err}");
    assert!(!refused.exists());
    // Nor is a count the image store's split contradicts.
    let err = assert_clean_failure(&pair_stores(&["--held-out", "30"], &refused));
    assert!(
        err.contains("fixes its last 20 items as held out, but --held-out holds out 30"),
        "{err}"
    );
    assert!(!refused.exists());
}
