//! Helpers shared by the end-to-end tests: running the built `harness`, temporary folders, and a
//! tiny random LLaMA checkpoint (HF layout, byte-level BPE tokenizer) for fast tests.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `harness` binary under test; its folder also holds the workspace's plugin libraries.
pub fn harness() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_harness"));
    c.env_remove("HARNESS_PLUGIN_PATH");
    c
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh empty folder under the target directory, unique to `name`.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = repo_root()
        .join("target")
        .join("test-tmp")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The default model, fetched by `harness fetch` (the README's test command runs it first).
pub fn real_model() -> PathBuf {
    let path = harness_abi::paths::default_model();
    assert!(
        path.is_file(),
        "the default model is missing at {}; run `harness fetch` first",
        path.display()
    );
    path
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("harness runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(
        o.status.success(),
        "command failed: {cmd:?}\nstdout:\n{}\nstderr:\n{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Asserts failure and returns the error text (stderr), which must be a single `error:` line.
pub fn fails(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(
        !o.status.success(),
        "command should fail: {cmd:?}\nstdout:\n{}",
        stdout(&o)
    );
    let err = stderr(&o);
    let errors: Vec<&str> = err.lines().filter(|l| !l.starts_with("warning:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line, got:\n{err}");
    assert!(errors[0].starts_with("error: "), "{err}");
    assert!(
        !err.contains("stack backtrace") && !err.contains("thread '"),
        "{err}"
    );
    errors[0].to_string()
}

/// GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest above 255.
fn byte_symbols() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable.contains(&b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

/// Writes a random LLaMA checkpoint (2 layers, hidden 32, GQA 4/2 heads) with a byte-level
/// tokenizer (one token per byte, digits split) into `dir`, deterministic for a given `seed`.
pub fn write_tiny_model(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let (hidden, inter, layers, heads, kv_heads, vocab) =
        (32usize, 64usize, 2usize, 4usize, 2usize, 257usize);
    let config = serde_json::json!({
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": true,
        "eos_token_id": 256
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();

    let vocab_map: serde_json::Map<String, serde_json::Value> = byte_symbols()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), serde_json::json!(i)))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 256, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab_map, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();

    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut random = |n: usize, scale: f32| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                ((u * 2.0 - 1.0) * scale).to_le_bytes()
            })
            .collect()
    };
    let hd = hidden / heads;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = vec![
        (
            "model.embed_tokens.weight".into(),
            vec![vocab, hidden],
            random(vocab * hidden, 1.0),
        ),
        (
            "model.norm.weight".into(),
            vec![hidden],
            [1f32; 32].iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
    ];
    let ones: Vec<u8> = vec![1f32; hidden]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        let s = 0.3;
        tensors.push((
            format!("{p}.input_layernorm.weight"),
            vec![hidden],
            ones.clone(),
        ));
        tensors.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![hidden],
            ones.clone(),
        ));
        tensors.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![heads * hd, hidden],
            random(heads * hd * hidden, s),
        ));
        tensors.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv_heads * hd, hidden],
            random(kv_heads * hd * hidden, s),
        ));
        tensors.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv_heads * hd, hidden],
            random(kv_heads * hd * hidden, s),
        ));
        tensors.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![hidden, heads * hd],
            random(hidden * heads * hd, s),
        ));
        tensors.push((
            format!("{p}.mlp.gate_proj.weight"),
            vec![inter, hidden],
            random(inter * hidden, s),
        ));
        tensors.push((
            format!("{p}.mlp.up_proj.weight"),
            vec![inter, hidden],
            random(inter * hidden, s),
        ));
        tensors.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![hidden, inter],
            random(hidden * inter, s),
        ));
    }
    let views: HashMap<String, safetensors::tensor::TensorView<'_>> = tensors
        .iter()
        .map(|(name, shape, data)| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(&views, &None, &dir.join("model.safetensors")).unwrap();
}

/// Builds the out-of-workspace plugin in `tests/fixtures/NAME` (`copy-task`, `char-f1`) the way
/// a plugin author would, against harness-abi alone, and returns the folder holding its library.
pub fn build_fixture(name: &str) -> PathBuf {
    let root = repo_root();
    let target = root.join("target").join("fixtures");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(root.join("tests/fixtures").join(name).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the {name} fixture failed");
    target.join("release")
}
