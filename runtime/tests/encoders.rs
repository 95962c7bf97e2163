//! all-MiniLM-L6-v2 as altc runs it: imported from its Hugging Face folder, its
//! token ids and normalised sentence embeddings compared with what
//! sentence-transformers (PyTorch, CPU) produced for 64 sentences
//! (`scripts/golden_minilm.py` wrote `golden/minilm_golden.safetensors`), on the
//! reference interpreter and on wgpu; and the errors for weights and folders that do
//! not fit.

mod common;

use altc_compiler::ir::DType;
use altc_compiler::lower::lower_encoder;
use altc_compiler::spec::{import_hugging_face, EncoderSpec, ImportError, Layer, Weights};
use altc_runtime::backend::{Backend, ReferenceBackend};
use altc_runtime::encoding::{load_weights, EncoderOutput, TextEncoder, WeightsError};
use altc_runtime::text::TextTokenizer;
use common::{golden, minilm, open_present};
use std::path::{Path, PathBuf};

/// How far altc's normalised vectors may be from PyTorch's, per element.
const TOLERANCE: f64 = 1e-5;

/// The MiniLM folder imported as `altc import` does, its paths absolute.
fn imported(dir: &Path) -> EncoderSpec {
    import_hugging_face(dir, Path::new("/")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn token_ids_are_sentence_transformers_ids() {
    let Some(dir) = minilm() else { return };
    let golden = golden();
    let tokenizer = TextTokenizer::load(&dir.join("tokenizer.json"), 256).unwrap();
    let items: Vec<&str> = golden.sentences.iter().map(String::as_str).collect();
    let tokenized = tokenizer.encode(&items).unwrap();
    for (i, want) in golden.ids.iter().enumerate() {
        assert_eq!(
            &tokenized.row(i),
            want,
            "sentence {i}: {:?}",
            golden.sentences[i]
        );
    }
    assert_eq!(tokenized.truncated, 1, "one sentence is over 256 tokens");
    assert!(golden.sentences.iter().any(String::is_empty));
}

/// Embeds the golden sentences on `backend` in `dtype` and compares every element.
fn matches_golden(backend: &mut dyn Backend, dtype: DType, what: &str) {
    let Some(dir) = minilm() else { return };
    let golden = golden();
    let spec = imported(&dir);
    let mut encoder =
        TextEncoder::open(&spec, Path::new("/"), dtype, true, EncoderOutput::Pooled).unwrap();
    backend.load_state(encoder.state()).unwrap();
    let items: Vec<&str> = golden.sentences.iter().map(String::as_str).collect();
    let embedded = encoder.embed(backend, &items, 64, |_| {}).unwrap();
    assert_eq!(embedded.truncated, 1);
    let mut worst = (0.0f64, 0);
    for (i, want) in golden.vectors.iter().enumerate() {
        let got = &embedded.vectors[i * embedded.width..(i + 1) * embedded.width];
        for (g, w) in got.iter().zip(want) {
            let d = (f64::from(*g) - f64::from(*w)).abs();
            if d > worst.0 {
                worst = (d, i);
            }
        }
    }
    eprintln!(
        "{what}: largest difference {:.2e} (sentence {})",
        worst.0, worst.1
    );
    assert!(
        worst.0 <= TOLERANCE,
        "{what}: sentence {} ({:?}) is {:.2e} from sentence-transformers",
        worst.1,
        golden.sentences[worst.1],
        worst.0
    );
}

#[test]
fn minilm_matches_sentence_transformers_on_the_reference_interpreter() {
    matches_golden(&mut ReferenceBackend::default(), DType::F64, "reference");
}

#[test]
fn minilm_matches_sentence_transformers_on_wgpu() {
    let Some(mut device) = open_present(altc_runtime::device::DeviceChoice::Wgpu, true) else {
        return;
    };
    matches_golden(device.as_mut(), DType::F32, "wgpu");
}

/// Token output (MiniLM's last layer before its pooling, with the mask of real
/// tokens), pooled as sentence-transformers pools (masked mean, then L2 norm), gives
/// PyTorch's vectors: the tokens are the encoder's, padding is masked, and items of
/// different length buckets land in their own rows.
#[test]
fn minilm_tokens_pool_to_sentence_transformers_vectors() {
    let Some(dir) = minilm() else { return };
    let golden = golden();
    let spec = imported(&dir);
    let mut encoder = TextEncoder::open(
        &spec,
        Path::new("/"),
        DType::F64,
        true,
        EncoderOutput::Tokens,
    )
    .unwrap();
    let mut backend = ReferenceBackend::default();
    backend.load_state(encoder.state()).unwrap();
    // Short sentences of several lengths keep the interpreter quick.
    let mut chosen: Vec<usize> = (0..golden.sentences.len())
        .filter(|&i| (3..=24).contains(&golden.ids[i].len()))
        .collect();
    chosen.truncate(6);
    let items: Vec<&str> = chosen
        .iter()
        .map(|&i| golden.sentences[i].as_str())
        .collect();
    let embedded = encoder.embed(&mut backend, &items, 4, |_| {}).unwrap();
    let (width, per_item) = (embedded.width, embedded.tokens_per_item);
    let longest = chosen.iter().map(|&i| golden.ids[i].len()).max().unwrap();
    assert_eq!(per_item, longest);
    let mask = embedded.mask.as_ref().expect("token output has a mask");
    for (row, &i) in chosen.iter().enumerate() {
        let real = golden.ids[i].len();
        let item_mask = &mask[row * per_item..(row + 1) * per_item];
        assert!(item_mask[..real].iter().all(|&m| m == 1.0));
        assert!(item_mask[real..].iter().all(|&m| m == 0.0));
        let tokens = &embedded.vectors[row * per_item * width..(row + 1) * per_item * width];
        assert!(
            tokens[real * width..].iter().all(|&v| v == 0.0),
            "padding is zero"
        );
        let mut pooled = vec![0f64; width];
        for t in 0..real {
            for (p, v) in pooled.iter_mut().zip(&tokens[t * width..(t + 1) * width]) {
                *p += f64::from(*v) / real as f64;
            }
        }
        let norm = pooled.iter().map(|v| v * v).sum::<f64>().sqrt();
        for (c, (p, want)) in pooled.iter().zip(&golden.vectors[i]).enumerate() {
            let d = (p / norm - f64::from(*want)).abs();
            assert!(
                d <= TOLERANCE,
                "sentence {i}, column {c}: {d:.2e} from sentence-transformers"
            );
        }
    }
}

/// The imported spec's parameters as lowered, with its weights map.
fn weights_error(dir: &Path, edit: impl FnOnce(&mut EncoderSpec)) -> WeightsError {
    let mut spec = imported(dir);
    edit(&mut spec);
    let program = lower_encoder(&spec, 16, DType::F32).unwrap();
    let (_, weights) = spec.encoder.layers().unwrap();
    load_weights(
        weights.unwrap(),
        Path::new("/"),
        &program.params,
        DType::F32,
    )
    .expect_err("the weights do not fit")
}

fn weights_of(spec: &mut EncoderSpec) -> &mut Weights {
    match &mut spec.encoder {
        altc_compiler::spec::Encoder::Text {
            weights: Some(w), ..
        } => w,
        _ => unreachable!("imported text encoders carry weights"),
    }
}

#[test]
fn a_missing_tensor_names_the_tensor_and_the_parameter() {
    let Some(dir) = minilm() else { return };
    let err = weights_error(&dir, |spec| {
        let map = &mut weights_of(spec).tensors;
        let param = map.remove("encoder.layer.3.output.dense.bias").unwrap();
        map.insert("encoder.layer.3.output.dense.bias_v2".into(), param);
    });
    let text = err.to_string();
    assert!(matches!(err, WeightsError::Missing { .. }), "{text}");
    assert!(
        text.contains("model.safetensors")
            && text.contains("`encoder.layer.3.output.dense.bias_v2`")
            && text.contains("`layers.7.mlp.fc2.bias`"),
        "{text}"
    );
}

#[test]
fn a_tensor_of_the_wrong_shape_names_both_shapes() {
    let Some(dir) = minilm() else { return };
    let err = weights_error(&dir, |spec| {
        let Some((layers, _)) = spec.encoder.layers() else {
            unreachable!()
        };
        assert!(matches!(layers[2], Layer::TokenTypeEmbedding { types: 2 }));
        if let altc_compiler::spec::Encoder::Text { layers, .. } = &mut spec.encoder {
            layers[2] = Layer::TokenTypeEmbedding { types: 3 };
        }
    });
    let text = err.to_string();
    assert!(matches!(err, WeightsError::Shape { .. }), "{text}");
    assert!(
        text.contains("`embeddings.token_type_embeddings.weight` is [2, 384]")
            && text.contains("`layers.2.table` is [3, 384]"),
        "{text}"
    );
}

#[test]
fn an_unmapped_parameter_and_an_unknown_one_are_refused() {
    let Some(dir) = minilm() else { return };
    let err = weights_error(&dir, |spec| {
        weights_of(spec).tensors.remove("embeddings.LayerNorm.bias");
    });
    assert!(
        matches!(&err, WeightsError::Unmapped { params, .. } if params == &["`layers.3.norm.beta`"]),
        "{err}"
    );
    let err = weights_error(&dir, |spec| {
        weights_of(spec)
            .tensors
            .insert("pooler.dense.weight".into(), "pooler.weight".into());
    });
    assert!(
        matches!(err, WeightsError::UnknownParam { .. })
            && err.to_string().contains("`pooler.weight`"),
        "{err}"
    );
}

#[test]
fn a_truncated_weights_file_is_named() {
    let Some(dir) = minilm() else { return };
    let scratch = scratch("truncated");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(scratch.join("model.safetensors"), &bytes[..bytes.len() / 3]).unwrap();
    let err = weights_error(&dir, |spec| {
        weights_of(spec).file = scratch.join("model.safetensors").display().to_string();
    });
    assert!(matches!(err, WeightsError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("altc-encoders-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn import_refuses_other_architectures_by_name() {
    let dir = scratch("llama");
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64}"#,
    )
    .unwrap();
    let err = import_hugging_face(&dir, &dir).unwrap_err();
    assert!(matches!(err, ImportError::Architecture { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("config.json")
            && text.contains("`LlamaForCausalLM`")
            && text.contains("BERT"),
        "{text}"
    );
}

#[test]
fn import_refuses_the_tanh_gelu_approximation() {
    let Some(minilm) = minilm() else { return };
    let dir = scratch("gelu-new");
    let config = std::fs::read_to_string(minilm.join("config.json"))
        .unwrap()
        .replace("\"gelu\"", "\"gelu_new\"");
    std::fs::write(dir.join("config.json"), config).unwrap();
    let err = import_hugging_face(&dir, &dir).unwrap_err();
    assert!(
        err.to_string().contains("hidden_act is \"gelu_new\""),
        "{err}"
    );
}

#[test]
fn a_corrupt_tokenizer_stops_the_encoder_before_it_runs() {
    let Some(dir) = minilm() else { return };
    let scratch = scratch("tokenizer");
    std::fs::write(
        scratch.join("tokenizer.json"),
        "{\"version\": \"1.0\", \"model\": 7}",
    )
    .unwrap();
    let mut spec = imported(&dir);
    if let altc_compiler::spec::Encoder::Text { tokenizer, .. } = &mut spec.encoder {
        *tokenizer = scratch.join("tokenizer.json").display().to_string();
    }
    let err = TextEncoder::open(
        &spec,
        Path::new("/"),
        DType::F32,
        true,
        EncoderOutput::Pooled,
    )
    .err()
    .expect("a corrupt tokenizer is refused");
    assert!(err.to_string().contains("not a tokenizer.json"), "{err}");
}
