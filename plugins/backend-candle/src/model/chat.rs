//! The model's own chat template: the Jinja text a checkpoint ships (`tokenizer.chat_template`
//! in GGUF metadata, `chat_template` in an HF folder's tokenizer_config.json), rendered with
//! minijinja as transformers' `apply_chat_template(..., add_generation_prompt=True)` renders
//! it: `messages`, `bos_token`, `eos_token`, `add_generation_prompt`, `raise_exception`, and
//! Python's string methods.

use harness_abi::ChatMessage;
use minijinja::{context, Environment, Error, ErrorKind};

use crate::BackendError;

/// A checkpoint's chat template with the special tokens it refers to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    pub source: String,
    pub bos: String,
    pub eos: String,
}

impl ChatTemplate {
    /// `messages` as the model was trained to see a chat, ending where the assistant's reply
    /// starts.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, BackendError> {
        let bad = |e: Error| BackendError::Options(format!("the model's chat template: {e}"));
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", &self.source).map_err(bad)?;
        let messages: Vec<_> = messages
            .iter()
            .map(|m| context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        env.get_template("chat")
            .and_then(|t| {
                t.render(context! {
                    messages => messages,
                    bos_token => self.bos,
                    eos_token => self.eos,
                    add_generation_prompt => true,
                })
            })
            .map_err(bad)
    }
}

/// A `chat_template` value of tokenizer_config.json: the text, or the `default` of a list of
/// named templates.
pub fn from_config_value(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// A special token of tokenizer_config.json: a string or `{"content": ...}`.
pub fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    /// SmolLM2-Instruct's template, as its GGUF carries it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template_renders_as_transformers_does() {
        let t = ChatTemplate {
            source: SMOLLM2.into(),
            bos: "<|im_start|>".into(),
            eos: "<|im_end|>".into(),
        };
        assert_eq!(
            t.render(&[msg("user", "What is 2+2?")]).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let t = ChatTemplate {
            source: "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('must start with user') }}{% endif %}{{ bos_token }}{{ messages[0]['content'].strip() }}".into(),
            bos: "<s>".into(),
            eos: "</s>".into(),
        };
        assert_eq!(t.render(&[msg("user", "  hi  ")]).unwrap(), "<s>hi");
        let e = t.render(&[msg("assistant", "x")]).unwrap_err().to_string();
        assert!(e.contains("must start with user"), "{e}");
        let broken = ChatTemplate {
            source: "{% for %}".into(),
            ..t
        };
        assert!(broken
            .render(&[])
            .unwrap_err()
            .to_string()
            .contains("chat template"));
    }
}
