//! Every class of spec error: the message, the spec path and the reported location.

use altc_compiler::spec::{self, Position, SpecError};

const TINY: &str = include_str!("../../models/alt_moe_tiny.ron");
const FILE: &str = "models/alt_moe_tiny.ron";

/// The tiny model with `from` replaced by `to` (which must occur exactly once).
fn tiny_with(from: &str, to: &str) -> String {
    assert_eq!(
        TINY.matches(from).count(),
        1,
        "`{from}` must occur once in the tiny model"
    );
    TINY.replace(from, to)
}

/// The 1-based line and column where `needle` starts in `text`, plus `skip` columns.
fn position_of(text: &str, needle: &str, skip: usize) -> Position {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("`{needle}` not in text"))
        + skip;
    let line = text[..at].matches('\n').count() + 1;
    let col = at - text[..at].rfind('\n').map_or(0, |i| i + 1) + 1;
    Position { line, col }
}

fn parse_err(src: &str) -> SpecError {
    match spec::parse(src, FILE) {
        Ok(_) => panic!("the spec should have been rejected"),
        Err(e) => e,
    }
}

/// A semantic error at `path`, located where `anchor` (+`skip`) is, whose message
/// contains every piece of `says`.
fn assert_invalid(src: &str, path: &str, anchor: &str, skip: usize, says: &[&str]) {
    let err = parse_err(src);
    let message = err.to_string();
    assert_eq!(err.path(), Some(path), "wrong path in: {message}");
    let expected = position_of(src, anchor, skip);
    assert_eq!(
        err.position(),
        Some(expected),
        "wrong location in: {message}"
    );
    assert!(
        message.starts_with(&format!(
            "{FILE}:{}:{}: {path}: ",
            expected.line, expected.col
        )),
        "message should lead with file:line:col: path: {message}"
    );
    for piece in says {
        assert!(message.contains(piece), "`{piece}` missing from: {message}");
    }
}

#[test]
fn syntax_error_names_file_line_and_column() {
    let src = tiny_with(
        "hidden: 16,\n        direction_embedding",
        "hidden: 16\n        direction_embedding",
    );
    let err = parse_err(&src);
    let SpecError::Syntax {
        file,
        position,
        message,
    } = &err
    else {
        panic!("expected a syntax error, got {err}");
    };
    assert_eq!(file, FILE);
    assert_eq!(*position, position_of(&src, "direction_embedding: true", 0));
    assert!(message.contains("Expected"), "{message}");
    assert!(err.to_string().starts_with(&format!(
        "{FILE}:{}:{}: syntax error:",
        position.line, position.col
    )));
}

#[test]
fn unclosed_file_is_a_syntax_error_at_the_end() {
    let src = TINY.trim_end().trim_end_matches(')');
    let err = parse_err(src);
    assert!(matches!(err, SpecError::Syntax { .. }), "{err}");
    assert!(
        err.to_string().contains("Unexpected end of RON") || err.to_string().contains("Expected"),
        "{err}"
    );
}

#[test]
fn unknown_field_is_rejected_with_its_location_and_the_valid_fields() {
    let src = tiny_with(
        "hidden: 16,\n        direction_embedding",
        "hiden: 16,\n        direction_embedding",
    );
    let err = parse_err(&src);
    let text = err.to_string();
    assert!(matches!(err, SpecError::Syntax { .. }), "{text}");
    assert!(text.contains("hiden"), "{text}");
    assert!(
        text.contains("hidden"),
        "the valid field names should be listed: {text}"
    );
    assert_eq!(
        err.position().map(|p| p.line),
        Some(position_of(&src, "hiden", 0).line)
    );
}

#[test]
fn unknown_variant_lists_the_valid_ones() {
    let src = tiny_with("pooling: MaskedMean", "pooling: Median");
    let text = parse_err(&src).to_string();
    assert!(
        text.contains("Median") && text.contains("MaskedMean") && text.contains("First"),
        "{text}"
    );
    assert!(
        text.starts_with(&format!("{FILE}:{}:", position_of(&src, "Median", 0).line)),
        "{text}"
    );
}

#[test]
fn wrong_value_type_is_located() {
    let src = tiny_with("top_k: 2", "top_k: \"two\"");
    let err = parse_err(&src);
    assert!(matches!(err, SpecError::Syntax { .. }), "{err}");
    assert_eq!(
        err.position().map(|p| p.line),
        Some(position_of(&src, "\"two\"", 0).line)
    );
}

