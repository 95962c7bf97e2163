//! The `altc` command line as a user runs it: check, compile, inspect, and one clear
//! error (never a panic) for bad input.

mod common;

use common::{
    altc, assert_clean_failure, compile_tiny, scratch, stderr, stdout, synth, synth_tiny,
    train_tiny,
};
use std::path::Path;
use std::process::Command;

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
    // Line breaks in labels are DOT's `\n`, never an escaped backslash.
    assert!(dot.contains(r"\n=> embedding"), "{dot}");
    assert!(
        !dot.contains(r"\\n"),
        "a literal backslash-n in a label: {dot}"
    );
    assert!(
        !dot.contains("image_to_text.loss"),
        "only the selected graph: {dot}"
    );
}

#[test]
fn inspect_names_a_missing_graph_and_lists_the_real_ones() {
    let artifact = scratch("tiny-graphs.altc");
    let a = artifact.to_str().unwrap();
    compile_tiny(&artifact);
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
    compile_tiny(&artifact);
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
        train_tiny(
            &data,
            &run_dir,
            &[&["--checkpoint-every", "3"], extra].concat(),
        )
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
    // The first thing eval says is the device it chose, and why (auto).
    let said = stderr(&o);
    assert!(
        said.starts_with("device: ") && said.contains("(auto: "),
        "{said}"
    );
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

    // Resuming past the run's length extends it; its schedules keep their span, so
    // the extra steps run at the final learning rate instead of warming up again.
    let o = train(&["--steps", "6", "--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let said = stderr(&o);
    assert!(said.contains("resuming at step 4 of 6"), "{said}");
    assert!(
        said.contains("its schedules span the first 4 steps, so steps 5 to 6 run at their final values (learning rate 5.500e-6)"),
        "{said}"
    );
    assert!(
        stdout(&o).contains("final step 5:") && stdout(&o).contains("lr 5.50e-6"),
        "resumed at step 4 and ran 2 more at the final rate: {}",
        stdout(&o)
    );
    let err = assert_clean_failure(&train(&["--steps", "5", "--resume"]));
    assert!(err.contains("the run is at step 6 already"), "{err}");
    // A run stopped before its first checkpoint starts again from step 0, and its
    // schedules span the length it is given now.
    let restarted = dir.join("restarted");
    let o = train_tiny(&data, &restarted, &["--steps", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_file(restarted.join("checkpoint.safetensors")).unwrap();
    let o = train_tiny(&data, &restarted, &["--steps", "4", "--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let said = stderr(&o);
    assert!(said.contains("starting it again from step 0"), "{said}");
    assert!(said.contains("resuming at step 0 of 4"), "{said}");
    assert!(!said.contains("its schedules span"), "{said}");

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
        "--warmup",
        "1",
        "--repeats",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("image_to_text: 64 queries against 256 stored items"),
        "{out}"
    );
    assert!(
        out.contains("queries/s")
            && out.contains("ms a query")
            && out.contains("median of 3 runs after 1 warm-up"),
        "{out}"
    );
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
    synth("models/alt_moe_audio.ron", &data, 2, 0);
    // A run directory of its own: the default, runs/alt_moe_tiny, may hold the run
    // of the README's first command.
    let err = assert_clean_failure(&altc(&[
        "run",
        "models/alt_moe_tiny.ron",
        "--data",
        data.to_str().unwrap(),
        "--device",
        "reference",
        "--out",
        dir.join("run").to_str().unwrap(),
    ]));
    assert!(
        err.contains("`text.tokens` is [2, 77, 4096], but the model expects [2, 6, 24]"),
        "{err}"
    );
}

#[test]
fn explaining_a_spec_writes_no_artifact_beside_it() {
    let dir = scratch("explain-only");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = dir.join("tiny.ron");
    std::fs::copy("models/alt_moe_tiny.ron", &spec).unwrap();
    let o = altc(&["compile", spec.to_str().unwrap(), "--explain"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("no artifact written"), "{}", stdout(&o));
    assert!(
        !dir.join("tiny.altc").exists(),
        "--explain wrote an artifact"
    );
    let o = altc(&["compile", spec.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        dir.join("tiny.altc").exists(),
        "compile writes beside the spec"
    );
}

#[test]
fn every_option_of_every_command_says_what_it_is() {
    let commands: [&[&str]; 12] = [
        &["check"],
        &["compile"],
        &["inspect"],
        &["data", "synth"],
        &["run"],
        &["eval"],
        &["embed"],
        &["retrieve"],
        &["doctor"],
        &["bench"],
        &["tune"],
        &["data"],
    ];
    for command in commands {
        let o = altc(&[command, &["-h"]].concat());
        assert!(o.status.success(), "{command:?}: {}", stderr(&o));
        // Each option's description follows it on its line (after two spaces) or,
        // where clap lays help out below the options, on the next line.
        let help = stdout(&o);
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let item = line.trim_start();
            if !item.starts_with('-') {
                continue;
            }
            // A default alone (`[default: 0]`) is no description.
            let says = |text: &str| !text.is_empty() && !text.starts_with(['-', '[']);
            let same_line = item
                .split_once("  ")
                .is_some_and(|(_, text)| says(text.trim()));
            let next_line = lines.get(i + 1).is_some_and(|next| {
                let text = next.trim_start();
                says(text) && next.len() - text.len() > 6
            });
            assert!(
                same_line || next_line,
                "`altc {}`: `{item}` has no help",
                command.join(" ")
            );
        }
    }
}

#[test]
fn no_mesa_runtime_dir_warning_without_xdg_runtime_dir() {
    let o = Command::new(env!("CARGO_BIN_EXE_altc"))
        .args(["doctor"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("altc runs");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("XDG_RUNTIME_DIR"), "{}", stderr(&o));
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
        "--tune-cache",
        scratch("empty-tune-cache").to_str().unwrap(),
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
        "retrieve",
    ];
    for graph in graphs {
        for variant in ["untuned", "no-opt"] {
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
            // The device held about what the plan says: its peak intermediates and
            // the inputs (a leak, or buffers never released, would hold far more).
            let planned = (m["planned_peak_bytes"].as_u64().unwrap()
                + m["input_bytes"].as_u64().unwrap()) as f64;
            let measured = m["measured_peak_bytes"].as_u64().unwrap() as f64;
            assert!(
                0.5 * planned <= measured && measured <= 2.0 * planned,
                "{graph} {variant}: {measured} bytes held, {planned} planned"
            );
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

/// `altc tune` records winners that a later process uses without tuning again; a
/// cache made for another device, driver or altc version is ignored with a note; and
/// `altc bench` times the tuned plan beside the untuned one.
#[test]
fn tuning_cache_survives_a_restart_and_foreign_entries_are_ignored() {
    let cache = scratch("tune-cache");
    let c = cache.to_str().unwrap();
    let tune = |extra: &[&str]| {
        let args = [
            "tune",
            "models/alt_moe_tiny.ron",
            "--device",
            "wgpu",
            "--batch-size",
            "4",
            "--tune-cache",
            c,
        ];
        altc(&[&args[..], extra].concat())
    };
    let o = tune(&["--json"]);
    if !o.status.success() && stderr(&o).contains("not available") {
        eprintln!("skipping: {}", stderr(&o));
        return;
    }
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("candidates measured, best") && stderr(&o).contains("from the cache"),
        "{}",
        stderr(&o)
    );
    let tuned: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("valid JSON");
    let kernels = tuned["kernels"].as_array().unwrap();
    assert!(!kernels.is_empty(), "{tuned}");
    for k in kernels {
        let candidates: Vec<&str> = k["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert!(candidates.contains(&k["winner"].as_str().unwrap()), "{k}");
    }
    let manifest = cache.join("altc-tuning.json");
    assert!(manifest.exists());
    // Tuning again measures nothing: every choice comes from the cache, and says so.
    let again = tune(&[]);
    assert!(again.status.success(), "{}", stderr(&again));
    let log = stderr(&again);
    assert!(
        log.contains("cached choice") && !log.contains("candidates measured"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            ": 0 measured now, {} from the cache",
            kernels.len()
        )),
        "{log}"
    );

    let data = scratch("tune-pairs.safetensors");
    synth_tiny(&data, 64);
    let train = |out: &str| {
        altc(&[
            "run",
            "models/alt_moe_tiny.ron",
            "--data",
            data.to_str().unwrap(),
            "--device",
            "wgpu",
            "--batch-size",
            "4",
            "--steps",
            "2",
            "--held-out",
            "16",
            "--out",
            scratch(out).to_str().unwrap(),
            "--tune-cache",
            c,
        ])
    };
    let o = train("tuned-run");
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    assert!(
        log.contains(&format!("using {} tuned kernels", kernels.len())),
        "{log}"
    );
    assert!(
        !log.contains("candidates measured"),
        "a cached run does not tune: {log}"
    );

    let o = altc(&[
        "bench",
        "models/alt_moe_tiny.ron",
        "--device",
        "wgpu",
        "--batch-size",
        "4",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--json",
        "--tune-cache",
        c,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("valid JSON");
    let measurements = report["measurements"].as_array().unwrap();
    for variant in ["tuned", "untuned", "no-opt"] {
        assert_eq!(
            measurements
                .iter()
                .filter(|m| m["variant"] == variant)
                .count(),
            7,
            "{variant}"
        );
    }

    // The same cache as if written by another altc version: never trusted.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let foreign = text.replace("\"altc-", "\"altc-0.0.0-elsewhere-");
    std::fs::write(&manifest, foreign).unwrap();
    let o = train("foreign-run");
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    assert!(
        log.contains("ignoring tuned kernels for other devices"),
        "{log}"
    );
    assert!(!log.contains("tuned kernels from"), "{log}");
}

#[test]
fn the_cuda_check_names_unknown_architectures_and_a_missing_nvrtc() {
    let artifact = scratch("cuda-check.altc");
    let artifact = artifact.to_str().unwrap();
    let o = altc(&[
        "compile",
        "models/alt_moe_tiny.ron",
        "-o",
        artifact,
        "--cuda-arch",
        "sm_75",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("unknown CUDA architecture `sm_75` (known: sm_80, sm_90a)"),
        "{}",
        stderr(&o)
    );
    // Without the wheels' cache, a toolkit or ALTC_NVRTC, NVRTC cannot be found.
    if std::path::Path::new("/usr/local/cuda").exists() {
        eprintln!("skipped the missing-NVRTC case: a CUDA toolkit is installed");
        return;
    }
    let empty = scratch("no-cuda-home");
    std::fs::create_dir_all(&empty).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_altc"))
        .args([
            "compile",
            "models/alt_moe_tiny.ron",
            "-o",
            artifact,
            "--cuda-arch",
            "sm_90a",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HOME", &empty)
        .env("XDG_CACHE_HOME", &empty)
        .env_remove("ALTC_NVRTC")
        .env_remove("CUDA_PATH")
        .env_remove("CUDA_HOME")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("altc runs");
    let error = assert_clean_failure(&o);
    assert!(
        error.contains("libnvrtc (NVRTC 12) was not found"),
        "{error}"
    );
    assert!(error.contains("nvidia-cuda-nvrtc-cu12"), "{error}");
}
