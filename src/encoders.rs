//! Pretrained encoders at the command line: `altc import` (a Hugging Face folder to an
//! encoder spec), `altc check` of an encoder spec (its weights and tokenizer checked
//! too), `altc embed --encoder --text` (raw text to a vector store), `altc data text`
//! (a paired dataset from text and vector stores), and `altc tune`/`altc bench` of an
//! encoder.

use crate::console::emit;
use crate::devices::{open_backend, Device};
use altc_compiler::ir::DType;
use altc_compiler::lower::lower_encoder;
use altc_compiler::spec::{self, Encoder, EncoderSpec, Layer, Precision};
use altc_compiler::summary::thousands;
use altc_runtime::backend::{TunedKernel, TuningMode};
use altc_runtime::data::{
    check_finite, f32_values, fixed_held_out, write_f32_safetensors, HELD_OUT_KEY,
};
use altc_runtime::encoding::{
    bucket_length, load_tokenizer, load_weights, EncoderOutput, TextEncoder,
};
use altc_runtime::tuning::Manifest;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct ImportArgs {
    /// A Hugging Face model folder: `config.json`, `model.safetensors` and
    /// `tokenizer.json` (sentence-transformers' pooling files are read when present).
    dir: PathBuf,
    /// Where to write the encoder spec (`.ron`); its paths are relative to its folder.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn import(args: ImportArgs) -> Result<()> {
    let inputs: Vec<(&str, PathBuf)> = ["config.json", "model.safetensors", "tokenizer.json"]
        .into_iter()
        .map(|f| ("model folder", args.dir.join(f)))
        .collect();
    let inputs: Vec<(&str, &Path)> = inputs.iter().map(|(w, p)| (*w, p.as_path())).collect();
    crate::files::refuse_overwrite(&args.output, &inputs)?;
    let encoder = spec::import_hugging_face(&args.dir, &spec_folder(&args.output))?;
    let text = format!(
        "// Imported by `altc import {}`: a frozen text encoder, its weights mapped from\n// the checkpoint's tensor names to the layers' parameters.\n{}\n",
        args.dir.display(),
        spec::encoder_to_ron(&encoder)
    );
    // What is written must pass the checks any encoder spec gets.
    let written = args.output.display().to_string();
    spec::parse_encoder(&text, &written)?;
    altc_runtime::atomic_write(&args.output, text.as_bytes())
        .with_context(|| format!("writing {written}"))?;
    let blocks = layers(&encoder)
        .iter()
        .filter(|l| matches!(l, Layer::Block { .. }))
        .count();
    emit(&format!(
        "imported {} -> {written} ({blocks} blocks, width {}, {} tensors mapped)\n",
        args.dir.display(),
        encoder.width,
        encoder_weights_count(&encoder),
    ))
}

fn layers(spec: &EncoderSpec) -> &[Layer] {
    spec.encoder.layers().map_or(&[], |(layers, _)| layers)
}

fn encoder_weights_count(spec: &EncoderSpec) -> usize {
    spec.encoder
        .layers()
        .and_then(|(_, w)| w)
        .map_or(0, |w| w.tensors.len())
}

/// The folder an encoder spec's relative paths start from.
fn spec_folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The encoder spec read from `path` ready to run on `device`: its tokenizer and
/// weights (paths relative to the spec's folder), graphs in f64 on the interpreter
/// (the oracle) and f32 on devices.
fn open_encoder(
    spec: &EncoderSpec,
    path: &Path,
    device: Device,
    optimise: bool,
    output: EncoderOutput,
) -> Result<TextEncoder> {
    let dtype = if device == Device::Reference {
        DType::F64
    } else {
        DType::F32
    };
    Ok(TextEncoder::open(
        spec,
        &spec_folder(path),
        dtype,
        optimise,
        output,
    )?)
}

