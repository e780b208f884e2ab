//! Checking a checkpoint's architecture fields against the tensors it holds, before anything
//! is allocated from them: a file's metadata is input, and a head count of 0 or a layer count
//! of 2^30 must be a sentence naming the field, not a division by zero or an abort.

use std::collections::BTreeMap;

use crate::model::llama::Config;

/// The most positions a model may declare: the rotary tables are precomputed for all of them
/// (8 bytes per position and rotary pair), so this bounds that allocation at a few hundred MB.
pub const MAX_POSITIONS: usize = 1 << 21;

/// What each architecture field is called in the checkpoint's own format, for errors.
pub struct FieldNames {
    pub hidden_size: String,
    pub intermediate_size: String,
    pub num_layers: String,
    pub num_heads: String,
    pub num_kv_heads: String,
    pub vocab_size: String,
    pub rms_norm_eps: String,
    pub rope_theta: String,
    pub max_position_embeddings: String,
}

impl FieldNames {
    /// `llama.embedding_length` and the like.
    pub fn gguf(arch: &str) -> Self {
        let f = |k: &str| format!("metadata `{arch}.{k}`");
        FieldNames {
            hidden_size: f("embedding_length"),
            intermediate_size: f("feed_forward_length"),
            num_layers: f("block_count"),
            num_heads: f("attention.head_count"),
            num_kv_heads: f("attention.head_count_kv"),
            vocab_size: "the rows of tensor `token_embd.weight`".into(),
            rms_norm_eps: f("attention.layer_norm_rms_epsilon"),
            rope_theta: f("rope.freq_base"),
            max_position_embeddings: f("context_length"),
        }
    }

    /// config.json's keys.
    pub fn hf() -> Self {
        let f = |k: &str| format!("config.json `{k}`");
        FieldNames {
            hidden_size: f("hidden_size"),
            intermediate_size: f("intermediate_size"),
            num_layers: f("num_hidden_layers"),
            num_heads: f("num_attention_heads"),
            num_kv_heads: f("num_key_value_heads"),
            vocab_size: f("vocab_size"),
            rms_norm_eps: f("rms_norm_eps"),
            rope_theta: f("rope_theta"),
            max_position_embeddings: f("max_position_embeddings"),
        }
    }
}

/// Checks `config` against `shapes` (HF tensor names -> dimensions): every field in range,
/// and every tensor the model will take present with the shape the fields imply.
pub fn check(
    config: &Config,
    shapes: &BTreeMap<String, Vec<usize>>,
    names: &FieldNames,
) -> Result<(), String> {
    let c = config;
    for (field, v) in [
        (&names.hidden_size, c.hidden_size),
        (&names.intermediate_size, c.intermediate_size),
        (&names.num_layers, c.num_layers),
        (&names.num_heads, c.num_heads),
        (&names.num_kv_heads, c.num_kv_heads),
        (&names.vocab_size, c.vocab_size),
        (&names.max_position_embeddings, c.max_position_embeddings),
    ] {
        if v == 0 {
            return Err(format!("{field} is 0"));
        }
    }
    if !c.hidden_size.is_multiple_of(c.num_heads)
        || !(c.hidden_size / c.num_heads).is_multiple_of(2)
    {
        return Err(format!(
            "{} = {} does not split into {} = {} heads of an even size",
            names.hidden_size, c.hidden_size, names.num_heads, c.num_heads
        ));
    }
    if c.num_kv_heads > c.num_heads || !c.num_heads.is_multiple_of(c.num_kv_heads) {
        return Err(format!(
            "{} = {} does not divide {} = {}",
            names.num_kv_heads, c.num_kv_heads, names.num_heads, c.num_heads
        ));
    }
    if c.max_position_embeddings > MAX_POSITIONS {
        return Err(format!(
            "{} = {} is more than the {MAX_POSITIONS} positions this backend supports",
            names.max_position_embeddings, c.max_position_embeddings
        ));
    }
    for (field, v) in [
        (&names.rms_norm_eps, c.rms_norm_eps),
        (&names.rope_theta, c.rope_theta),
    ] {
        if !(v.is_finite() && v > 0.0) {
            return Err(format!("{field} = {v} is not a positive number"));
        }
    }
    let layers = shapes
        .keys()
        .filter_map(|n| {
            n.strip_prefix("model.layers.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |last| last + 1);
    if c.num_layers != layers {
        return Err(format!(
            "{} = {} but the file holds tensors of {layers} layers",
            names.num_layers, c.num_layers
        ));
    }
    let head_dim = c.hidden_size / c.num_heads;
    let kv = c.num_kv_heads * head_dim;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let mut want: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![c.vocab_size, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    if !c.tie_word_embeddings {
        want.push(("lm_head.weight".into(), vec![c.vocab_size, h]));
    }
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            want.push((format!("{p}.{name}"), shape));
        }
    }
    for (name, shape) in want {
        match shapes.get(&name) {
            None => return Err(format!("tensor `{name}` is missing")),
            Some(got) if *got != shape => {
                return Err(format!(
                "tensor `{name}` has shape {got:?}, but the architecture fields make it {shape:?}"
            ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::testing::tiny_weights;

    fn tiny() -> (Config, BTreeMap<String, Vec<usize>>) {
        let (config, weights) = tiny_weights();
        (config, weights.shapes())
    }

    #[test]
    fn the_tiny_model_passes() {
        let (config, shapes) = tiny();
        check(&config, &shapes, &FieldNames::hf()).unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        let (config, shapes) = tiny();
        let gguf = FieldNames::gguf("llama");
        type Spoil = fn(&mut Config);
        let cases: Vec<(Spoil, &str)> = vec![
            (
                |c| c.num_heads = 0,
                "metadata `llama.attention.head_count` is 0",
            ),
            (
                |c| c.num_kv_heads = 3,
                "`llama.attention.head_count_kv` = 3 does not divide",
            ),
            (
                |c| c.num_heads = 3,
                "does not split into metadata `llama.attention.head_count` = 3",
            ),
            (
                |c| c.num_layers = 1 << 30,
                "metadata `llama.block_count` = 1073741824 but the file holds tensors of 2 layers",
            ),
            (
                |c| c.intermediate_size = 7,
                "tensor `model.layers.0.mlp.gate_proj.weight` has shape [128, 64]",
            ),
            (
                |c| c.max_position_embeddings = usize::MAX,
                "more than the 2097152 positions",
            ),
            (
                |c| c.rope_theta = f64::NAN,
                "`llama.rope.freq_base` = NaN is not a positive number",
            ),
            (
                |c| c.tie_word_embeddings = false,
                "tensor `lm_head.weight` is missing",
            ),
        ];
        for (spoil, want) in cases {
            let mut c = config.clone();
            spoil(&mut c);
            let e = check(&c, &shapes, &gguf).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }
}