#[test]
fn unknown_modality_in_a_direction_lists_the_modalities() {
    let src = tiny_with(
        "source: \"image\", target: \"text\"",
        "source: \"image\", target: \"txt\"",
    );
    assert_invalid(
        &src,
        "directions[0].target",
        "\"txt\"",
        0,
        &["unknown modality `txt`", "valid: `text`, `image`"],
    );
}

#[test]
fn top_k_above_the_expert_count_says_the_valid_range() {
    let src = tiny_with("top_k: 2", "top_k: 5");
    assert_invalid(
        &src,
        "connector.router.top_k",
        "top_k: 5",
        7,
        &["top_k = 5", "4 experts", "valid: 1 to 4"],
    );
}

#[test]
fn top_k_of_zero_is_rejected() {
    let src = tiny_with("top_k: 2", "top_k: 0");
    assert_invalid(
        &src,
        "connector.router.top_k",
        "top_k: 0",
        7,
        &["valid: 1 to 4"],
    );
}

#[test]
fn head_that_does_not_fit_its_regression_target_names_the_target_width() {
    let src = tiny_with("heads: {\"prediction\": 24", "heads: {\"prediction\": 23");
    assert_invalid(
        &src,
        "directions[0].heads.prediction",
        "\"prediction\": 23",
        14,
        &[
            "produces width 23",
            "modality `text` of width 24",
            "valid: 24",
        ],
    );
}

#[test]
fn contrastive_head_must_meet_the_target_projection() {
    let src = tiny_with(
        "heads: {\"prediction\": 16, \"contrastive\": 16}",
        "heads: {\"prediction\": 16, \"contrastive\": 8}",
    );
    assert_invalid(
        &src,
        "directions[1].heads.contrastive",
        "\"contrastive\": 8",
        15,
        &["target projection of width 16", "valid: 16"],
    );
}

#[test]
fn loss_on_a_missing_output_lists_the_branches() {
    let src = tiny_with("output: \"contrastive\"", "output: \"contrastiv\"");
    assert_invalid(
        &src,
        "losses[1].output",
        "\"contrastiv\"",
        0,
        &[
            "reads output `contrastiv`",
            "valid: `prediction`, `contrastive`",
        ],
    );
}

#[test]
fn attention_heads_must_divide_the_width() {
    let src = tiny_with("SelfAttention(heads: 2)", "SelfAttention(heads: 3)");
    assert_invalid(
        &src,
        "modalities[1].encoder.layers[1].heads",
        "heads: 3",
        7,
        &["3 heads do not divide the width 16", "1, 2, 4, 8, 16"],
    );
}

#[test]
fn encoder_output_must_match_the_modality_width() {
    let src = tiny_with(
        "LayerNorm(eps: 1e-5),\n                ]",
        "LayerNorm(eps: 1e-5),\n                    Linear(width: 8),\n                ]",
    );
    assert_invalid(
        &src,
        "modalities[1].encoder.layers",
        "layers: [",
        8,
        &["produces width 8", "declares width 16"],
    );
}

#[test]
fn sample_schedule_needs_one_probability_per_direction() {
    let src = tiny_with(
        "schedule: Alternate(steps_per_task: 1)",
        "schedule: Sample(probabilities: [1.0])",
    );
    assert_invalid(
        &src,
        "schedule.probabilities",
        "[1.0]",
        0,
        &["1 probabilities for 2 directions"],
    );
}

#[test]
fn duplicate_names_are_rejected() {
    let src = tiny_with("(name: \"text_to_image\"", "(name: \"image_to_text\"");
    let err = parse_err(&src);
    let text = err.to_string();
    assert!(
        text.contains("direction `image_to_text` is declared twice"),
        "{text}"
    );
    assert_eq!(err.path(), Some("directions[1].name"));
}

#[test]
fn a_branch_no_loss_reads_is_rejected() {
    let src = tiny_with(
        "(name: \"contrastive\", task_embedding: true),\n        ],",
        "(name: \"contrastive\", task_embedding: true),\n            (name: \"spare\"),\n        ],",
    );
    let err = parse_err(&src);
    assert!(
        err.to_string().contains("branch `spare` feeds no loss"),
        "{err}"
    );
}

#[test]
fn bad_optimizer_settings_are_located() {
    let src = tiny_with("betas: (0.9, 0.999)", "betas: (0.9, 1.5)");
    assert_invalid(&src, "optimizer.betas.1", "1.5", 0, &["beta2 is 1.5"]);
}

