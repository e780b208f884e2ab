//! Rebuilding a `tokenizers::Tokenizer` from the tokenizer stored in GGUF metadata.
//!
//! GGUF keeps the vocabulary (`tokenizer.ggml.tokens`), the BPE merges, the token types and the
//! name of the pre-tokenizer (`tokenizer.ggml.pre`). We translate that into the JSON form of a
//! HF tokenizer and let the tokenizers crate parse it, so the encoding logic is the same code
//! that serves `tokenizer.json` checkpoints. Supported: byte-level BPE (`gpt2`) with the
//! pre-tokenizers `smollm` (every digit on its own, then the GPT-2 split), `gpt2`/`default`
//! and `llama-bpe` (LLaMA 3).

use std::collections::HashMap;
use std::str::FromStr;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};
use tokenizers::Tokenizer;

use crate::error::{BackendError, Result};

const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

fn err(msg: impl Into<String>) -> BackendError {
    BackendError::Tokenizer(msg.into())
}

fn strings(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    let v = md
        .get(key)
        .ok_or_else(|| err(format!("GGUF metadata `{key}` is missing")))?;
    v.to_vec()
        .map_err(|e| err(format!("`{key}`: {e}")))?
        .iter()
        .map(|x| {
            x.to_string()
                .cloned()
                .map_err(|e| err(format!("`{key}`: {e}")))
        })
        .collect()
}

fn id(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    md.get(key).and_then(|v| v.to_u32().ok())
}

/// The tokenizer and the end-of-sequence ids described by GGUF metadata.
pub fn from_metadata(md: &HashMap<String, Value>) -> Result<(Tokenizer, Vec<u32>)> {
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| err("GGUF metadata `tokenizer.ggml.model` is missing"))?;
    if model != "gpt2" {
        return Err(err(format!(
            "GGUF tokenizer model `{model}` is not supported yet (byte-level BPE `gpt2` is); \
             convert the checkpoint to a HF folder with tokenizer.json to use it"
        )));
    }
    let pre = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| "default".into());
    let tokens = strings(md, "tokenizer.ggml.tokens")?;
    let merges = strings(md, "tokenizer.ggml.merges")?;
    check_merges(&tokens, &merges)?;
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| err(format!("`tokenizer.ggml.token_type`: {e}")))?
            .iter()
            .map(|x| x.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let json = tokenizer_json(&pre, &tokens, &merges, &types)?;
    let tokenizer = Tokenizer::from_str(&json.to_string()).map_err(|e| {
        err(format!(
            "cannot build the tokenizer from GGUF metadata: {e}"
        ))
    })?;
    let eos = id(md, "tokenizer.ggml.eos_token_id").into_iter().collect();
    Ok((tokenizer, eos))
}

/// Every merge must be two tokens of the vocabulary separated by one space, whose concatenation
/// is a token too: the tokenizers crate panics on some merges that are not (a concatenation
/// longer than every token), so they are refused here, by entry.
fn check_merges(tokens: &[String], merges: &[String]) -> Result<()> {
    let vocab: std::collections::HashSet<&str> = tokens.iter().map(String::as_str).collect();
    for (i, m) in merges.iter().enumerate() {
        let mut parts = m.split(' ');
        let ok = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => {
                vocab.contains(a) && vocab.contains(b) && vocab.contains(format!("{a}{b}").as_str())
            }
            _ => false,
        };
        if !ok {
            let shown: String = m.chars().take(40).collect();
            return Err(err(format!(
                "GGUF metadata `tokenizer.ggml.merges` entry {i} (`{shown}`) is not two tokens of the vocabulary, separated by one space, that make a token"
            )));
        }
    }
    Ok(())
}

fn pre_tokenizer(pre: &str) -> Result<Json> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    Ok(match pre {
        "smollm" => json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]
        }),
        "gpt2" | "default" => byte_level(true),
        "llama-bpe" | "llama3" => json!({
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
                    "behavior": "Isolated",
                    "invert": false
                },
                byte_level(false),
            ]
        }),
        other => {
            return Err(err(format!(
                "GGUF pre-tokenizer `{other}` is not supported yet (smollm, gpt2, default and llama-bpe are)"
            )))
        }
    })
}

/// The HF `tokenizer.json` equivalent of a GGUF byte-level BPE tokenizer.
fn tokenizer_json(pre: &str, tokens: &[String], merges: &[String], types: &[i32]) -> Result<Json> {
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Json> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(&CONTROL) | Some(&USER_DEFINED)))
        .map(|(i, t)| {
            json!({
                "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": types[i] == CONTROL
            })
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(pre)?,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merge_that_is_not_two_tokens_is_an_error_not_a_panic() {
        let mut md = HashMap::new();
        md.insert(
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        );
        let tokens = ["a", "b", "ab"].map(|t| Value::String(t.into())).to_vec();
        md.insert("tokenizer.ggml.tokens".to_string(), Value::Array(tokens));
        for bad in ["ab", "a b c", " a", "a ", "b a", "a c"] {
            md.insert(
                "tokenizer.ggml.merges".to_string(),
                Value::Array(vec![Value::String(bad.into())]),
            );
            let e = from_metadata(&md).map(|_| ()).unwrap_err().to_string();
            assert!(
                e.contains("entry 0") && e.contains("not two tokens"),
                "{bad}: {e}"
            );
        }
        md.insert(
            "tokenizer.ggml.merges".to_string(),
            Value::Array(vec![Value::String("a b".into())]),
        );
        from_metadata(&md).unwrap();
    }

    #[test]
    fn unknown_pre_tokenizer_is_named() {
        let e = pre_tokenizer("qwen2").unwrap_err().to_string();
        assert!(e.contains("`qwen2` is not supported"), "{e}");
    }

    #[test]
    fn tiny_vocab_builds_and_splits_digits() {
        // Byte-level symbols for "1", "2", " ", "+", and a merge " +".
        let tokens: Vec<String> = ["1", "2", "Ġ", "+", "Ġ+", "<|end|>"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let merges = vec!["Ġ +".to_string()];
        let types = vec![1, 1, 1, 1, 1, CONTROL];
        let json = tokenizer_json("smollm", &tokens, &merges, &types).unwrap();
        let tok = Tokenizer::from_str(&json.to_string()).unwrap();
        let ids = tok.encode("12 +<|end|>", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![0, 1, 4, 5]);
    }
}
