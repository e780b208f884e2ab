//! LoRA adapters in PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`), merged
//! into the f32 base weights for inference: `W += (alpha / r) * B A`.
//!
//! Key names follow PEFT: `base_model.model.<module>.lora_A.weight` with A of shape (r, in) and B
//! of shape (out, r), module names as in HF LLaMA checkpoints (`model.layers.0.self_attn.q_proj`).
//! Because GGUF q/k weights are brought to HF layout at load, an adapter trained by PEFT on the HF
//! model applies to a GGUF checkpoint unchanged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{BackendError, Result};
use crate::model::weights::Weights;
use crate::train::qlora::TrainBase;

/// The fields of `adapter_config.json` we act on.
#[derive(Debug, serde::Deserialize)]
struct AdapterConfig {
    #[serde(default = "lora")]
    peft_type: String,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

fn lora() -> String {
    "LORA".into()
}

/// A loaded adapter: for each adapted weight, its A and B.
pub struct LoraAdapter {
    pub dir: PathBuf,
    pub r: usize,
    pub scale: f64,
    /// HF weight name (`model.layers.0.self_attn.q_proj.weight`) -> (A, B).
    pub pairs: BTreeMap<String, (Tensor, Tensor)>,
}

fn bad(dir: &Path, why: impl std::fmt::Display) -> BackendError {
    BackendError::Checkpoint(format!("adapter {}: {why}", dir.display()))
}

impl LoraAdapter {
    /// Reads a PEFT LoRA adapter folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|cause| BackendError::Io {
            path: cfg_path.clone(),
            cause,
        })?;
        let cfg: AdapterConfig = serde_json::from_str(&text)
            .map_err(|e| bad(dir, format!("adapter_config.json: {e}")))?;
        if cfg.peft_type != "LORA" {
            return Err(bad(
                dir,
                format!("peft_type `{}` is not LORA", cfg.peft_type),
            ));
        }
        if cfg.use_dora || cfg.fan_in_fan_out {
            return Err(bad(
                dir,
                "DoRA and fan_in_fan_out adapters are not supported",
            ));
        }
        if cfg.bias.as_deref().is_some_and(|b| b != "none") {
            return Err(bad(dir, "adapters that train biases are not supported"));
        }
        if !cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty() {
            return Err(bad(
                dir,
                "per-module rank_pattern/alpha_pattern is not supported",
            ));
        }
        if cfg.r == 0 {
            return Err(bad(dir, "r must be at least 1"));
        }
        let scale = if cfg.use_rslora {
            cfg.lora_alpha / (cfg.r as f64).sqrt()
        } else {
            cfg.lora_alpha / cfg.r as f64
        };
        let st = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&st, device)
            .map_err(|e| bad(dir, format!("adapter_model.safetensors: {e}")))?;
        let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (key, t) in tensors {
            let Some((module, which)) = split_key(&key) else {
                return Err(bad(dir, format!("unexpected tensor `{key}`")));
            };
            let entry = halves.entry(format!("{module}.weight")).or_default();
            let t = t.to_dtype(DType::F32)?;
            if which == 'A' {
                entry.0 = Some(t);
            } else {
                entry.1 = Some(t);
            }
        }
        let mut pairs = BTreeMap::new();
        for (name, (a, b)) in halves {
            match (a, b) {
                (Some(a), Some(b)) => {
                    let (ra, _) = a.dims2()?;
                    let (_, rb) = b.dims2()?;
                    if ra != cfg.r || rb != cfg.r {
                        return Err(bad(
                            dir,
                            format!("`{name}` has rank {ra}/{rb}, config says r = {}", cfg.r),
                        ));
                    }
                    pairs.insert(name, (a, b));
                }
                _ => return Err(bad(dir, format!("`{name}` lacks lora_A or lora_B"))),
            }
        }
        if pairs.is_empty() {
            return Err(bad(dir, "no LoRA weights found"));
        }
        Ok(LoraAdapter {
            dir: dir.to_path_buf(),
            r: cfg.r,
            scale,
            pairs,
        })
    }

    /// Adds `scale * B A` to every adapted base weight.
    pub fn merge_into(&self, weights: &mut Weights) -> Result<()> {
        for (name, (a, b)) in &self.pairs {
            let w = weights.take(name).map_err(|_| {
                bad(
                    &self.dir,
                    format!("the model has no weight `{name}` to adapt"),
                )
            })?;
            let delta = (b.matmul(a)? * self.scale)?;
            if delta.dims() != w.dims() {
                return Err(bad(
                    &self.dir,
                    format!(
                        "`{name}` is {:?} in the model but {:?} in the adapter",
                        w.dims(),
                        delta.dims()
                    ),
                ));
            }
            weights.insert(name.clone(), (w + delta)?)?;
        }
        Ok(())
    }
}

