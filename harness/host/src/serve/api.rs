//! The OpenAI-compatible API's requests and responses as `harness serve` reads and writes them:
//! what is accepted (a text prompt or a list of them, `max_tokens`, `stop`, `echo`,
//! `logprobs`; chat `messages`), what is refused with a reason, and the JSON answered.

use harness_abi::{ChatMessage, Prompt, PromptToken};
use serde::Deserialize;
use serde_json::{json, Value};

/// An error answered to the client: the HTTP status and a one-line message.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
        }
    }

    pub fn body(&self) -> Value {
        let kind = match self.status {
            400 | 413 => "invalid_request_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            _ => "server_error",
        };
        json!({"error": {"message": self.message, "type": kind, "code": self.status}})
    }
}

/// What a request asks the model.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    Completion {
        prompts: Vec<Prompt>,
        max_tokens: u32,
        stop: Vec<String>,
        echo: bool,
        /// How many alternatives per token (`logprobs`), if log-probabilities are asked for.
        logprobs: Option<u32>,
    },
    Chat {
        messages: Vec<ChatMessage>,
        max_tokens: u32,
        stop: Vec<String>,
    },
    /// `/tokenize`: the token ids of a text.
    Tokenize(String),
    /// `/detokenize`: the text of token ids.
    Detokenize(Vec<u32>),
    /// `/tokenizer_info`: special tokens and the chat template.
    TokenizerInfo,
}

impl Work {
    /// How many sequences the request decodes (what a batch is counted in).
    pub fn size(&self) -> usize {
        match self {
            Work::Completion { prompts, .. } => prompts.len(),
            Work::Chat { .. } => 1,
            _ => 0,
        }
    }
}

/// The most alternatives per token a request may ask for (OpenAI's own limit).
const MAX_LOGPROBS: u32 = 20;
/// The most prompts one completions request may carry.
const MAX_PROMPTS: usize = 256;
/// `max_tokens` when a request leaves it out (OpenAI's completions default).
const DEFAULT_MAX_TOKENS: u32 = 16;
/// The most tokens one request may ask to generate.
const MAX_TOKENS: u32 = 4096;

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct CompletionBody {
    model: Option<String>,
    prompt: Value,
    max_tokens: Option<u32>,
    stop: Option<OneOrMany>,
    #[serde(default)]
    echo: bool,
    logprobs: Option<u32>,
    n: Option<u32>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Value,
}

#[derive(Deserialize)]
struct ChatBody {
    model: Option<String>,
    messages: Vec<Message>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stop: Option<OneOrMany>,
    n: Option<u32>,
    logprobs: Option<bool>,
}

fn stops(stop: Option<OneOrMany>) -> Result<Vec<String>, ApiError> {
    let list = match stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if list.iter().any(String::is_empty) {
        return Err(ApiError::bad("`stop` strings must not be empty"));
    }
    Ok(list)
}

fn check_common(
    model: Option<&str>,
    served: &str,
    n: Option<u32>,
    max: u32,
) -> Result<(), ApiError> {
    if let Some(m) = model {
        if m != served {
            return Err(ApiError {
                status: 404,
                message: format!("model `{m}` is not served here; this server serves `{served}`"),
            });
        }
    }
    if n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad(
            "only `n: 1` is supported (decoding is greedy)",
        ));
    }
    if max > MAX_TOKENS {
        return Err(ApiError::bad(format!(
            "`max_tokens` is at most {MAX_TOKENS}"
        )));
    }
    Ok(())
}

/// A `/v1/completions` body.
pub fn completion(body: &[u8], served: &str) -> Result<Work, ApiError> {
    let b: CompletionBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("not a completions request: {e}")))?;
    let max_tokens = b.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    check_common(b.model.as_deref(), served, b.n, max_tokens)?;
    let ids = |v: &Vec<Value>| -> Option<Vec<u32>> {
        v.iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    let bad_prompt = || {
        ApiError::bad("`prompt` must be a string, a list of strings, a list of token ids, or a list of such lists")
    };
    let prompts: Vec<Prompt> = match b.prompt {
        Value::String(s) => vec![Prompt::Text(s.into())],
        Value::Array(items) if items.iter().all(|x| x.is_number()) && !items.is_empty() => {
            vec![Prompt::Tokens(ids(&items).ok_or_else(bad_prompt)?.into())]
        }
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => out.push(Prompt::Text(s.into())),
                    Value::Array(v) => {
                        out.push(Prompt::Tokens(ids(&v).ok_or_else(bad_prompt)?.into()))
                    }
                    _ => return Err(bad_prompt()),
                }
            }
            out
        }
        _ => return Err(bad_prompt()),
    };
    if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
        return Err(ApiError::bad(format!(
            "`prompt` must hold 1 to {MAX_PROMPTS} prompts"
        )));
    }
    if prompts.iter().any(|p| match p {
        Prompt::Text(t) => t.is_empty(),
        Prompt::Tokens(t) => t.is_empty(),
    }) {
        return Err(ApiError::bad("a prompt is empty"));
    }
    if let Some(l) = b.logprobs {
        if l > MAX_LOGPROBS {
            return Err(ApiError::bad(format!(
                "`logprobs` is at most {MAX_LOGPROBS}"
            )));
        }
    }
    if max_tokens == 0 && !b.echo {
        return Err(ApiError::bad(
            "`max_tokens: 0` needs `echo: true` (scoring the prompt)",
        ));
    }
    Ok(Work::Completion {
        prompts,
        max_tokens,
        stop: stops(b.stop)?,
        echo: b.echo,
        logprobs: b.logprobs,
    })
}