#[test]
fn missing_file_names_the_file() {
    let err = spec::load(std::path::Path::new("models/no_such_model.ron")).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, SpecError::Io { .. }));
    assert!(
        text.starts_with("models/no_such_model.ron: cannot read"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------
// Pretrained-encoder files
// ---------------------------------------------------------------------------------

const ENCODER_FILE: &str = "encoders/tiny_bert.ron";

/// A small text encoder as `altc import` would write it.
const TINY_BERT: &str = r#"// A one-block BERT.
EncoderSpec(
    name: "tiny-bert",
    width: 8,
    encoder: Text(
        tokenizer: "tokenizer.json",
        max_length: 6,
        layers: [
            TokenEmbedding(vocab: 11, width: 8),
            PositionEmbedding(positions: 8),
            LayerNorm(eps: 1e-12),
            Block(heads: 2, intermediate: 12, norm: Post, eps: 1e-12),
            TokenPool(MaskedMean),
            Normalize,
        ],
        weights: Some(Weights(file: "model.safetensors", tensors: {
            "embeddings.word_embeddings.weight": "layers.0.table",
        })),
    ),
)
"#;

fn encoder_err(src: &str) -> SpecError {
    match spec::parse_encoder(src, ENCODER_FILE) {
        Ok(_) => panic!("the encoder spec should have been rejected"),
        Err(e) => e,
    }
}

fn bert_with(from: &str, to: &str) -> String {
    assert_eq!(
        TINY_BERT.matches(from).count(),
        1,
        "`{from}` must occur once"
    );
    TINY_BERT.replace(from, to)
}

#[test]
fn an_encoder_file_is_told_from_a_model_and_parses() {
    assert!(spec::is_encoder_spec(TINY_BERT));
    assert!(!spec::is_encoder_spec(TINY));
    let loaded = spec::parse_encoder(TINY_BERT, ENCODER_FILE).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        loaded.spec.encoder.is_frozen(),
        "encoders are frozen by default"
    );
    let printed = spec::encoder_to_ron(&loaded.spec);
    assert!(spec::is_encoder_spec(&printed));
    let reread = spec::parse_encoder(&printed, ENCODER_FILE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reread.spec, loaded.spec);
}

#[test]
fn a_text_encoder_must_start_by_embedding_its_ids() {
    let src = bert_with("TokenEmbedding(vocab: 11, width: 8),\n", "");
    let err = encoder_err(&src);
    assert_eq!(err.path(), Some("encoder.layers"), "{err}");
    assert!(err.to_string().contains("TokenEmbedding(vocab"), "{err}");
}

#[test]
fn encoder_block_heads_must_divide_the_width() {
    let err = encoder_err(&bert_with("heads: 2", "heads: 3"));
    assert_eq!(err.path(), Some("encoder.layers[3].heads"), "{err}");
    let expected = position_of(&bert_with("heads: 2", "heads: 3"), "heads: 3", 7);
    assert_eq!(err.position(), Some(expected), "{err}");
    assert!(
        err.to_string()
            .contains("3 heads do not divide the width 8"),
        "{err}"
    );
}

#[test]
fn position_embeddings_must_cover_the_maximum_length() {
    let err = encoder_err(&bert_with("positions: 8", "positions: 4"));
    assert_eq!(err.path(), Some("encoder.layers[1].positions"), "{err}");
    assert!(
        err.to_string()
            .contains("4 positions cannot cover the 6 tokens"),
        "{err}"
    );
}

#[test]
fn a_parameter_mapped_from_two_tensors_is_refused() {
    let src = bert_with(
        "\"embeddings.word_embeddings.weight\": \"layers.0.table\",",
        "\"embeddings.word_embeddings.weight\": \"layers.0.table\", \"other\": \"layers.0.table\",",
    );
    let err = encoder_err(&src);
    assert_eq!(err.path(), Some("encoder.weights.tensors"), "{err}");
    assert!(
        err.to_string()
            .contains("`layers.0.table` is mapped from two tensors"),
        "{err}"
    );
}

#[test]
fn a_model_cannot_take_raw_text_yet() {
    let src = tiny_with(
        "encoder: Precomputed",
        "encoder: Text(tokenizer: \"t.json\", max_length: 6, layers: [TokenEmbedding(vocab: 5, width: 24)])",
    );
    let err = parse_err(&src);
    assert!(err.path().is_some_and(|p| p.ends_with(".encoder")), "{err}");
    assert!(err.to_string().contains("altc embed --encoder"), "{err}");
}