/// How an adapter was made, for its `adapter_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
    pub base_model: String,
    /// The frozen base it was trained over, which evaluation should merge it into.
    pub trained_on: TrainBase,
}

/// The safetensors metadata key that records [`AdapterSpec::trained_on`] (PEFT ignores it).
const TRAINED_ON_KEY: &str = "harness.trained_on";

/// The base an adapter saved here was trained over, from its safetensors metadata: `None` for
/// adapters that do not say (PEFT's, older ones) or cannot be read (loading reports that).
pub fn trained_on(dir: &Path) -> Option<TrainBase> {
    use std::io::Read;
    let mut f = std::fs::File::open(dir.join("adapter_model.safetensors")).ok()?;
    let size = f.metadata().ok()?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    // A header longer than the file (or than any real one) is not read into memory.
    if len > size.saturating_sub(8) || len > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&header).ok()?;
    match header.get("__metadata__")?.get(TRAINED_ON_KEY)?.as_str()? {
        "gguf" => Some(TrainBase::Gguf),
        "nf4" => Some(TrainBase::Nf4),
        _ => None,
    }
}

/// Writes adapter parameters (named `model.layers.0.self_attn.q_proj.lora_A.weight`, ...) in
/// PEFT's layout, loadable by `PeftModel.from_pretrained` and by [`LoraAdapter::load`].
pub fn save_peft(
    dir: &Path,
    spec: &AdapterSpec,
    params: &[(String, candle_core::Var)],
) -> Result<()> {
    let io = |path: PathBuf| move |cause| BackendError::Io { path, cause };
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": spec.base_model,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": spec.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    let text =
        serde_json::to_string_pretty(&config).map_err(|e| BackendError::Internal(e.to_string()))?;
    write_then_rename(&dir.join("adapter_config.json"), text.as_bytes())?;

    let tensors: Vec<(String, Tensor)> = params
        .iter()
        .map(|(name, var)| (format!("base_model.model.{name}"), var.as_tensor().clone()))
        .collect();
    let meta = [
        ("format".to_string(), "pt".to_string()),
        (
            TRAINED_ON_KEY.to_string(),
            spec.trained_on.name().to_string(),
        ),
    ];
    write_tensors(&dir.join("adapter_model.safetensors"), &tensors, &meta)
}

/// Writes f32 tensors and string metadata as a safetensors file, atomically.
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    meta: &[(String, String)],
) -> Result<()> {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let bytes: Vec<u8> = t
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            Ok((name.clone(), t.dims().to_vec(), bytes))
        })
        .collect::<Result<_>>()?;
    let views = data
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| BackendError::Internal(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some(
        meta.iter()
            .cloned()
            .collect::<std::collections::HashMap<_, _>>(),
    );
    let mut bytes = safetensors::serialize(views, &metadata)
        .map_err(|e| BackendError::Internal(e.to_string()))?;
    sort_metadata(&mut bytes);
    write_then_rename(path, &bytes)
}

/// safetensors writes its metadata map in hash order, so with more than one entry the same
/// tensors would be different bytes from one save to the next. Rewrites the map in key order,
/// in place (the same entries, so the same length).
fn sort_metadata(bytes: &mut [u8]) {
    let Some(len) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    else {
        return;
    };
    let Some(header) = bytes.get_mut(8..8 + len as usize) else {
        return;
    };
    let Ok(text) = std::str::from_utf8(header) else {
        return;
    };
    const KEY: &str = "\"__metadata__\":";
    let Some(open) = text.find(KEY).map(|at| at + KEY.len()) else {
        return;
    };
    // The values are plain strings without braces (the ones written here), so the map ends at
    // the first closing brace; anything else is left as it is.
    let Some(close) = text[open..].find('}').map(|at| open + at) else {
        return;
    };
    let Ok(map) = serde_json::from_str::<BTreeMap<String, String>>(&text[open..=close]) else {
        return;
    };
    if let Ok(sorted) = serde_json::to_string(&map) {
        if sorted.len() == close + 1 - open {
            header[open..=close].copy_from_slice(sorted.as_bytes());
        }
    }
}