/// A `/v1/chat/completions` body.
pub fn chat(body: &[u8], served: &str) -> Result<Work, ApiError> {
    let b: ChatBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("not a chat completions request: {e}")))?;
    let max_tokens = b
        .max_completion_tokens
        .or(b.max_tokens)
        .unwrap_or(MAX_TOKENS.min(512));
    check_common(b.model.as_deref(), served, b.n, max_tokens)?;
    if b.logprobs == Some(true) {
        return Err(ApiError::bad(
            "chat `logprobs` are not supported; use /v1/completions",
        ));
    }
    if b.messages.is_empty() {
        return Err(ApiError::bad("`messages` is empty"));
    }
    let mut messages = Vec::with_capacity(b.messages.len());
    for m in b.messages {
        let content = match m.content {
            Value::String(s) => s,
            // The content-parts form: the text parts joined.
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
                .collect::<Vec<_>>()
                .join(""),
            _ => return Err(ApiError::bad("a message's `content` must be text")),
        };
        messages.push(ChatMessage {
            role: m.role.into(),
            content: content.into(),
        });
    }
    Ok(Work::Chat {
        messages,
        max_tokens,
        stop: stops(b.stop)?,
    })
}

/// A `/tokenize` body: `{"prompt": text}` (vLLM's form, which lm-evaluation-harness's remote
/// tokenizer sends).
pub fn tokenize(body: &[u8]) -> Result<Work, ApiError> {
    #[derive(Deserialize)]
    struct B {
        prompt: String,
    }
    let b: B = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("not a tokenize request: {e}")))?;
    Ok(Work::Tokenize(b.prompt))
}

/// A `/detokenize` body: `{"tokens": [ids]}`.
pub fn detokenize(body: &[u8]) -> Result<Work, ApiError> {
    #[derive(Deserialize)]
    struct B {
        tokens: Vec<u32>,
    }
    let b: B = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("not a detokenize request: {e}")))?;
    Ok(Work::Detokenize(b.tokens))
}

/// The `logprobs` object of a completion choice from the scored tokens of its text; `from`
/// (bytes) drops the tokens before it (the prompt, without `echo`). Offsets are characters.
pub fn logprobs_object(tokens: &[PromptToken], text: &str, from: usize) -> Value {
    let kept: Vec<&PromptToken> = tokens
        .iter()
        .filter(|t| t.offset as usize >= from)
        .collect();
    let chars_before = |byte: usize| text.get(..byte).map_or(0, |s| s.chars().count());
    json!({
        "tokens": kept.iter().map(|t| t.text.as_str()).collect::<Vec<_>>(),
        "token_logprobs": kept.iter().map(|t| t.logprob.into_option()).collect::<Vec<_>>(),
        "top_logprobs": kept.iter().map(|t| {
            if t.logprob.is_none() {
                Value::Null
            } else {
                let mut m = serde_json::Map::new();
                for alt in t.top.iter() {
                    m.entry(alt.text.to_string()).or_insert(json!(alt.logprob));
                }
                Value::Object(m)
            }
        }).collect::<Vec<_>>(),
        "text_offset": kept.iter().map(|t| chars_before(t.offset as usize)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_bodies_are_read_or_refused_with_a_reason() {
        let w = completion(br#"{"prompt": "2+2=", "max_tokens": 3, "stop": "\n"}"#, "m").unwrap();
        assert_eq!(
            w,
            Work::Completion {
                prompts: vec![Prompt::Text("2+2=".into())],
                max_tokens: 3,
                stop: vec!["\n".into()],
                echo: false,
                logprobs: None
            }
        );
        let scoring = completion(br#"{"model": "m", "prompt": ["a", "b"], "max_tokens": 0, "echo": true, "logprobs": 1}"#, "m").unwrap();
        assert_eq!(scoring.size(), 2);
        let refused = |body: &str| completion(body.as_bytes(), "m").unwrap_err();
        assert_eq!(refused(r#"{"model": "x", "prompt": "a"}"#).status, 404);
        let ids = completion(
            br#"{"prompt": [[1, 2], [3]], "max_tokens": 1, "echo": true, "logprobs": 1}"#,
            "m",
        )
        .unwrap();
        assert_eq!(ids.size(), 2);
        assert!(refused(r#"{"prompt": [[1, -2]]}"#)
            .message
            .contains("token ids"));
        assert!(refused(r#"{"prompt": {"a": 1}}"#)
            .message
            .contains("token ids"));
        assert!(refused(r#"{"prompt": "a", "max_tokens": 0}"#)
            .message
            .contains("echo"));
        assert!(refused(r#"{"prompt": "a", "n": 2}"#)
            .message
            .contains("n: 1"));
        assert!(refused(r#"{"prompt": "a", "logprobs": 99}"#)
            .message
            .contains("at most 20"));
        assert!(refused(r#"{"prompt": ""}"#).message.contains("empty"));
        assert!(refused("not json")
            .message
            .starts_with("not a completions request"));
    }

    #[test]
    fn chat_bodies_take_text_or_text_parts() {
        let w = chat(
            br#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 5}"#,
            "m",
        )
        .unwrap();
        let Work::Chat {
            messages,
            max_tokens,
            ..
        } = w
        else {
            panic!()
        };
        assert_eq!(messages[1].content.as_str(), "Hi");
        assert_eq!(max_tokens, 5);
        assert!(chat(br#"{"messages": []}"#, "m")
            .unwrap_err()
            .message
            .contains("empty"));
    }
}
