//! Tokenizing raw text with the real all-MiniLM-L6-v2 tokenizer (fetched by
//! `scripts/setup.sh`), checked against its vocabulary file and BERT's documented
//! normalisation (lower case, accents stripped, CJK characters split, punctuation
//! apart), and the errors for files that are not tokenizers.

mod common;

use altc_runtime::text::{TextTokenizer, TokenizerError};
use common::minilm;
use std::collections::HashMap;

/// The ids of `pieces` in the model's vocab.txt (one piece a line, id = line index).
fn vocab_ids(dir: &std::path::Path, pieces: &[&str]) -> Vec<u32> {
    let text = std::fs::read_to_string(dir.join("vocab.txt")).unwrap();
    let ids: HashMap<&str, u32> = text.lines().zip(0..).collect();
    pieces
        .iter()
        .map(|p| {
            *ids.get(p)
                .unwrap_or_else(|| panic!("`{p}` is not in vocab.txt"))
        })
        .collect()
}

#[test]
fn minilm_tokenizes_as_bert_uncased_does() {
    let Some(dir) = minilm() else { return };
    let tokenizer = TextTokenizer::load(&dir.join("tokenizer.json"), 256).unwrap();
    let batch = tokenizer
        .encode(&["Hello world!", "Café naïve 東京", ""])
        .unwrap();
    assert_eq!(batch.rows, 3);
    assert_eq!(batch.truncated, 0);
    let expected = [
        vec!["[CLS]", "hello", "world", "!", "[SEP]"],
        vec!["[CLS]", "cafe", "naive", "東", "京", "[SEP]"],
        vec!["[CLS]", "[SEP]"],
    ];
    for (row, pieces) in expected.iter().enumerate() {
        assert_eq!(batch.row(row), vocab_ids(&dir, pieces), "item {row}");
    }
    // Padded to the longest item with id 0 and mask 0.
    assert_eq!(batch.length, 6);
    assert_eq!(&batch.mask[12..18], &[1, 1, 0, 0, 0, 0]);
    assert_eq!(&batch.ids[14..18], &[0, 0, 0, 0]);
}

#[test]
fn items_past_the_maximum_length_are_cut_and_counted() {
    let Some(dir) = minilm() else { return };
    let tokenizer = TextTokenizer::load(&dir.join("tokenizer.json"), 6).unwrap();
    let batch = tokenizer
        .encode(&["one two three four five six seven", "one two"])
        .unwrap();
    assert_eq!(batch.truncated, 1);
    assert_eq!(batch.length, 6);
    assert_eq!(
        batch.row(0),
        vocab_ids(&dir, &["[CLS]", "one", "two", "three", "four", "[SEP]"])
    );
    assert_eq!(
        batch.row(1),
        vocab_ids(&dir, &["[CLS]", "one", "two", "[SEP]"])
    );
    // Too short to hold [CLS] and [SEP]: refused.
    let e = TextTokenizer::load(&dir.join("tokenizer.json"), 2)
        .err()
        .unwrap();
    assert!(
        matches!(e, TokenizerError::TooShort { special: 2, .. }),
        "{e}"
    );
}

#[test]
fn a_missing_or_corrupt_tokenizer_is_named() {
    let dir = std::env::temp_dir().join(format!("altc-text-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("absent.json");
    let e = TextTokenizer::load(&missing, 16).err().unwrap();
    assert!(matches!(e, TokenizerError::Read { .. }), "{e}");
    assert!(e.to_string().contains("absent.json"), "{e}");
    let corrupt = dir.join("tokenizer.json");
    std::fs::write(
        &corrupt,
        "{\"model\": {\"type\": \"WordPiece\", \"vocab\": ",
    )
    .unwrap();
    let e = TextTokenizer::load(&corrupt, 16).err().unwrap();
    assert!(matches!(e, TokenizerError::Corrupt { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("{}: not a tokenizer.json", corrupt.display())),
        "{e}"
    );
}
