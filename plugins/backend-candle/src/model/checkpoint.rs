//! Loading a LLaMA-family checkpoint from a GGUF file or a HF folder into one shape: a
//! [`Config`], f32 [`Weights`] in HF names and layout, and a tokenizer.
//!
//! GGUF tensors of any type candle reads are dequantized to f32 here. llama.cpp's converter
//! permutes the rows of q/k projections for its interleaved rotary layout; we undo that so the
//! model runs rotate-half rotary embeddings on HF-layout weights whatever the source, and a
//! PEFT adapter (trained on HF layout) applies to GGUF weights unchanged.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;

use crate::error::{BackendError, Result};
use crate::model::architecture::{self, FieldNames};
use crate::model::chat::{self, ChatTemplate};
use crate::model::llama::Config;
use crate::model::tokenizer;
use crate::model::weights::{Packing, Weights};
use crate::ops::blocks::{BlockKind, BlockMatrix};

/// Everything needed to build the model and talk to it.
pub struct Checkpoint {
    pub config: Config,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    /// Token ids that end generation.
    pub eos: Vec<u32>,
    pub name: String,
    pub architecture: String,
    pub parameters: u64,
    /// The chat template the checkpoint ships, if any.
    pub chat: Option<ChatTemplate>,
}

/// Loads `path`: a folder is read as a HF checkpoint, a file as GGUF. Each projection is
/// stored as `pack` says as soon as it is read (see [`Weights`]); tensors are read one at a
/// time either way.
pub fn load(path: &Path, device: &Device, pack: Packing) -> Result<Checkpoint> {
    if path.is_dir() {
        load_hf(path, device, pack)
    } else if path.exists() {
        load_gguf(path, device, pack)
    } else {
        Err(BackendError::Io {
            path: path.to_path_buf(),
            cause: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        })
    }
}

/// Whether `path` is a GGUF file with projections in a block kind the backend keeps
/// ([`BlockKind`]), which `base = "gguf"` can hold alone. Reads the header only; false for
/// anything else, a file that does not parse included (loading it reports why).
pub fn has_projection_blocks(path: &Path) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    let mut reader = BufReader::new(f);
    let mut magic = [0u8; 4];
    if reader.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
        return false;
    }
    let Ok(f) = File::open(path) else {
        return false;
    };
    let Ok(content) = gguf_file::Content::read(&mut BufReader::new(f)) else {
        return false;
    };
    content.tensor_infos.iter().any(|(name, info)| {
        hf_name(name).is_some_and(|n| n.ends_with("_proj.weight"))
            && BlockKind::of_gguf(info.ggml_dtype).is_some()
    })
}

/// A checkpoint that cannot be used; the cause's first line only (candle appends a backtrace to
/// its errors when RUST_BACKTRACE is set, and errors are one line).
fn corrupt(path: &Path, cause: impl ToString) -> BackendError {
    let cause = cause.to_string();
    BackendError::Corrupt {
        path: path.to_path_buf(),
        cause: cause.lines().next().unwrap_or("").to_string(),
    }
}

