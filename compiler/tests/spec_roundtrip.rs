//! Every model in `models/` parses, prints and parses back to the same spec, and
//! lowers; the paper-scale model has the parameter count the issue gives.

use altc_compiler::lower::{lower, LowerOptions};
use altc_compiler::spec;
use std::path::PathBuf;

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn model_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(models_dir())
        .expect("models/ exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "ron"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "expected the paper, tiny and audio models, found {files:?}"
    );
    files
}

#[test]
fn every_model_round_trips_through_ron() {
    for path in model_files() {
        let loaded = spec::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let printed = spec::to_ron(&loaded.spec);
        let again = spec::parse(&printed, "printed").unwrap_or_else(|e| {
            panic!(
                "{}: printed spec does not parse: {e}\n{printed}",
                path.display()
            )
        });
        assert_eq!(
            again.spec,
            loaded.spec,
            "{} changed in the round trip",
            path.display()
        );
        assert_eq!(
            spec::to_ron(&again.spec),
            printed,
            "printing is not stable for {}",
            path.display()
        );
    }
}

#[test]
fn every_model_lowers() {
    for path in model_files() {
        let loaded = spec::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let program = lower(&loaded.spec, LowerOptions::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for d in &program.directions {
            assert!(
                program.graph(&d.loss_graph).is_some(),
                "{}: no graph {}",
                path.display(),
                d.loss_graph
            );
        }
    }
}

#[test]
fn paper_scale_model_has_140_617_740_trainable_parameters() {
    let loaded = spec::load(&models_dir().join("alt_moe.ron")).unwrap();
    let program = lower(&loaded.spec, LowerOptions::default()).unwrap();
    assert_eq!(program.params.trainable_count(), 140_617_740);
    let experts: usize = program
        .params
        .iter()
        .filter(|p| p.module() == "experts")
        .map(|p| p.numel())
        .sum();
    assert_eq!(
        experts,
        12 * 2 * (2048 * 2048 + 2048),
        "12 experts of Linear(h,h) x 2"
    );
}

#[test]
fn audio_model_shares_router_and_experts_across_three_modalities() {
    let loaded = spec::load(&models_dir().join("alt_moe_audio.ron")).unwrap();
    let program = lower(&loaded.spec, LowerOptions::default()).unwrap();
    assert_eq!(program.modalities.len(), 3);
    assert_eq!(program.directions.len(), 4);
    // One expert pool and one gate per branch, whatever the number of directions.
    let modules: std::collections::BTreeSet<&str> =
        program.params.iter().map(|p| p.module()).collect();
    assert!(modules.contains("experts"));
    assert!(
        modules.contains("router.prediction.gate") && modules.contains("router.contrastive.gate")
    );
    assert_eq!(
        program
            .params
            .iter()
            .filter(|p| p.name.starts_with("router.modality_embedding."))
            .count(),
        3
    );
    assert!(program
        .params
        .get("losses.contrastive.log_temperature")
        .is_some());
}

#[test]
fn tiny_model_encoder_is_a_real_graph() {
    let loaded = spec::load(&models_dir().join("alt_moe_tiny.ron")).unwrap();
    let program = lower(&loaded.spec, LowerOptions::default()).unwrap();
    let encoder: usize = program
        .params
        .iter()
        .filter(|p| p.name.starts_with("encoders.image."))
        .map(|p| p.numel())
        .sum();
    // Linear 12->16, attention (LN + q/k/v/out), MLP 16->32->16, LayerNorm.
    let expected =
        (12 * 16 + 16) + (2 * 16 + 4 * (16 * 16 + 16)) + (16 * 32 + 32 + 32 * 16 + 16) + 2 * 16;
    assert_eq!(encoder, expected);
    let image = program
        .graph("image.key")
        .expect("image is a contrastive target");
    assert!(image.inputs().any(|(name, _)| name == "image.tokens"));
}
