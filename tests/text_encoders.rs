//! A pretrained text encoder as a user runs one: `altc import` of the MiniLM folder,
//! `altc check` of what it wrote, `altc embed --encoder --text` into a vector store
//! whose vectors are sentence-transformers' (`runtime/tests/golden`), and the errors
//! for what does not fit.

mod common;

use common::{altc, assert_clean_failure, golden, minilm, read_f32, scratch, stderr, stdout};
use std::path::{Path, PathBuf};
use std::process::Output;

/// MiniLM imported into a scratch folder: the spec's path.
fn import_minilm(dir: &Path, name: &str) -> PathBuf {
    let spec = scratch(name);
    let o = altc(&[
        "import",
        dir.to_str().unwrap(),
        "-o",
        spec.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("(6 blocks, width 384, 101 tensors mapped)"),
        "{}",
        stdout(&o)
    );
    spec
}

/// `altc embed --encoder SPEC --text TEXT -o OUTPUT`, then `extra`.
fn embed(spec: &Path, text: &Path, output: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "embed",
        "--encoder",
        spec.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    altc(&args)
}

#[test]
fn import_check_and_embed_reproduce_sentence_transformers() {
    let Some(dir) = minilm() else { return };
    let spec = import_minilm(&dir, "minilm.ron");
    let spec_path = spec.to_str().unwrap();

    let o = altc(&["check", spec_path]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("22,565,376 parameters (frozen)"), "{out}");
    assert!(out.contains("weights: 101 tensors"), "{out}");
    assert!(out.trim_end().ends_with(": ok"), "{out}");

    // Four one-line sentences of the golden set, embedded on the interpreter.
    let golden = golden();
    let (sentences, vectors) = (&golden.sentences, &golden.vectors);
    let picked = [1, 2, 20, 25];
    let text = scratch("sentences.txt");
    let lines: Vec<&str> = picked.iter().map(|&i| sentences[i].as_str()).collect();
    std::fs::write(&text, lines.join("\n") + "\n").unwrap();
    let store = scratch("minilm-vectors.safetensors");
    let o = embed(&spec, &text, &store, &["--device", "reference"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("embedded 4 items with minilm"),
        "{}",
        stdout(&o)
    );
    let (tensors, meta) = read_f32(&store);
    let (shape, got) = &tensors["embeddings"];
    assert_eq!(shape, &[4, 384]);
    assert_eq!(meta["ids"], r#"["1","2","3","4"]"#);
    assert_eq!(meta["truncated"], "0");
    for (row, &i) in picked.iter().enumerate() {
        let worst = got[row * 384..(row + 1) * 384]
            .iter()
            .zip(&vectors[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-5, "sentence {i}: {worst:.2e} from PyTorch");
    }

    // The same text beside the store: a paired dataset of one-token sides.
    let pairs = scratch("text-pairs.safetensors");
    let o = altc(&[
        "data",
        "text",
        "--modality",
        &format!("caption={}", text.display()),
        "--modality",
        &format!("vector={}", store.display()),
        "--encoder",
        spec_path,
        "--device",
        "reference",
        "-o",
        pairs.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (tensors, _) = read_f32(&pairs);
    assert_eq!(tensors["caption.tokens"].0, [4, 1, 384]);
    assert_eq!(tensors["vector.tokens"].0, [4, 1, 384]);
    assert_eq!(tensors["caption.tokens"].1, tensors["vector.tokens"].1);
}

#[test]
fn embed_reads_jsonl_ids_and_reports_truncation() {
    let Some(dir) = minilm() else { return };
    let spec = import_minilm(&dir, "minilm-jsonl.ron");
    let items = scratch("items.jsonl");
    let long = vec!["word"; 400].join(" ");
    std::fs::write(
        &items,
        format!("{{\"key\": \"a\", \"body\": \"short\"}}\n{{\"key\": 7, \"body\": \"{long}\"}}\n"),
    )
    .unwrap();
    let store = scratch("items.safetensors");
    let o = embed(
        &spec,
        &items,
        &store,
        &[
            "--field",
            "body",
            "--id-field",
            "key",
            "--device",
            "reference",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("1 of 2 items were longer than 256 tokens"),
        "{}",
        stderr(&o)
    );
    let (_, meta) = read_f32(&store);
    assert_eq!(meta["ids"], r#"["a","7"]"#);
    assert_eq!(meta["truncated"], "1");

    // A line without the field is named by file and line.
    std::fs::write(&items, "{\"body\": \"fine\"}\n{\"text\": \"no body\"}\n").unwrap();
    let o = embed(
        &spec,
        &items,
        &scratch("never.safetensors"),
        &["--field", "body"],
    );
    let err = assert_clean_failure(&o);
    assert!(
        err.contains("items.jsonl:2: no string field `body`"),
        "{err}"
    );
}

#[test]
fn check_names_a_missing_tensor_of_an_encoder() {
    let Some(dir) = minilm() else { return };
    let spec = import_minilm(&dir, "minilm-broken.ron");
    let text = std::fs::read_to_string(&spec).unwrap().replace(
        "\"encoder.layer.2.output.dense.weight\"",
        "\"encoder.layer.2.output.dense.kernel\"",
    );
    std::fs::write(&spec, text).unwrap();
    let err = assert_clean_failure(&altc(&["check", spec.to_str().unwrap()]));
    assert!(
        err.contains("model.safetensors: tensor `encoder.layer.2.output.dense.kernel` (for parameter `layers.6.mlp.fc2.weight`) is not in the file"),
        "{err}"
    );
}

#[test]
fn import_names_an_unsupported_architecture() {
    let dir = scratch("gpt2-folder");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}"#,
    )
    .unwrap();
    let out = scratch("gpt2.ron");
    let err = assert_clean_failure(&altc(&[
        "import",
        dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]));
    assert!(
        err.contains("architecture `GPT2LMHeadModel` is not supported"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written for a refused import");
}