fn load_gguf(path: &Path, device: &Device, pack: Packing) -> Result<Checkpoint> {
    let io = |cause| BackendError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let mut file = BufReader::new(File::open(path).map_err(io)?);
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic)
        .map_err(|_| corrupt(path, "the file is shorter than a GGUF header"))?;
    if &magic != b"GGUF" {
        return Err(corrupt(
            path,
            "not a GGUF file (a model is a .gguf file or a folder with config.json, tokenizer.json and *.safetensors)",
        ));
    }
    let mut file = BufReader::new(File::open(path).map_err(io)?);
    let content = gguf_file::Content::read(&mut file).map_err(|e| corrupt(path, e))?;
    let md = &content.metadata;
    let get = |key: &str| md.get(key);
    let arch = get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| "llama".into());
    if arch != "llama" {
        return Err(BackendError::Checkpoint(format!(
            "architecture `{arch}` is not supported; the candle backend runs LLaMA-family models"
        )));
    }
    let num = |key: &str| -> Result<usize> {
        let v = get(&format!("{arch}.{key}"))
            .ok_or_else(|| corrupt(path, format!("metadata `{arch}.{key}` is missing")))?;
        v.to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .map(|x| x as usize)
            .map_err(|e| corrupt(path, format!("metadata `{arch}.{key}`: {e}")))
    };
    let float = |key: &str, default: f64| -> f64 {
        get(&format!("{arch}.{key}"))
            .and_then(|v| v.to_f32().ok())
            .map(f64::from)
            .unwrap_or(default)
    };
    let vocab_size = {
        let info = content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| corrupt(path, "tensor `token_embd.weight` is missing"))?;
        info.shape.dims()[0]
    };
    let num_heads = num("attention.head_count")?;
    let config = Config {
        hidden_size: num("embedding_length")?,
        intermediate_size: num("feed_forward_length")?,
        num_layers: num("block_count")?,
        num_heads,
        num_kv_heads: num("attention.head_count_kv").unwrap_or(num_heads),
        vocab_size,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta: float("rope.freq_base", 10_000.0),
        max_position_embeddings: num("context_length").unwrap_or(2048),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
    };
    // Checked against the tensors' shapes before any tensor is read or anything allocated.
    let shapes = content
        .tensor_infos
        .iter()
        .filter_map(|(name, info)| Some((hf_name(name)?, info.shape.dims().to_vec())))
        .collect();
    architecture::check(&config, &shapes, &FieldNames::gguf(&arch))
        .map_err(|e| corrupt(path, e))?;
    // Every tensor that will be read must fit in the file, its element count computed without
    // overflow (candle's wraps, and then sizes the dequantized tensor by the true count).
    let file_len = std::fs::metadata(path).map_err(io)?.len();
    for (name, info) in &content.tensor_infos {
        if hf_name(name).is_none() {
            continue;
        }
        let (block, size) = (
            info.ggml_dtype.block_size() as u64,
            info.ggml_dtype.type_size() as u64,
        );
        let bytes = info
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .and_then(|n| (n / block.max(1)).checked_mul(size));
        if bytes.is_none_or(|b| b > file_len) {
            return Err(corrupt(
                path,
                format!(
                    "tensor `{name}` has dimensions {:?}, more data than the file holds",
                    info.shape.dims()
                ),
            ));
        }
    }

    let mut weights = Weights::empty(pack);
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for gguf_name in names {
        let Some(hf_name) = hf_name(&gguf_name) else {
            continue;
        };
        let q = content
            .tensor(&mut file, &gguf_name, device)
            .map_err(|e| corrupt(path, format!("tensor `{gguf_name}`: {e}")))?;
        let mut t = q
            .dequantize(device)
            .map_err(|e| corrupt(path, format!("tensor `{gguf_name}`: {e}")))?;
        let heads = if gguf_name.ends_with("attn_q.weight") {
            Some(config.num_heads)
        } else if gguf_name.ends_with("attn_k.weight") {
            Some(config.num_kv_heads)
        } else {
            None
        };
        if let Some(heads) = heads {
            t = unpermute(&t, heads)?;
        }
        // The blocks stay beside the f32 copy for decoding on the CPU (see `ops::blocks`), or
        // replace it where the packing says so.
        let keep = device.is_cpu()
            && match pack {
                Packing::Nf4 { .. } => pack.blocks_alone(&hf_name),
                Packing::F32 | Packing::Blocks => true,
            };
        let blocks = match (BlockKind::of_gguf(q.dtype()), t.dims2()) {
            (Some(kind), Ok((rows, cols))) if keep => {
                let bytes = q
                    .data()
                    .map_err(|e| corrupt(path, format!("tensor `{gguf_name}`: {e}")))?;
                BlockMatrix::new(kind, rows, cols, bytes.into_owned()).map(|b| match heads {
                    Some(h) => b.permute_rows(&unpermuted_order(rows, h)),
                    None => b,
                })
            }
            _ => None,
        };
        weights.insert(hf_name.clone(), t)?;
        if let Some(blocks) = blocks {
            weights.insert_blocks(hf_name, blocks);
        }
    }
    let parameters = weights.parameter_count();
    let (tokenizer, eos) = tokenizer::from_metadata(md)?;
    let name = get("general.name")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| file_stem(path));
    let chat = gguf_chat_template(md);
    Ok(Checkpoint {
        config,
        weights,
        tokenizer,
        eos,
        name,
        architecture: arch,
        parameters,
        chat,
    })
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// The HF name of a GGUF tensor, or `None` for tensors the model does not use.
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Undoes llama.cpp's q/k row permutation: rows grouped as (heads, 2, head_dim/2) in HF become
/// (heads, head_dim/2, 2) in GGUF.
/// The row order [`unpermute`] gives: row `i` of the HF layout is row `order[i]` of the GGUF.
fn unpermuted_order(rows: usize, heads: usize) -> Vec<usize> {
    let half = rows / heads / 2;
    (0..rows)
        .map(|i| {
            let (h, rest) = (i / (2 * half), i % (2 * half));
            let (two, j) = (rest / half, rest % half);
            h * 2 * half + j * 2 + two
        })
        .collect()
}

fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    Ok(w.reshape((heads, half, 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?
        .contiguous()?)
}

/// `config.json` of a HF LLaMA checkpoint (the fields we use).
#[derive(serde::Deserialize)]
struct HfConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default = "default_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    model_type: Option<String>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_positions() -> usize {
    2048
}

fn load_hf(dir: &Path, device: &Device, pack: Packing) -> Result<Checkpoint> {
    let read = |name: &str| -> Result<(PathBuf, String)> {
        let p = dir.join(name);
        let text = std::fs::read_to_string(&p).map_err(|cause| BackendError::Io {
            path: p.clone(),
            cause,
        })?;
        Ok((p, text))
    };
    let (cfg_path, cfg_text) = read("config.json")?;
    let hf: HfConfig = serde_json::from_str(&cfg_text).map_err(|e| corrupt(&cfg_path, e))?;
    let arch = hf.model_type.clone().unwrap_or_else(|| "llama".into());
    if !matches!(arch.as_str(), "llama" | "mistral") {
        return Err(BackendError::Checkpoint(format!(
            "architecture `{arch}` is not supported; the candle backend runs LLaMA-family models"
        )));
    }
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| corrupt(&tok_path, e))?;

    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|cause| BackendError::Io {
            path: dir.to_path_buf(),
            cause,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(corrupt(dir, "the folder has no *.safetensors file"));
    }
    // SAFETY: each file is mapped read-only and only read while `mapped` lives; a checkpoint
    // changed on disk meanwhile is outside what any loader can guard against.
    let mapped = files
        .iter()
        .map(|f| {
            unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }
                .map_err(|e| corrupt(f, e))
        })
        .collect::<Result<Vec<_>>>()?;
    let shapes = mapped
        .iter()
        .flat_map(|m| m.tensors())
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect();
    let num_heads = hf.num_attention_heads;
    let config = Config {
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        num_layers: hf.num_hidden_layers,
        num_heads,
        num_kv_heads: hf.num_key_value_heads.unwrap_or(num_heads),
        vocab_size: hf.vocab_size,
        rms_norm_eps: hf.rms_norm_eps,
        rope_theta: hf.rope_theta,
        max_position_embeddings: hf.max_position_embeddings,
        tie_word_embeddings: hf.tie_word_embeddings,
    };
    // Checked against the tensors' shapes before any tensor is read.
    architecture::check(&config, &shapes, &FieldNames::hf()).map_err(|e| corrupt(&cfg_path, e))?;
    let mut weights = Weights::empty(pack);
    for (m, f) in mapped.iter().zip(&files) {
        let mut names: Vec<String> = m.tensors().into_iter().map(|(n, _)| n).collect();
        names.sort();
        for name in names {
            let t = m.load(&name, device).map_err(|e| corrupt(f, e))?;
            weights.insert(name, t.to_dtype(DType::F32)?)?;
        }
    }
    let parameters = weights.parameter_count();
    let eos = match &hf.eos_token_id {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    };
    Ok(Checkpoint {
        config,
        weights,
        tokenizer,
        eos,
        name: dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
        architecture: arch,
        parameters,
        chat: hf_chat_template(dir),
    })
}