/// `altc check` of an encoder spec: the spec, then its weights (every mapped tensor's
/// presence, shape and dtype, every parameter mapped) and its tokenizer.
pub fn check_encoder(path: &Path, text: &str) -> Result<()> {
    let loaded = spec::parse_encoder(text, &path.display().to_string())?;
    let encoder = &loaded.spec;
    let Encoder::Text { max_length, .. } = encoder.encoder else {
        unreachable!("validated: encoder files hold text encoders")
    };
    let program = lower_encoder(encoder, max_length, DType::F32)?;
    let base = spec_folder(path);
    let mut report = format!(
        "encoder {}: {} layers, width {}, {} parameters ({})\n",
        encoder.name,
        layers(encoder).len(),
        encoder.width,
        thousands(program.params.total_count()),
        if encoder.encoder.is_frozen() {
            "frozen"
        } else {
            "trainable"
        },
    );
    if let Some((_, Some(weights))) = encoder.encoder.layers() {
        load_weights(weights, &base, &program.params, DType::F32)?;
        report.push_str(&format!(
            "  weights: {} tensors of {} checked (presence, shape, dtype, finite)\n",
            weights.tensors.len(),
            base.join(&weights.file).display()
        ));
    } else {
        report.push_str("  weights: none (initialised from the seed)\n");
    }
    let tokenizer = load_tokenizer(encoder, &base)?;
    report.push_str(&format!(
        "  tokenizer: {} ({} ids, at most {max_length} tokens an item)\n",
        tokenizer.path().display(),
        thousands(tokenizer.vocab_size()),
    ));
    report.push_str(&format!("{}: ok\n", path.display()));
    emit(&report)
}

/// One item of a text file and what names it in the store.
struct Item {
    id: String,
    text: String,
}

/// Items of `path`: JSON lines (`.jsonl`) with the text in `field` and the id in
/// `id_field` (its line number when absent), or else one item a line, named by its
/// line number.
fn read_items(path: &Path, field: &str, id_field: &str) -> Result<Vec<Item>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {} (UTF-8 text)", path.display()))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        if !jsonl {
            items.push(Item {
                id: number.to_string(),
                text: line.to_string(),
            });
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{number}: not a JSON object", path.display()))?;
        let Some(text) = value.get(field).and_then(|v| v.as_str()) else {
            bail!(
                "{}:{number}: no string field `{field}` (--field names the text's field)",
                path.display()
            );
        };
        let id = match value.get(id_field) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => number.to_string(),
        };
        items.push(Item {
            id,
            text: text.to_string(),
        });
    }
    if items.is_empty() {
        bail!("{}: no items to embed", path.display());
    }
    Ok(items)
}

/// What `altc embed --encoder` is asked to do.
pub struct TextEmbedRequest<'a> {
    pub run: EncoderRun<'a>,
    pub text: &'a Path,
    pub field: &'a str,
    pub id_field: &'a str,
    pub output: &'a Path,
}

pub fn embed_text(request: TextEmbedRequest) -> Result<()> {
    let run = &request.run;
    crate::files::refuse_overwrite(
        request.output,
        &[("--encoder", run.encoder), ("--text", request.text)],
    )?;
    let items = read_items(request.text, request.field, request.id_field)?;
    let (name, embedded) = run.embed(&items)?;
    let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    let metadata = HashMap::from([
        ("altc.store".to_string(), "1".to_string()),
        ("encoder".to_string(), name.clone()),
        ("ids".to_string(), serde_json::to_string(&ids)?),
        ("truncated".to_string(), embedded.truncated.to_string()),
    ]);
    write_f32_safetensors(
        request.output,
        &[(
            "embeddings".to_string(),
            vec![items.len(), embedded.width],
            embedded.vectors,
        )],
        metadata,
    )?;
    let launches = embedded
        .launches
        .map(|n| format!(", {n} kernel launches a batch"))
        .unwrap_or_default();
    emit(&format!(
        "embedded {} items with {name} -> {} ([{}, {}], {} tokens, {:.1} items/s{launches})\n",
        items.len(),
        request.output.display(),
        items.len(),
        embedded.width,
        thousands(embedded.tokens),
        embedded.items_per_second,
    ))
}

/// How to run a text encoder over items.
pub struct EncoderRun<'a> {
    /// The encoder spec.
    pub encoder: &'a Path,
    pub batch_size: usize,
    /// Through the e-graph and fusion (else the `--no-opt` baseline).
    pub optimise: bool,
    pub device: Device,
    /// The tuning cache whose choices the device's kernels use.
    pub tune_cache: &'a Path,
    pub output: EncoderOutput,
}

/// What one encoder run gave, with its rate.
struct EmbeddedItems {
    vectors: Vec<f32>,
    width: usize,
    tokens_per_item: usize,
    mask: Option<Vec<f32>>,
    truncated: usize,
    tokens: usize,
    launches: Option<usize>,
    items_per_second: f64,
}

