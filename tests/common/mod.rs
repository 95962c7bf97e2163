//! Running the `altc` binary as a user does, for the command-line suites.
#![allow(dead_code)] // each suite uses its own part of these helpers

#[path = "../../runtime/tests/common/minilm.rs"]
mod minilm;
#[allow(unused_imports)] // only the text-encoder suites look for MiniLM
pub use minilm::{minilm, Golden};

/// The MiniLM golden set (`runtime/tests/golden`).
pub fn golden() -> Golden {
    minilm::golden_in(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("runtime/tests/golden"),
    )
}

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn altc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_altc"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("altc runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("altc-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

pub fn assert_clean_failure(o: &Output) -> String {
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

/// `altc` run in `dir` instead of the project root.
pub fn altc_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_altc"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("altc runs")
}

/// A usage error from clap: exit code 2, the message, no panic.
pub fn assert_usage_error(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(2), "stderr: {}", stderr(o));
    let all = stderr(o);
    assert!(!all.contains("panicked"), "{all}");
    all
}

/// Compiles the tiny model into the artifact `path`.
pub fn compile_tiny(path: &Path) {
    let o = altc(&[
        "compile",
        "models/alt_moe_tiny.ron",
        "-o",
        path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Writes `pairs` planted pairs for the model `spec`, drawn from `seed`.
pub fn synth(spec: &str, path: &Path, pairs: usize, seed: u64) {
    let (pairs, seed) = (pairs.to_string(), seed.to_string());
    let path = path.to_str().unwrap();
    let o = altc(&[
        "data", "synth", spec, "-o", path, "--pairs", &pairs, "--seed", &seed,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Writes a planted dataset for the tiny model.
pub fn synth_tiny(path: &Path, pairs: usize) {
    synth("models/alt_moe_tiny.ron", path, pairs, 1);
}

/// The arguments of `altc run` of `spec` on the reference interpreter, into `run_dir`.
pub fn run_args(spec: &str, data: &Path, run_dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        spec,
        "--data",
        data.to_str().unwrap(),
        "--device",
        "reference",
        "--out",
        run_dir.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// `altc run` of `spec` on the reference interpreter, into `run_dir`.
pub fn run_model(spec: &str, data: &Path, run_dir: &Path, extra: &[&str]) -> Output {
    let args = run_args(spec, data, run_dir, extra);
    altc(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Batch 16 and 32 pairs held out: what the tiny model's run tests train with.
pub const TINY_BATCH: [&str; 4] = ["--batch-size", "16", "--held-out", "32"];

/// `altc run` of the tiny model on the reference interpreter, batch 16, 32 held out.
pub fn train_tiny(data: &Path, run_dir: &Path, extra: &[&str]) -> Output {
    let args = [&TINY_BATCH[..], extra].concat();
    run_model("models/alt_moe_tiny.ron", data, run_dir, &args)
}

/// Every f32 tensor of a safetensors file, by name, with the file's metadata.
pub type F32Tensors = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;

pub fn read_f32(path: &Path) -> (F32Tensors, std::collections::HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect();
    (tensors, meta.metadata().clone().unwrap_or_default())
}

pub fn write_f32(
    path: &Path,
    tensors: &F32Tensors,
    metadata: std::collections::HashMap<String, String>,
) {
    let bytes: Vec<Vec<u8>> = tensors
        .values()
        .map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, (shape, _)), b)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                    .unwrap();
            (name.clone(), view)
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, Some(metadata)).unwrap()).unwrap();
}