/// `tokenizer.chat_template` of GGUF metadata, with the text of its BOS and EOS tokens.
fn gguf_chat_template(
    md: &std::collections::HashMap<String, gguf_file::Value>,
) -> Option<ChatTemplate> {
    let source = md.get("tokenizer.chat_template")?.to_string().ok()?.clone();
    let tokens = md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok());
    let token = |key: &str| -> String {
        let id = md.get(key).and_then(|v| v.to_u32().ok());
        match (id, tokens) {
            (Some(id), Some(t)) => t
                .get(id as usize)
                .and_then(|v| v.to_string().ok())
                .cloned()
                .unwrap_or_default(),
            _ => String::new(),
        }
    };
    Some(ChatTemplate {
        bos: token("tokenizer.ggml.bos_token_id"),
        eos: token("tokenizer.ggml.eos_token_id"),
        source,
    })
}

/// `chat_template` of an HF folder's tokenizer_config.json (absent or unreadable: none).
fn hf_chat_template(dir: &Path) -> Option<ChatTemplate> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(ChatTemplate {
        source: chat::from_config_value(config.get("chat_template")?)?,
        bos: chat::token_text(config.get("bos_token")),
        eos: chat::token_text(config.get("eos_token")),
    })
}

/// Tiny GGUF files for tests.
#[cfg(test)]
pub mod testing {
    use super::*;

    /// Writes the tiny test model as a GGUF file whose metadata says `fields` (key, value).
    pub fn tiny_gguf(path: &Path, fields: &[(&str, u32)]) {
        tiny_gguf_with(path, fields, candle_core::quantized::GgmlDType::F32)
    }

    /// The tiny model as a valid GGUF with its projections stored as `projections`.
    pub fn tiny_gguf_of(path: &Path, projections: candle_core::quantized::GgmlDType) {
        tiny_gguf_with(path, &FIELDS, projections)
    }

    /// The metadata of a valid tiny GGUF.
    pub const FIELDS: [(&str, u32); 6] = [
        ("embedding_length", 64),
        ("feed_forward_length", 128),
        ("block_count", 2),
        ("attention.head_count", 4),
        ("attention.head_count_kv", 2),
        ("context_length", 64),
    ];