impl EncoderRun<'_> {
    /// The encoder's name and the items' vectors, with a progress bar and notes on
    /// truncation and cut batches on stderr.
    fn embed(&self, items: &[Item]) -> Result<(String, EmbeddedItems)> {
        let loaded = spec::load_encoder(self.encoder)?;
        let mut encoder = open_encoder(
            &loaded.spec,
            self.encoder,
            self.device,
            self.optimise,
            self.output,
        )?;
        let mut backend = open_backend(
            self.device,
            Precision::F32,
            self.optimise,
            Some(encoder.parameters()),
        )?;
        crate::devices::use_tuned_kernels(backend.as_mut(), self.tune_cache)?;
        backend.load_state(encoder.state())?;
        let texts: Vec<&str> = items.iter().map(|i| i.text.as_str()).collect();
        let bar = ProgressBar::new(texts.len() as u64).with_style(
            ProgressStyle::with_template("embedding {pos}/{len} items [{elapsed_precise}]")
                .expect("a valid template"),
        );
        let start = Instant::now();
        let embedded = encoder.embed(backend.as_mut(), &texts, self.batch_size, |done| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        let seconds = start.elapsed().as_secs_f64();
        if embedded.truncated > 0 {
            eprintln!(
                "note: {} of {} items were longer than {} tokens and were cut to it",
                embedded.truncated,
                items.len(),
                encoder.max_length()
            );
        }
        for (length, size) in &embedded.cut_batches {
            eprintln!(
                "note: batches of {length}-token items were cut to {size} items to fit the device"
            );
        }
        Ok((
            loaded.spec.name,
            EmbeddedItems {
                vectors: embedded.vectors,
                width: embedded.width,
                tokens_per_item: embedded.tokens_per_item,
                mask: embedded.mask,
                truncated: embedded.truncated,
                tokens: embedded.tokens,
                launches: embedded.launches,
                items_per_second: items.len() as f64 / seconds.max(1e-9),
            },
        ))
    }
}

#[derive(Args)]
pub struct DataTextArgs {
    /// A modality and where its side comes from, as NAME=FILE (at least two): text
    /// (`.txt`, one item a line, or `.jsonl` with --field) is embedded with
    /// --encoder; a vector store (`.safetensors` with `embeddings` [N, width], as
    /// `altc embed` writes) or a token store (`tokens` [N, T, width], with `mask`
    /// [N, T] where items have padding) is taken as it is. Item `i` of every side
    /// is pair `i`.
    #[arg(long = "modality", value_name = "NAME=FILE", required = true, num_args = 1, value_parser = parse_side)]
    sides: Vec<(String, PathBuf)>,
    /// The text encoder spec for the text sides (`altc import` writes one).
    #[arg(long)]
    encoder: Option<PathBuf>,
    /// With JSON lines: the field holding each item's text.
    #[arg(long, default_value = "text")]
    field: String,
    /// Keep the text encoder's tokens (its last layer before pooling) with a mask,
    /// `[N, L, width]`, instead of one pooled vector an item: for a model whose text
    /// modality is `tokens: Padded(max: L)`.
    #[arg(long)]
    tokens: bool,
    /// With --tokens: pad every item to this many tokens [default: the longest
    /// item's]; must be at least the longest.
    #[arg(long, requires = "tokens", value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pad_to: Option<u64>,
    /// Declare the last this many pairs the held-out split (kept in the file), so
    /// every run on the dataset, whatever its seed, evaluates on the same pairs
    /// [default: the split a token store fixes, if one does].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    held_out: Option<u64>,
    /// Items per encoder batch, 1 to 4,096.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch_size: u64,
    /// Where to write the paired dataset (safetensors); never one of the inputs.
    #[arg(short, long)]
    output: PathBuf,
    /// Where to run the encoder: auto, cuda, wgpu or reference.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    #[command(flatten)]
    cache: crate::devices::TuneCacheArgs,
}

fn parse_side(text: &str) -> Result<(String, PathBuf), String> {
    match text.split_once('=') {
        Some((name, file)) if !name.is_empty() && !file.is_empty() => {
            Ok((name.to_string(), PathBuf::from(file)))
        }
        _ => Err(format!(
            "`{text}` is not NAME=FILE (e.g. text=captions.txt)"
        )),
    }
}

