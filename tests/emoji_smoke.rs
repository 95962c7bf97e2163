//! The emoji example (examples/emoji/README.md) end to end at smoke scale, as a user
//! runs it: the dataset builder renders 100 OpenMoji pairs and runs DINOv2 over them,
//! `altc data text` embeds their names with MiniLM into tokens with masks and fixes
//! the held-out split, `altc run` trains Alt-MoE a few steps recording metrics,
//! `altc plot` draws them, and the least-squares floor reads the same split.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;

const PAIRS: usize = 100;
const HELD_OUT: usize = 25;

/// The builder's virtual environment (`scripts/emoji/setup.sh`, which
/// `scripts/setup.sh` runs), or `None` (and a note) where it is missing; CI
/// requires it.
fn emoji_python() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
    let python = cache.join("altc/emoji-venv/bin/python");
    if python.exists() {
        return Some(python);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing: run scripts/setup.sh",
        python.display()
    );
    eprintln!(
        "skipped: no {} (scripts/setup.sh makes it)",
        python.display()
    );
    None
}

fn python(python: &PathBuf, args: &[&str]) -> std::process::Output {
    Command::new(python)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("python runs")
}

#[test]
fn emoji_pairs_train_alt_moe_end_to_end() {
    let (Some(py), Some(minilm)) = (emoji_python(), minilm()) else {
        return;
    };
    let dir = scratch("emoji");
    let o = python(
        &py,
        &[
            "scripts/emoji/build_dataset.py",
            "--out",
            dir.to_str().unwrap(),
            "--pairs",
            &PAIRS.to_string(),
            "--held-out",
            &HELD_OUT.to_string(),
            "--force",
        ],
    );
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let names = std::fs::read_to_string(dir.join("names.txt")).unwrap();
    assert_eq!(names.lines().count(), PAIRS);
    let (images, _) = read_f32(&dir.join("images.safetensors"));
    assert_eq!(
        images["tokens"].0,
        [PAIRS, 17, 384],
        "CLS and a 4x4 patch grid"
    );

    let encoder = dir.join("minilm.ron");
    let o = altc(&[
        "import",
        minilm.to_str().unwrap(),
        "-o",
        encoder.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let data = dir.join("pairs.safetensors");
    let text_side = format!("text={}", dir.join("names.txt").display());
    let image_side = format!("image={}", dir.join("images.safetensors").display());
    let o = altc(&[
        "data",
        "text",
        "--modality",
        &text_side,
        "--modality",
        &image_side,
        "--encoder",
        encoder.to_str().unwrap(),
        "--tokens",
        "--pad-to",
        "10",
        "--device",
        "reference",
        "-o",
        data.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The builder's split, passed on from its store.
    let (pairs, meta) = read_f32(&data);
    assert_eq!(meta["altc.held_out"], HELD_OUT.to_string());
    // Padded to the model's 10 tokens, the longest emoji name's.
    assert_eq!(pairs["text.tokens"].0, [PAIRS, 10, 384]);
    assert_eq!(pairs["text.mask"].0, [PAIRS, 10]);
    // Every name is [CLS] words [SEP]: at least three real tokens, then padding.
    for (i, mask) in pairs["text.mask"].1.chunks(10).enumerate() {
        let real = mask.iter().filter(|&&m| m == 1.0).count();
        assert!(real >= 3, "pair {i}: {real} real tokens");
        assert!(
            mask[..real].iter().all(|&m| m == 1.0),
            "pair {i}: padding last"
        );
    }

    let run_dir = dir.join("run");
    let o = run_model(
        "examples/emoji/alt_moe.ron",
        &data,
        &run_dir,
        &[
            "--steps",
            "4",
            "--batch-size",
            "16",
            "--eval-every",
            "2",
            "--force",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("{HELD_OUT} queries")),
        "{}",
        stdout(&o)
    );
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.iter().filter(|l| l["kind"] == "step").count(), 4);
    assert_eq!(lines.iter().filter(|l| l["kind"] == "recall").count(), 2);
    let o = altc(&["plot", run_dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(run_dir.join("loss.png").exists() && run_dir.join("recall.png").exists());

    let o = python(
        &py,
        &["scripts/emoji/floor.py", data.to_str().unwrap(), "--json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let floor: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(floor["held_out"], HELD_OUT);
    for direction in ["image_to_text", "text_to_image"] {
        let r: Vec<f64> = floor[direction]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!(
            r.windows(2).all(|w| w[0] <= w[1]) && r[2] <= 1.0,
            "{direction}: {r:?}"
        );
    }
}