    /// [`tiny_gguf`] with the projections stored as `projections`.
    pub fn tiny_gguf_with(
        path: &Path,
        fields: &[(&str, u32)],
        projections: candle_core::quantized::GgmlDType,
    ) {
        use candle_core::quantized::{GgmlDType, QTensor};
        let (_, weights) = crate::model::llama::testing::tiny_weights();
        let gguf_name = |hf: &str| -> String {
            let names = [
                ("model.embed_tokens.weight", "token_embd.weight"),
                ("model.norm.weight", "output_norm.weight"),
            ];
            if let Some((_, g)) = names.iter().find(|(h, _)| *h == hf) {
                return g.to_string();
            }
            let rest = hf.strip_prefix("model.layers.").unwrap();
            let (layer, part) = rest.split_once('.').unwrap();
            let part = match part {
                "input_layernorm.weight" => "attn_norm.weight",
                "post_attention_layernorm.weight" => "ffn_norm.weight",
                "self_attn.q_proj.weight" => "attn_q.weight",
                "self_attn.k_proj.weight" => "attn_k.weight",
                "self_attn.v_proj.weight" => "attn_v.weight",
                "self_attn.o_proj.weight" => "attn_output.weight",
                "mlp.gate_proj.weight" => "ffn_gate.weight",
                "mlp.up_proj.weight" => "ffn_up.weight",
                "mlp.down_proj.weight" => "ffn_down.weight",
                other => panic!("{other}"),
            };
            format!("blk.{layer}.{part}")
        };
        let mut weights = weights;
        let tensors: Vec<(String, QTensor)> = weights
            .shapes()
            .keys()
            .map(|n| {
                let t = weights.take(n).unwrap();
                let dtype = if n.ends_with("_proj.weight") {
                    projections
                } else {
                    GgmlDType::F32
                };
                (gguf_name(n), QTensor::quantize(&t, dtype).unwrap())
            })
            .collect();
        let arch = gguf_file::Value::String("llama".into());
        let values: Vec<(String, gguf_file::Value)> = fields
            .iter()
            .map(|(k, v)| (format!("llama.{k}"), gguf_file::Value::U32(*v)))
            .collect();
        let mut metadata: Vec<(&str, &gguf_file::Value)> = vec![("general.architecture", &arch)];
        metadata.extend(values.iter().map(|(k, v)| (k.as_str(), v)));
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut f = File::create(path).unwrap();
        gguf_file::write(&mut f, &metadata, &tensor_refs).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn gguf_metadata_out_of_range_is_an_error_naming_the_field_before_any_allocation() {
        let dir = std::env::temp_dir().join(format!("gguf-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = FIELDS;
        for (key, value, want) in [
            (
                "attention.head_count",
                0,
                "metadata `llama.attention.head_count` is 0",
            ),
            (
                "block_count",
                1 << 30,
                "metadata `llama.block_count` = 1073741824 but the file holds tensors of 2 layers",
            ),
            (
                "embedding_length",
                96,
                "tensor `model.embed_tokens.weight` has shape [50, 64]",
            ),
        ] {
            let fields: Vec<(&str, u32)> = good
                .iter()
                .map(|&(k, v)| (k, if k == key { value } else { v }))
                .collect();
            let path = dir.join(format!("{}.gguf", key.replace('.', "-")));
            tiny_gguf(&path, &fields);
            let e = match load(&path, &Device::Cpu, Packing::F32) {
                Ok(_) => panic!("{key} = {value} loaded"),
                Err(e) => e.to_string(),
            };
            assert!(
                e.contains(want) && e.contains("not a usable checkpoint"),
                "{e}"
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn only_a_gguf_of_kept_block_kinds_can_hold_its_projections_in_blocks() {
        use candle_core::quantized::GgmlDType;
        let dir = std::env::temp_dir().join(format!("gguf-blocks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (dtype, want) in [
            (GgmlDType::Q4_1, true),
            (GgmlDType::Q8_0, true),
            (GgmlDType::F32, false),
        ] {
            let path = dir.join(format!("{dtype:?}.gguf"));
            tiny_gguf_of(&path, dtype);
            assert_eq!(has_projection_blocks(&path), want, "{dtype:?}");
        }
        std::fs::write(dir.join("junk.gguf"), b"GGUF and then nothing").unwrap();
        assert!(!has_projection_blocks(&dir.join("junk.gguf")));
        assert!(!has_projection_blocks(&dir.join("missing.gguf")));
        assert!(!has_projection_blocks(&dir));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, half, in).swapaxes(1, 2).reshape(out, in)
        let (heads, half, inp) = (3usize, 2usize, 4usize);
        let out = heads * 2 * half;
        let hf = Tensor::arange(0f32, (out * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((out, inp))
            .unwrap();
        let gguf = hf
            .reshape((heads, 2, half, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((out, inp))
            .unwrap();
        let back = unpermute(&gguf, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        // The same permutation as a row order, as the kept blocks are reordered.
        let rows = gguf.to_vec2::<f32>().unwrap();
        let reordered: Vec<Vec<f32>> = unpermuted_order(out, heads)
            .into_iter()
            .map(|r| rows[r].clone())
            .collect();
        assert_eq!(reordered, hf.to_vec2::<f32>().unwrap());
    }
}