/// One side of a paired dataset: `[items, tokens, width]` values and, for padded
/// items, their `[items, tokens]` mask.
struct Side {
    items: usize,
    tokens: usize,
    width: usize,
    values: Vec<f32>,
    mask: Option<Vec<f32>>,
    /// The held-out split a store fixes (its last items), from its `altc.held_out`.
    held_out: Option<usize>,
}

/// A token store: `tokens` `[N, T, width]` of finite f32 values and, optionally,
/// `mask` `[N, T]` of 0 and 1 (as an image tower's dataset builder writes); `None`
/// where the file holds no `tokens`.
fn read_token_store(path: &Path) -> Result<Option<Side>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let f32_tensor = |name: &str| -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        let Ok(view) = st.tensor(name) else {
            return Ok(None);
        };
        Ok(Some((
            view.shape().to_vec(),
            f32_values(path, name, &view)?,
        )))
    };
    let Some((shape, values)) = f32_tensor("tokens")? else {
        return Ok(None);
    };
    let &[items, tokens, width] = shape.as_slice() else {
        bail!(
            "{}: `tokens` is {shape:?}, not [items, tokens, width]",
            path.display()
        );
    };
    if items == 0 || tokens == 0 || width == 0 {
        bail!("{}: `tokens` is {shape:?}: empty", path.display());
    }
    check_finite(path, "tokens", &values, tokens * width)?;
    let mask = match f32_tensor("mask")? {
        None => None,
        Some((mask_shape, mask)) if mask_shape == [items, tokens] => Some(mask),
        Some((mask_shape, _)) => bail!(
            "{}: `mask` is {mask_shape:?}, but `tokens` needs [{items}, {tokens}]",
            path.display()
        ),
    };
    if let Some(m) = &mask {
        if let Some(i) = m.iter().position(|&v| v != 0.0 && v != 1.0) {
            bail!(
                "{}: `mask` holds {} at item {}, token {}; masks hold 0 or 1",
                path.display(),
                m[i],
                i / tokens,
                i % tokens
            );
        }
    }
    let held_out = fixed_held_out(&bytes, path, items)?;
    Ok(Some(Side {
        items,
        tokens,
        width,
        values,
        mask,
        held_out,
    }))
}

/// `side` padded (with zeros, masked out) to `tokens` per item.
fn pad_side(side: Side, tokens: usize, what: &str) -> Result<Side> {
    if tokens < side.tokens {
        bail!(
            "--pad-to {tokens}: {what}'s longest item has {} tokens",
            side.tokens
        );
    }
    let row = side.tokens * side.width;
    let mut values = vec![0f32; side.items * tokens * side.width];
    let mut mask = vec![0f32; side.items * tokens];
    for i in 0..side.items {
        values[i * tokens * side.width..][..row].copy_from_slice(&side.values[i * row..][..row]);
        let real = &mut mask[i * tokens..][..side.tokens];
        match &side.mask {
            Some(m) => real.copy_from_slice(&m[i * side.tokens..][..side.tokens]),
            None => real.fill(1.0),
        }
    }
    Ok(Side {
        tokens,
        values,
        mask: Some(mask),
        ..side
    })
}

