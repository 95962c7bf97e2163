//! Bad input as a demanding user gives it, one class at a time: each gets one clear
//! error naming the file, tensor, node or flag (never a panic, a hang or a
//! plausible-looking result), and nothing already written is lost or mixed.

mod common;

use common::{
    altc, altc_in, assert_clean_failure, assert_usage_error, compile_tiny, read_f32, run_model,
    scratch, stderr, stdout, synth, synth_tiny, train_tiny, write_f32,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TINY: &str = "models/alt_moe_tiny.ron";

/// A scratch folder of its own for one test.
fn folder(name: &str) -> PathBuf {
    let dir = scratch(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tiny spec with `from` replaced by `to`, written into `dir`.
fn edited_tiny(dir: &Path, name: &str, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(TINY).unwrap();
    assert!(text.contains(from), "`{from}` is not in the tiny spec");
    let path = dir.join(name);
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    path
}

/// A planted dataset and a two-step run of the tiny model in `dir`.
fn trained(dir: &Path) -> (PathBuf, PathBuf) {
    let data = dir.join("pairs.safetensors");
    synth_tiny(&data, 256);
    let run = dir.join("run");
    let o = train_tiny(&data, &run, &["--steps", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    (data, run)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// Class 1: input that used to panic or abort.

#[test]
fn an_artifact_with_edited_graphs_or_spec_text_is_refused_by_name() {
    let dir = folder("edited-artifact");
    let artifact = dir.join("tiny.altc");
    compile_tiny(&artifact);
    let text = std::fs::read_to_string(&artifact).unwrap();
    let cases = [
        // A loss graph renamed: the schedule's graphs no longer exist.
        (
            "name: \"image_to_text.loss\"",
            "name: \"image_to_text.renamed\"",
            "does not describe its graphs",
        ),
        // The embedded spec edited: --no-opt would lower a different model.
        ("top_k: 2", "top_k: 3", "does not describe its graphs"),
        // The embedded spec broken: the error names the artifact, not the file on disk.
        ("top_k: 2", "top_k: 9", "alt_moe_tiny.ron (embedded in"),
    ];
    for (i, (from, to, expected)) in cases.into_iter().enumerate() {
        assert!(text.contains(from), "`{from}` is not in the artifact");
        let edited = dir.join(format!("edited-{i}.altc"));
        std::fs::write(&edited, text.replacen(from, to, 1)).unwrap();
        for args in [
            vec!["inspect", s(&edited)],
            vec![
                "run",
                s(&edited),
                "--data",
                "absent.safetensors",
                "--device",
                "reference",
                "--no-opt",
            ],
        ] {
            let error = assert_clean_failure(&altc(&args));
            assert!(error.contains(expected), "{from} -> {to}: {error}");
            assert!(error.contains(&format!("edited-{i}.altc")), "{error}");
        }
    }
}

#[test]
fn retrieve_refuses_a_store_of_another_width_or_of_nothing() {
    let dir = folder("bad-store");
    let (data, run) = trained(&dir);
    let metadata = HashMap::from([
        ("altc.store".to_string(), "1".to_string()),
        ("model".to_string(), "alt_moe_tiny".to_string()),
        ("direction".to_string(), "image_to_text".to_string()),
        ("side".to_string(), "key".to_string()),
    ]);
    for (width, expected) in [
        (3, "the store's vectors have width 3, but `image_to_text.query` embeds queries at width 16"),
        (0, "a store holds at least one F32 vector of width 1 or more"),
    ] {
        let store = dir.join(format!("store-{width}.safetensors"));
        let tensors = [(
            "embeddings".to_string(),
            (vec![256, width], vec![0.5; 256 * width]),
        )]
        .into_iter()
        .collect();
        write_f32(&store, &tensors, metadata.clone());
        let error = assert_clean_failure(&altc(&[
            "retrieve",
            s(&run),
            "--store",
            s(&store),
            "--data",
            s(&data),
            "--device",
            "reference",
        ]));
        assert!(error.contains(expected), "{error}");
    }
}

#[test]
fn numbers_out_of_range_are_refused_before_any_work() {
    for (args, expected) in [
        (
            vec!["run", TINY, "--data", "x", "--batch-size", "0"],
            "--batch-size <BATCH_SIZE>",
        ),
        (
            vec!["run", TINY, "--data", "x", "--held-out", "0"],
            "--held-out <HELD_OUT>",
        ),
        (
            vec![
                "retrieve",
                "runs/x",
                "--store",
                "s",
                "--data",
                "d",
                "--queries",
                "0",
            ],
            "--queries <QUERIES>",
        ),
        (
            vec!["data", "synth", TINY, "-o", "x", "--noise", "nan"],
            "NaN is not a finite number, 0 or more",
        ),
        (
            vec!["data", "synth", TINY, "-o", "x", "--pairs", "0"],
            "--pairs <PAIRS>",
        ),
    ] {
        let all = assert_usage_error(&altc(&args));
        assert!(all.contains(expected), "{args:?}: {all}");
    }
}

#[test]
fn absurd_spec_sizes_get_a_located_bound_never_an_abort_or_a_hang() {
    let dir = folder("absurd-sizes");
    for (from, to, expected) in [
        (
            "hidden: 16, activation: Gelu, dropout",
            "hidden: 1000000000000, activation: Gelu, dropout",
            "connector.experts.hidden: the expert hidden width is 1000000000000 (a whole number from 1 to 65,536)",
        ),
        // Listing the valid head counts once enumerated every number up to the width.
        (
            "Linear(width: 16),\n                    SelfAttention(heads: 2)",
            "Linear(width: 65536),\n                    SelfAttention(heads: 7)",
            "7 heads do not divide the width 65536 (a divisor of 65536: 1, 2, 4, 8, 16,",
        ),
        (
            "tokens: Fixed(5)",
            "tokens: Fixed(18446744073709551615)",
            "modalities[1].tokens: the token count is 18446744073709551615",
        ),
    ] {
        let spec = edited_tiny(&dir, "absurd.ron", from, to);
        let error = assert_clean_failure(&altc(&["check", s(&spec)]));
        assert!(error.contains(expected), "{error}");
        assert!(error.contains("absurd.ron:"), "located: {error}");
    }
    // Within every bound but past any machine: the count is right, and a run stops
    // before allocating it.
    let spec = edited_tiny(
        &dir,
        "huge.ron",
        "experts: (count: 4, hidden: 16,",
        "experts: (count: 1024, hidden: 65536,",
    );
    let text =
        std::fs::read_to_string(&spec)
            .unwrap()
            .replacen("hidden: 16,\n", "hidden: 4096,\n", 1);
    std::fs::write(&spec, text).unwrap();
    let o = altc(&["check", s(&spec)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("w1 [1024, 4096, 65536]"),
        "{}",
        stdout(&o)
    );
    let data = dir.join("pairs.safetensors");
    synth_tiny(&data, 64);
    let error = assert_clean_failure(&run_model(
        s(&spec),
        &data,
        &dir.join("run"),
        &["--held-out", "8", "--steps", "1"],
    ));
    assert!(
        error.contains("the parameters and AdamW state of `alt_moe_tiny` take"),
        "{error}"
    );
    assert!(error.contains("GiB of memory"), "{error}");
    // The paper model's modalities at the most pairs synth writes: far past memory.
    let error = assert_clean_failure(&altc(&[
        "data",
        "synth",
        "models/alt_moe.ron",
        "-o",
        s(&dir.join("paper.safetensors")),
        "--pairs",
        "16777216",
    ]));
    assert!(
        error.contains("16777216 pairs of `alt_moe` take") && error.contains("write fewer pairs"),
        "{error}"
    );
}

// Class 3: input that used to give a plausible-looking wrong result.

#[test]
fn datasets_with_non_finite_values_or_bad_masks_are_refused_by_tensor_and_pair() {
    let dir = folder("bad-data");
    let good = dir.join("good.safetensors");
    synth_tiny(&good, 64);
    let (tensors, metadata) = read_f32(&good);
    type Damage = fn(&mut Vec<f32>);
    let cases: [(&str, Damage, &str); 4] = [
        (
            "image.tokens",
            |v| v[3 * 5 * 12 + 7] = f32::NAN,
            "tensor `image.tokens` holds NaN at pair 3, position 7",
        ),
        (
            "text.tokens",
            |v| v[10 * 6 * 24] = f32::INFINITY,
            "tensor `text.tokens` holds inf at pair 10, position 0",
        ),
        (
            "text.mask",
            |v| v[5 * 6..6 * 6].fill(0.0),
            "mask `text.mask` marks no token of pair 5 as real",
        ),
        (
            "text.mask",
            |v| v[2 * 6 + 1] = 0.5,
            "mask `text.mask` holds 0.5 at pair 2, token 1",
        ),
    ];
    for (i, (tensor, damage, expected)) in cases.into_iter().enumerate() {
        let mut damaged = tensors.clone();
        damage(&mut damaged.get_mut(tensor).unwrap().1);
        let path = dir.join(format!("damaged-{i}.safetensors"));
        write_f32(&path, &damaged, metadata.clone());
        let error = assert_clean_failure(&train_tiny(&path, &dir.join("run"), &["--steps", "1"]));
        assert!(error.contains(expected), "{error}");
        assert!(
            error.contains(&format!("damaged-{i}.safetensors")),
            "{error}"
        );
    }
}

#[test]
fn token_stores_and_fixed_splits_that_do_not_fit_are_refused_by_name() {
    let dir = folder("bad-token-stores");
    let good = dir.join("good.safetensors");
    synth_tiny(&good, 64);
    let (tensors, _) = read_f32(&good);
    type Shaped = (Vec<usize>, Vec<f32>);
    let store = |name: &str, parts: &[(&str, Shaped)]| {
        let path = dir.join(name);
        let map = parts
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        write_f32(&path, &map, HashMap::new());
        path
    };
    let image = store(
        "image.safetensors",
        &[("tokens", tensors["image.tokens"].clone())],
    );
    let mut half_mask = tensors["text.mask"].clone();
    half_mask.1[4 * 6 + 2] = 0.5;
    let cases = [
        (
            store(
                "mask-value.safetensors",
                &[
                    ("tokens", tensors["text.tokens"].clone()),
                    ("mask", half_mask),
                ],
            ),
            "`mask` holds 0.5 at item 4, token 2",
        ),
        (
            store(
                "mask-shape.safetensors",
                &[
                    ("tokens", tensors["text.tokens"].clone()),
                    ("mask", (vec![64, 5], vec![1.0; 64 * 5])),
                ],
            ),
            "`mask` is [64, 5], but `tokens` needs [64, 6]",
        ),
        (
            store(
                "flat.safetensors",
                &[(
                    "tokens",
                    (vec![64, 6 * 24], tensors["text.tokens"].1.clone()),
                )],
            ),
            "`tokens` is [64, 144], not [items, tokens, width]",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let out = dir.join(format!("pairs-{i}.safetensors"));
        let err = assert_clean_failure(&altc(&[
            "data",
            "text",
            "--modality",
            &format!("text={}", s(text)),
            "--modality",
            &format!("image={}", s(&image)),
            "-o",
            s(&out),
        ]));
        assert!(err.contains(expected) && err.contains(s(text)), "{err}");
        assert!(!out.exists());
    }

    // A dataset whose split metadata is not a count is named before training.
    let (tensors, mut metadata) = read_f32(&good);
    metadata.insert("altc.held_out".into(), "last 20".into());
    let odd = dir.join("odd-split.safetensors");
    write_f32(&odd, &tensors, metadata);
    let err = assert_clean_failure(&train_tiny(&odd, &dir.join("run"), &["--steps", "1"]));
    assert!(
        err.contains("metadata `altc.held_out` is `last 20`, not a count of pairs from 1 to half the dataset's 64"),
        "{err}"
    );
}

#[test]
fn eval_refuses_a_checkpoint_holding_nan() {
    let dir = folder("nan-checkpoint");
    let (_, run) = trained(&dir);
    let checkpoint = run.join("checkpoint.safetensors");
    let (mut tensors, metadata) = read_f32(&checkpoint);
    let (name, (_, values)) = tensors.iter_mut().next().unwrap();
    let name = name.clone();
    values[0] = f32::NAN;
    write_f32(&checkpoint, &tensors, metadata);
    let error = assert_clean_failure(&altc(&["eval", s(&run), "--device", "reference"]));
    assert!(
        error.contains(&format!("tensor `{name}` holds NaN at index 0")),
        "{error}"
    );
}

#[test]
fn settings_that_would_train_nothing_sensible_are_refused() {
    let dir = folder("degenerate");
    let data = dir.join("pairs.safetensors");
    synth_tiny(&data, 256);
    let run = dir.join("run");
    for (extra, expected) in [
        (
            ["--batch-size", "1", "--held-out", "32"],
            "a batch of 1 pairs; this model needs 2 to 65536 (its contrastive loss",
        ),
        (
            ["--batch-size", "16", "--held-out", "200"],
            "200 held-out pairs out of 256; hold out 1 to 128",
        ),
    ] {
        let error = assert_clean_failure(&run_model(TINY, &data, &run, &extra));
        assert!(error.contains(expected), "{error}");
    }
    for (from, to, expected) in [
        (
            "warmup: Fraction(0.1)",
            "warmup: Steps(1000)",
            "warms up over 1000 steps, but training lasts 300",
        ),
        (
            "duration: Steps(300)",
            "duration: Epochs(4294967296)",
            "runs take 1 to 4294967296 steps",
        ),
    ] {
        let spec = edited_tiny(&dir, "edited.ron", from, to);
        let error = assert_clean_failure(&run_model(s(&spec), &data, &run, &["--held-out", "32"]));
        assert!(error.contains(expected), "{error}");
    }
    let weightless = dir.join("weightless.ron");
    let text = std::fs::read_to_string(TINY)
        .unwrap()
        .replace("weight: 0.5", "weight: 0.0");
    std::fs::write(&weightless, text).unwrap();
    let error = assert_clean_failure(&altc(&["check", s(&weightless)]));
    assert!(
        error.contains("losses: every loss has weight 0, so no step would train anything"),
        "{error}"
    );
    assert!(!run.exists(), "no refused run leaves a directory behind");
}

// Class 4: data mixed or lost.

#[test]
fn outputs_never_replace_inputs() {
    let dir = folder("overwrite");
    let (data, run) = trained(&dir);
    let before = std::fs::read(&data).unwrap();
    let error = assert_clean_failure(&altc(&[
        "embed",
        s(&run),
        "--data",
        s(&data),
        "--direction",
        "image_to_text",
        "-o",
        s(&data),
        "--device",
        "reference",
    ]));
    assert!(
        error.contains("this output is also the command's --data"),
        "{error}"
    );
    assert_eq!(
        std::fs::read(&data).unwrap(),
        before,
        "the dataset is intact"
    );

    let spec = dir.join("tiny.ron");
    std::fs::copy(TINY, &spec).unwrap();
    let error = assert_clean_failure(&altc(&["compile", s(&spec), "-o", s(&spec)]));
    assert!(error.contains("also the command's spec"), "{error}");
    let error = assert_clean_failure(&altc(&["data", "synth", s(&spec), "-o", s(&spec)]));
    assert!(error.contains("also the command's model"), "{error}");
    assert_eq!(
        std::fs::read_to_string(&spec).unwrap(),
        std::fs::read_to_string(TINY).unwrap()
    );
}

#[test]
fn a_spec_named_to_escape_stays_under_runs() {
    let dir = folder("escape");
    let work = dir.join("a/b");
    std::fs::create_dir_all(&work).unwrap();
    let spec = edited_tiny(
        &dir,
        "escape.ron",
        "name: \"alt_moe_tiny\"",
        "name: \"../../x\"",
    );
    let data = dir.join("pairs.safetensors");
    synth_tiny(&data, 64);
    let o = altc_in(
        &work,
        &[
            "run",
            s(&spec),
            "--data",
            s(&data),
            "--device",
            "reference",
            "--steps",
            "1",
            "--held-out",
            "8",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(work.join("runs/_.._x/checkpoint.safetensors").exists());
    assert!(!dir.join("x").exists(), "nothing was written outside runs/");
}

#[test]
fn a_run_directory_holds_one_run() {
    let dir = folder("one-run");
    let (data, run) = trained(&dir);
    let error = assert_clean_failure(&train_tiny(&data, &run, &["--steps", "2"]));
    assert!(
        error.contains(
            "already holds a run (run.ron, model.altc, checkpoint.safetensors, metrics.jsonl)"
        ),
        "{error}"
    );

    let other = dir.join("other.safetensors");
    synth(TINY, &other, 256, 2);
    let error = assert_clean_failure(&train_tiny(&other, &run, &["--resume"]));
    assert!(
        error.contains("is not the dataset the run trained on"),
        "{error}"
    );
    let error = assert_clean_failure(&train_tiny(
        &data,
        &run,
        &["--resume", "--seed", "5", "--steps", "4"],
    ));
    assert!(error.contains("--seed 5, but the run used 0"), "{error}");
    let error = assert_clean_failure(&altc(&[
        "run",
        TINY,
        "--out",
        s(&run),
        "--resume",
        "--batch-size",
        "8",
        "--device",
        "reference",
    ]));
    assert!(
        error.contains("--batch-size 8, but the run used 16"),
        "{error}"
    );

    // Resuming needs nothing the run directory does not already say.
    let o = altc(&[
        "run",
        TINY,
        "--out",
        s(&run),
        "--resume",
        "--steps",
        "3",
        "--device",
        "reference",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("final step 2:"), "{}", stdout(&o));

    let o = train_tiny(&other, &run, &["--steps", "2", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let record = std::fs::read_to_string(run.join("run.ron")).unwrap();
    assert!(record.contains("other.safetensors"), "{record}");
}

// Class 5: litter from killed writes.

/// A process id that no running process has.
fn dead_pid() -> u32 {
    (100_000..4_000_000)
        .rev()
        .find(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        .unwrap()
}

#[test]
fn leftovers_of_killed_writes_go_and_a_run_killed_before_its_first_checkpoint_restarts() {
    let dir = folder("litter");
    let (data, run) = trained(&dir);
    let straight = stdout(&train_tiny(&data, &dir.join("straight"), &["--steps", "2"]));

    let leftovers = [
        run.join(format!(".checkpoint.safetensors.tmp-{}", dead_pid())),
        run.join(format!(".run.ron.tmp-{}", dead_pid())),
    ];
    for file in &leftovers {
        std::fs::write(file, b"half a write").unwrap();
    }
    // As if killed before the first checkpoint: the record and model, no checkpoint.
    std::fs::remove_file(run.join("checkpoint.safetensors")).unwrap();
    let o = train_tiny(&data, &run, &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("has no checkpoint yet (the run stopped before its first): starting it again from step 0"),
        "{}",
        stderr(&o)
    );
    for file in &leftovers {
        assert!(!file.exists(), "{} is still there", file.display());
    }
    // Started again from step 0, it reaches exactly the straight run's result.
    assert_eq!(
        stdout(&o).replace(s(&run), ""),
        straight.replace(s(&dir.join("straight")), "")
    );
}

#[test]
fn a_model_past_the_devices_largest_buffer_is_one_error_before_any_work() {
    // lavapipe holds at most 128 MiB in one buffer; the paper model's expert weights
    // are 192 MiB each. Elsewhere (a GPU's larger buffers) there is nothing to show.
    let doctor = stdout(&altc(&["doctor"]));
    if !doctor.contains("128.0 MiB per buffer") {
        eprintln!("skipped: no Vulkan device with lavapipe's 128 MiB buffers");
        return;
    }
    let dir = folder("too-big-for-the-device");
    let data = dir.join("paper.safetensors");
    synth("models/alt_moe.ron", &data, 8, 0);
    let run = dir.join("run");
    let args = [
        "run",
        "models/alt_moe.ron",
        "--data",
        s(&data),
        "--device",
        "wgpu",
        "--batch-size",
        "2",
        "--held-out",
        "2",
        "--steps",
        "1",
        "--out",
        s(&run),
    ];
    let error = assert_clean_failure(&altc(&args));
    assert!(
        error.contains("state tensor `experts.w1` is a [12, 2048, 2048] tensor of 192.0 MiB, larger than the 128.0 MiB one buffer may hold"),
        "{error}"
    );
    assert!(error.contains("another device"), "{error}");
    assert!(!run.exists(), "a refused run leaves no run directory");
}