/// Writes to a temporary name and renames, so a half-written adapter never exists.
fn write_then_rename(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|cause| BackendError::Io {
        path: tmp.clone(),
        cause,
    })?;
    std::fs::rename(&tmp, path).map_err(|cause| BackendError::Io {
        path: path.to_path_buf(),
        cause,
    })
}

/// `base_model.model.model.layers.0.mlp.down_proj.lora_A.weight` -> (`model.layers.0.mlp.down_proj`, 'A').
/// Also accepts the adapter-name form `lora_A.default.weight`.
fn split_key(key: &str) -> Option<(&str, char)> {
    let key = key.strip_prefix("base_model.model.").unwrap_or(key);
    for (marker, which) in [(".lora_A.", 'A'), (".lora_B.", 'B')] {
        if let Some(at) = key.find(marker) {
            let rest = &key[at + marker.len()..];
            if rest == "weight" || rest.ends_with(".weight") {
                return Some((&key[..at], which));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_keys_map_to_hf_weights() {
        assert_eq!(
            split_key("base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"),
            Some(("model.layers.3.self_attn.q_proj", 'B'))
        );
        assert_eq!(
            split_key("base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"),
            Some(("model.layers.0.mlp.up_proj", 'A'))
        );
        assert_eq!(split_key("base_model.model.lm_head.weight"), None);
    }

    #[test]
    fn a_saved_adapter_merged_into_the_base_gives_the_adapted_model() {
        use crate::model::llama::testing::{tiny_model, tiny_weights, uniform};
        use crate::model::llama::{KvCache, TARGETS};

        let mut adapted = tiny_model();
        let params = adapted.add_lora(&TARGETS[..3], 4, 8.0, 0.1, 5).unwrap();
        for (i, (_, var)) in params.iter().enumerate() {
            let n = var.as_tensor().elem_count();
            let v = Tensor::from_vec(
                uniform(n, 0.2, 40 + i as u64),
                var.as_tensor().shape(),
                &Device::Cpu,
            )
            .unwrap();
            var.set(&v).unwrap();
        }
        let ids = vec![vec![4u32, 9, 33, 2, 17]];
        let logits = |m: &crate::model::llama::Llama| {
            let h = m
                .forward(&ids, &[0], None, &mut KvCache::default())
                .unwrap();
            m.logits(&h.reshape((5, 64)).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let want = logits(&adapted);

        let dir = std::env::temp_dir().join(format!("adapter-roundtrip-{}", std::process::id()));
        let spec = AdapterSpec {
            r: 4,
            alpha: 8.0,
            dropout: 0.1,
            target_modules: TARGETS[..3].iter().map(|s| s.to_string()).collect(),
            base_model: "tiny".into(),
            trained_on: TrainBase::Gguf,
        };
        assert_eq!(trained_on(&dir), None, "no adapter yet");
        save_peft(&dir, &spec, &params).unwrap();
        assert_eq!(trained_on(&dir), Some(TrainBase::Gguf));
        // The same adapter is the same bytes, whatever order the metadata map iterates in.
        let first = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        for _ in 0..8 {
            save_peft(&dir, &spec, &params).unwrap();
            let again = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
            assert!(first == again, "a second save wrote other bytes");
        }
        let adapter = LoraAdapter::load(&dir, &Device::Cpu).unwrap();
        assert_eq!(adapter.pairs.len(), 2 * 3);
        let (config, mut weights) = tiny_weights();
        adapter.merge_into(&mut weights).unwrap();
        let merged = crate::model::llama::Llama::new(config, &mut weights, &Device::Cpu).unwrap();
        let got = logits(&merged);
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() < 1e-3 * (1.0 + a.abs()), "{a} vs {b}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