/// `altc data text`: a paired dataset from raw text (through a pretrained encoder:
/// pooled vectors `[N, 1, width]`, or with --tokens its tokens and mask) and from
/// vector or token stores: what a model with `encoder: Precomputed` trains on.
pub fn data_text(args: DataTextArgs) -> Result<()> {
    if args.sides.len() < 2 {
        bail!("a paired dataset needs two modalities or more: give --modality NAME=FILE again");
    }
    let mut inputs: Vec<(&str, &Path)> = args
        .sides
        .iter()
        .map(|(_, p)| ("--modality", p.as_path()))
        .collect();
    if let Some(e) = &args.encoder {
        inputs.push(("--encoder", e));
    }
    crate::files::refuse_overwrite(&args.output, &inputs)?;
    // Every side read and counted before any text is embedded (which is slow).
    enum Source {
        Stored(Side),
        Text(Vec<Item>),
    }
    let mut sources = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (name, file) in &args.sides {
        if !seen.insert(name) {
            bail!("modality `{name}` is given twice");
        }
        let source = if file.extension().is_some_and(|e| e == "safetensors") {
            match read_token_store(file)? {
                Some(side) => Source::Stored(side),
                None => {
                    let store = crate::serving::read_store(file)?;
                    Source::Stored(Side {
                        items: store.rows,
                        tokens: 1,
                        width: store.width,
                        values: store.vectors,
                        mask: None,
                        held_out: None,
                    })
                }
            }
        } else {
            if args.encoder.is_none() {
                bail!(
                    "{}: text needs --encoder (a text encoder spec) to become vectors",
                    file.display()
                );
            }
            Source::Text(read_items(file, &args.field, "id")?)
        };
        let count = match &source {
            Source::Stored(side) => side.items,
            Source::Text(items) => items.len(),
        };
        if let Some((first, n, _, _)) = sources.first() {
            if *n != count {
                bail!(
                    "{} has {count} items but {first} has {n}: item i of every side is pair i",
                    file.display(),
                );
            }
        }
        sources.push((file.display().to_string(), count, name, source));
    }
    let pairs = sources[0].1;
    if let Some(held_out) = args.held_out {
        if held_out as usize > pairs / 2 {
            bail!("--held-out {held_out}: at most half of the {pairs} pairs can be held out");
        }
    }
    // A store that fixes its split (as the emoji builder's does) passes it on; the
    // sides and --held-out must agree.
    let mut held_out = args
        .held_out
        .map(|n| (n as usize, "--held-out".to_string()));
    for (file, _, _, source) in &sources {
        if let Source::Stored(Side {
            held_out: Some(n), ..
        }) = source
        {
            match &held_out {
                Some((m, from)) if m != n => {
                    bail!("{file} fixes its last {n} items as held out, but {from} holds out {m}")
                }
                Some(_) => {}
                None => held_out = Some((*n, file.clone())),
            }
        }
    }
    let held_out = held_out.map(|(n, _)| n);
    let tune_cache = args.cache.configure_cubecl()?;
    let mut tensors = Vec::new();
    for (_, _, name, source) in sources {
        let side = match source {
            Source::Stored(side) => side,
            Source::Text(items) => {
                let run = EncoderRun {
                    encoder: args.encoder.as_deref().expect("checked above"),
                    batch_size: args.batch_size as usize,
                    optimise: true,
                    device: args.device,
                    tune_cache: &tune_cache,
                    output: if args.tokens {
                        EncoderOutput::Tokens
                    } else {
                        EncoderOutput::Pooled
                    },
                };
                let (_, embedded) = run.embed(&items)?;
                let side = Side {
                    items: items.len(),
                    tokens: embedded.tokens_per_item,
                    width: embedded.width,
                    values: embedded.vectors,
                    mask: embedded.mask,
                    held_out: None,
                };
                match args.pad_to {
                    Some(tokens) => pad_side(side, tokens as usize, name)?,
                    None => side,
                }
            }
        };
        if let Some(mask) = side.mask {
            tensors.push((format!("{name}.mask"), vec![side.items, side.tokens], mask));
        }
        tensors.push((
            format!("{name}.tokens"),
            vec![side.items, side.tokens, side.width],
            side.values,
        ));
    }
    let mut metadata = HashMap::new();
    if let Some(held_out) = held_out {
        metadata.insert(HELD_OUT_KEY.to_string(), held_out.to_string());
    }
    write_f32_safetensors(&args.output, &tensors, metadata)?;
    let sides: Vec<String> = tensors
        .iter()
        .map(|(name, shape, _)| format!("{name} {shape:?}"))
        .collect();
    let split = held_out
        .map(|n| format!("; the last {n} held out"))
        .unwrap_or_default();
    emit(&format!(
        "wrote {} ({pairs} pairs: {}{split})\n",
        args.output.display(),
        sides.join(", ")
    ))
}

/// Whether `path` holds an encoder spec rather than a model (unreadable files are
/// left to the model loader to report).
pub fn is_encoder_file(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|text| spec::is_encoder_spec(&text))
}

