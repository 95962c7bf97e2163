//! The `altc` command line as a user runs it: check, compile, inspect, and one clear
//! error (never a panic) for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn altc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_altc"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("altc runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("altc-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn assert_clean_failure(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(1),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
    let all = stderr(o);
    assert!(!all.contains("panicked"), "{all}");
    // Progress and device lines may precede it; the error is the last thing said.
    let at = all
        .find("error: ")
        .unwrap_or_else(|| panic!("no error line in: {all}"));
    all[at..].to_string()
}

#[test]
fn check_prints_the_paper_scale_summary() {
    let o = altc(&["check", "models/alt_moe.ron"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("trainable parameters: 140,617,740"), "{out}");
    for module in [
        "experts",
        "router.gate",
        "target_projections.text",
        "directions.image_to_text.input_projection",
    ] {
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(module)),
            "module {module} missing:\n{out}"
        );
    }
    assert!(out.contains("w1 [12, 2048, 2048]"), "{out}");
    assert!(out.contains("image_to_text    image -> text"), "{out}");
}

#[test]
fn compile_then_inspect_the_tiny_model() {
    let artifact = scratch("tiny.altc");
    let a = artifact.to_str().unwrap();
    let o = altc(&["compile", "models/alt_moe_tiny.ron", "-o", a]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("7,380 trainable parameters"),
        "{}",
        stdout(&o)
    );

    let o = altc(&["inspect", a]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("altc-artifact v2"), "{out}");
    assert!(out.contains("image_to_text.loss ("), "{out}");
    assert!(
        out.contains("outputs: loss.regression f32[], loss.contrastive f32[], loss f32[]"),
        "{out}"
    );

    // Sparse dispatch is the compiled form of the MoE.
    assert!(out.contains("grouped expert matmul"), "{out}");

    let o = altc(&["compile", "models/alt_moe_tiny.ron", "-o", a, "--explain"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for line in [
        "kernel launches",
        "bytes moved",
        "peak intermediates",
        "--no-opt",
    ] {
        assert!(out.contains(line), "--explain lacks `{line}`:\n{out}");
    }

    let o = altc(&["inspect", a, "--dot", "--graph", "image.key"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dot = stdout(&o);
    assert!(dot.starts_with("digraph altc {"), "{dot}");
    assert!(dot.contains("label=\"image.key\""), "{dot}");
    assert!(dot.contains("g0_0 -> "), "{dot}");
    assert!(
        !dot.contains("image_to_text.loss"),
        "only the selected graph: {dot}"
    );
}

#[test]
fn inspect_names_a_missing_graph_and_lists_the_real_ones() {
    let artifact = scratch("tiny-graphs.altc");
    let a = artifact.to_str().unwrap();
    assert!(altc(&["compile", "models/alt_moe_tiny.ron", "-o", a])
        .status
        .success());
    let err = assert_clean_failure(&altc(&["inspect", a, "--graph", "nope"]));
    assert!(
        err.contains("no graph `nope`") && err.contains("image_to_text.loss"),
        "{err}"
    );
}

#[test]
fn a_bad_spec_is_one_located_error_and_leaves_the_old_artifact() {
    let artifact = scratch("kept.altc");
    let a = artifact.to_str().unwrap();
    assert!(altc(&["compile", "models/alt_moe_tiny.ron", "-o", a])
        .status
        .success());
    let before = std::fs::read(&artifact).unwrap();

    let bad = scratch("bad.ron");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/alt_moe_tiny.ron"),
    )
    .unwrap();
    std::fs::write(&bad, text.replace("top_k: 2", "top_k: 9")).unwrap();
    let err = assert_clean_failure(&altc(&["compile", bad.to_str().unwrap(), "-o", a]));
    assert!(err.contains("connector.router.top_k"), "{err}");
    assert!(err.contains(&format!("{}:34:", bad.display())), "{err}");
    assert_eq!(err.lines().count(), 1, "one error: {err}");
    assert_eq!(
        std::fs::read(&artifact).unwrap(),
        before,
        "the previous artifact was modified"
    );
}

#[test]
fn missing_files_are_named() {
    let err = assert_clean_failure(&altc(&["check", "models/absent.ron"]));
    assert!(err.contains("models/absent.ron"), "{err}");
    let err = assert_clean_failure(&altc(&["inspect", "absent.altc"]));
    assert!(err.contains("absent.altc"), "{err}");
}

#[test]
fn inspecting_a_spec_says_it_is_not_an_artifact() {
    let err = assert_clean_failure(&altc(&["inspect", "models/alt_moe_tiny.ron"]));
    assert!(err.contains("not an altc artifact"), "{err}");
}

#[test]
fn synth_run_eval_and_resume_the_tiny_model() {
    let dir = scratch("train");
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("pairs.safetensors");
    let run_dir = dir.join("run");
    let (d, r) = (data.to_str().unwrap(), run_dir.to_str().unwrap());
    let o = altc(&[
        "data",
        "synth",
        "models/alt_moe_tiny.ron",
        "-o",
        d,
        "--pairs",
        "256",
        "--seed",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("256 pairs: text [256, 6, 24], image [256, 5, 12]"),
        "{}",
        stdout(&o)
    );

    let train = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "models/alt_moe_tiny.ron",
            "--data",
            d,
            "--device",
            "reference",
            "--batch-size",
            "16",
            "--held-out",
            "32",
            "--out",
            r,
            "--checkpoint-every",
            "3",
        ];
        args.extend_from_slice(extra);
        altc(&args)
    };
    let o = train(&["--steps", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("final step 3: text_to_image | loss "), "{out}");
    assert!(out.contains("image_to_text       32 queries"), "{out}");
    for file in ["checkpoint.safetensors", "model.altc", "run.ron"] {
        assert!(
            run_dir.join(file).exists(),
            "{file} missing from the run directory"
        );
    }

    let o = altc(&["eval", r]);
    assert!(o.status.success(), "{}", stderr(&o));
    let eval = stdout(&o);
    assert!(eval.starts_with("checkpoint at step 4 of 4"), "{eval}");
    // eval recomputes exactly the recalls the run reported.
    let table = |s: &str| {
        s.lines()
            .filter(|l| l.contains("queries"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(table(&eval), table(&out));

    let o = train(&["--steps", "6", "--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("final step 5:"),
        "resumed at step 4 and ran 2 more: {}",
        stdout(&o)
    );

    let store = dir.join("keys.safetensors");
    let st = store.to_str().unwrap();
    let o = altc(&[
        "embed",
        r,
        "--data",
        d,
        "--direction",
        "image_to_text",
        "--side",
        "key",
        "-o",
        st,
        "--device",
        "reference",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("embedded 256 text items with `text.key`"),
        "{}",
        stdout(&o)
    );
    let o = altc(&[
        "retrieve",
        r,
        "--store",
        st,
        "--data",
        d,
        "--queries",
        "64",
        "--device",
        "reference",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("image_to_text: 64 queries against 256 stored items"),
        "{out}"
    );
    assert!(out.contains("queries/s"), "{out}");
}

#[test]
fn a_missing_cuda_device_is_named_before_any_work() {
    if Path::new("/proc/driver/nvidia/version").exists() {
        eprintln!("skipping: this machine has an NVIDIA driver");
        return;
    }
    let err = assert_clean_failure(&altc(&[
        "run",
        "models/alt_moe_tiny.ron",
        "--data",
        "absent.safetensors",
        "--device",
        "cuda",
    ]));
    assert!(
        err.contains("CUDA is not available (no NVIDIA driver"),
        "{err}"
    );
}

#[test]
fn a_dataset_for_another_model_is_refused_by_name() {
    let dir = scratch("mismatch");
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("paper.safetensors");
    // The paper-scale model's modalities are far wider than the tiny model's.
    let o = altc(&[
        "data",
        "synth",
        "models/alt_moe_audio.ron",
        "-o",
        data.to_str().unwrap(),
        "--pairs",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = assert_clean_failure(&altc(&[
        "run",
        "models/alt_moe_tiny.ron",
        "--data",
        data.to_str().unwrap(),
        "--device",
        "reference",
    ]));
    assert!(
        err.contains("`text.tokens` is [2, 77, 4096], but the model expects [2, 6, 24]"),
        "{err}"
    );
}

#[test]
fn doctor_reports_every_backend() {
    let o = altc(&["doctor"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("reference: available"), "{out}");
    assert!(out.contains("cuda: ") && out.contains("wgpu: "), "{out}");
}

#[test]
fn bench_json_times_every_graph_optimised_and_baseline() {
    let o = altc(&[
        "bench",
        "models/alt_moe_tiny.ron",
        "--device",
        "wgpu",
        "--batch-size",
        "4",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--json",
    ]);
    if !o.status.success() && stderr(&o).contains("not available") {
        eprintln!("skipping: {}", stderr(&o));
        return;
    }
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("valid JSON");
    assert_eq!(report["batch_size"], 4);
    assert!(report["ceilings"]["copy_gb_per_s"].as_f64().unwrap() > 0.0);
    let measurements = report["measurements"].as_array().unwrap();
    let graphs = [
        "image_to_text.train",
        "text_to_image.train",
        "image_to_text.query",
        "text_to_image.query",
        "text.key",
        "image.key",
    ];
    for graph in graphs {
        for variant in ["optimised", "no-opt"] {
            let m = measurements
                .iter()
                .find(|m| m["graph"] == graph && m["variant"] == variant)
                .unwrap_or_else(|| panic!("no {graph} {variant} in {report}"));
            let (min, median, max) = (
                m["min_ms"].as_f64().unwrap(),
                m["median_ms"].as_f64().unwrap(),
                m["max_ms"].as_f64().unwrap(),
            );
            assert!(0.0 < min && min <= median && median <= max, "{m}");
            let launches = m["kernel_launches"].as_u64().unwrap();
            assert!(launches > 0, "{m}");
            assert!(m["planned_bytes"].as_u64().unwrap() > 0, "{m}");
            // The profiled run lists every kernel the plan launched, each timed.
            let kernels = m["kernels"].as_array().unwrap();
            assert_eq!(kernels.len() as u64, launches, "{graph} {variant}");
            for k in kernels {
                assert!(k["ms"].as_f64().unwrap() > 0.0, "{k}");
                assert!(!k["family"].as_str().unwrap().is_empty(), "{k}");
            }
        }
    }
    assert_eq!(measurements.len(), 2 * graphs.len());
}