/// Tunes every tunable kernel of the encoder's graphs at each of `lengths` (bucket
/// lengths, as `altc embed` pads to) on `device`, recording the winners in `dir`
/// after each length, so an interrupted tuning keeps what it measured.
pub fn tune_encoder(
    path: &Path,
    device: Device,
    batch: usize,
    lengths: &[usize],
    dir: &Path,
) -> Result<(String, Vec<TunedKernel>)> {
    let loaded = spec::load_encoder(path)?;
    let mut encoder = open_encoder(&loaded.spec, path, device, true, EncoderOutput::Pooled)?;
    let mut backend = open_backend(device, Precision::F32, true, None)?;
    let Some(scope) = backend.tuning_scope() else {
        bail!(
            "{} has no tunable kernels; tune on a device (--device wgpu or cuda)",
            backend.describe()
        );
    };
    eprintln!("tuning scope: {scope}");
    backend.set_tuning(TuningMode::Tune);
    backend.load_state(encoder.state())?;
    for &length in lengths {
        let item = bucket_item(&encoder, length)?;
        eprintln!("{} at {length} tokens, batch {batch} ...", loaded.spec.name);
        let items = vec![item.as_str(); batch];
        encoder
            .embed(backend.as_mut(), &items, batch, |_| {})
            .with_context(|| {
                format!(
                    "running {} at {length} tokens while tuning",
                    loaded.spec.name
                )
            })?;
        Manifest::record(dir, &scope, &backend.tuned_kernels())?;
    }
    Ok((scope, backend.tuned_kernels()))
}

/// An item of exactly `length` tokens for tuning and timing, `length` being one the
/// encoder pads batches to: BERT's two special tokens around one word piece repeated.
fn bucket_item(encoder: &TextEncoder, length: usize) -> Result<String> {
    if bucket_length(length, encoder.max_length()) != length {
        bail!(
            "--lengths: {length} is not a length altc pads batches to (8, 16, 32, ... up to the maximum, {})",
            encoder.max_length()
        );
    }
    let item = vec!["the"; length.saturating_sub(2).max(1)].join(" ");
    let tokens = encoder.token_count(&item)?;
    if tokens != length {
        bail!("this tokenizer makes {tokens} tokens of the benchmark's {length}-token item (BERT's special tokens and one word piece repeated)");
    }
    Ok(item)
}

/// How `altc bench` times an encoder.
pub struct EncoderBench<'a> {
    pub device: Device,
    pub batch: usize,
    pub lengths: &'a [usize],
    pub variants: &'a [String],
    pub warmup: usize,
    pub repeats: usize,
    pub tune_cache: &'a Path,
}

/// `altc bench` of an encoder spec: sentences/s of one batch of `batch` items of
/// exactly each length (a length batches are padded to), for each variant (`tuned`, `untuned`, `no-opt`), after the
/// warm-up runs (which lower, optimise and compile the bucket's kernels).
pub fn bench_encoder(path: &Path, bench: &EncoderBench) -> Result<()> {
    let loaded = spec::load_encoder(path)?;
    let mut table = format!(
        "{} on {} items a batch ({} warm-up, {} timed runs each)\n{:<8} {:<8} {:>12} {:>12} {:>10}\n",
        loaded.spec.name, bench.batch, bench.warmup, bench.repeats, "length", "variant", "median ms", "sentences/s", "launches"
    );
    for variant in bench.variants {
        let optimise = variant != "no-opt";
        let mut encoder = open_encoder(
            &loaded.spec,
            path,
            bench.device,
            optimise,
            EncoderOutput::Pooled,
        )?;
        let mut backend = open_backend(bench.device, Precision::F32, optimise, None)?;
        if variant == "tuned" && backend.tuning_scope().is_none() {
            eprintln!("note: {} has no kernels to tune", backend.describe());
            continue;
        }
        if variant == "tuned"
            && crate::devices::use_tuned_kernels(backend.as_mut(), bench.tune_cache)? == 0
        {
            eprintln!(
                "note: no tuned kernels for this device in {}: run `altc tune {}` first for a tuned row",
                bench.tune_cache.display(),
                path.display()
            );
            continue;
        }
        backend.load_state(encoder.state())?;
        for &length in bench.lengths {
            let item = bucket_item(&encoder, length)?;
            let items = vec![item.as_str(); bench.batch];
            let mut times = Vec::new();
            let mut launches = None;
            for run in 0..bench.warmup + bench.repeats {
                eprintln!(
                    "{variant}, {length} tokens: run {} of {} ...",
                    run + 1,
                    bench.warmup + bench.repeats
                );
                let start = Instant::now();
                let embedded = encoder.embed(backend.as_mut(), &items, bench.batch, |_| {})?;
                if run >= bench.warmup {
                    times.push(start.elapsed().as_secs_f64());
                }
                launches = embedded.launches;
            }
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            table.push_str(&format!(
                "{length:<8} {variant:<8} {:>12.1} {:>12.2} {:>10}\n",
                median * 1e3,
                bench.batch as f64 / median,
                launches.map_or("-".into(), |n| n.to_string())
            ));
        }
    }
    emit(&table)
}
