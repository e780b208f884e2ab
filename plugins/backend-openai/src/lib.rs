//! The `openai` backend plugin: any OpenAI-compatible server answers the harness's requests
//! (vLLM, llama.cpp's server, `harness serve`, a hosted API). Generation goes to the
//! completions or chat endpoint (greedy: temperature 0); multiple-choice scoring reads the
//! prompt's log-probabilities (`echo` + `logprobs` on the completions endpoint), and says so
//! clearly where a server does not give them. Requests of a batch run `concurrency` at a time,
//! are retried with backoff on 429/5xx, and are cached on disk by request ([`client`]).
//!
//! The API key is read from the environment variable named by `api_key_env` when the backend
//! is created; only the variable's name is an option, so the key reaches no run folder, log or
//! error message.

pub mod client;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use harness_abi::sdk::{
    BackendPlugin, BackendStats, ChoiceRequest, ChoiceScore, GenerateRequest, Generation,
    ModelInfo, NoOptions, TokenLogprob,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use client::Client;

/// Which endpoint generation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Endpoint {
    /// `/completions`: the prompt as is (what base models and the paper's prompts need).
    Completions,
    /// `/chat/completions`: the prompt as one user message, templated by the server.
    Chat,
}

/// The backend's options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Options {
    /// The API's base URL, up to and including `/v1` (default: $OPENAI_BASE_URL).
    pub base_url: Option<String>,
    /// The served model's name (default: the first the server lists at /models).
    pub model: Option<String>,
    /// The environment variable holding the API key (unset: no key is sent).
    pub api_key_env: String,
    pub endpoint: Endpoint,
    /// Requests in flight at once.
    pub concurrency: u64,
    /// Seconds one request may take.
    pub timeout_s: f64,
    /// Attempts after the first on 429, 5xx or a failed connection.
    pub retries: u64,
    /// Keep answered requests on disk and answer the same request from there.
    pub cache: bool,
    /// The cache folder (default: $HARNESS_CACHE/openai).
    pub cache_dir: Option<PathBuf>,
    /// Requests the host sends at once (set by `--batch`).
    pub max_batch: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            base_url: None,
            model: None,
            api_key_env: "OPENAI_API_KEY".into(),
            endpoint: Endpoint::Completions,
            concurrency: 4,
            timeout_s: 120.0,
            retries: 4,
            cache: true,
            cache_dir: None,
            max_batch: 8,
        }
    }
}

pub struct OpenAi {
    client: Client,
    model: String,
    endpoint: Endpoint,
    concurrency: usize,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
}

impl BackendPlugin for OpenAi {
    type Options = Options;
    type TrainOptions = NoOptions;
    const DESCRIPTION: &'static str = "any OpenAI-compatible server: vLLM, llama.cpp, harness serve, hosted APIs (options: base_url, model, api_key_env, endpoint, concurrency, timeout_s, retries, cache)";

    fn new(o: &mut Options) -> Result<Self, String> {
        let base_url = o
            .base_url
            .clone()
            .or_else(|| std::env::var("OPENAI_BASE_URL").ok())
            .filter(|u| !u.trim().is_empty())
            .ok_or("set the server's URL: --backend-option base_url=http://HOST:PORT/v1 (or OPENAI_BASE_URL)")?;
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(format!(
                "`base_url` must start with http:// or https://, got `{base_url}`"
            ));
        }
        if o.concurrency == 0 || o.max_batch == 0 {
            return Err("`concurrency` and `max_batch` must be at least 1".into());
        }
        if !(o.timeout_s > 0.0 && o.timeout_s.is_finite()) {
            return Err(format!(
                "`timeout_s` must be a positive number of seconds, got {}",
                o.timeout_s
            ));
        }
        let api_key = std::env::var(&o.api_key_env).ok().filter(|k| !k.is_empty());
        let cache = o.cache.then(|| {
            o.cache_dir
                .clone()
                .unwrap_or_else(|| harness_abi::paths::cache_dir().join("openai"))
        });
        let client = Client::new(
            &base_url,
            api_key,
            Duration::from_secs_f64(o.timeout_s),
            o.retries.min(20) as u32,
            cache.clone(),
        );
        let model = match &o.model {
            Some(m) => m.clone(),
            None => {
                let listed = client.get("/models").map_err(|e| e.to_string())?;
                listed
                    .pointer("/data/0/id")
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| format!("{base_url}/models lists no model; name one with --backend-option model=NAME"))?
            }
        };
        o.base_url = Some(client.base_url().to_string());
        o.model = Some(model.clone());
        o.cache_dir = cache;
        Ok(OpenAi {
            client,
            model,
            endpoint: o.endpoint,
            concurrency: o.concurrency as usize,
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
        })
    }

    fn info(&self) -> ModelInfo {
        ModelInfo {
            name: self.model.as_str().into(),
            // A URL, not a file: run.toml records no sha256 for it.
            path: self.client.base_url().into(),
            architecture: "openai-compatible".into(),
            parameters: 0,
            device: "remote".into(),
            resolved_options: Default::default(),
        }
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, String> {
        // vLLM and `harness serve` tokenize at the server's root; others cannot.
        let root = self.client.base_url().trim_end_matches("/v1");
        let answer = self
            .client
            .post_url(
                &format!("{root}/tokenize"),
                &json!({"prompt": text, "add_special_tokens": false}),
            )
            .map_err(|e| format!("the server does not tokenize (no /tokenize endpoint): {e}"))?;
        answer
            .get("tokens")
            .and_then(|t| t.as_array())
            .and_then(|t| t.iter().map(|x| x.as_u64().map(|n| n as u32)).collect())
            .ok_or_else(|| "the server's /tokenize answer has no `tokens` list".into())
    }

    fn generate(&mut self, requests: Vec<GenerateRequest>) -> Result<Vec<Generation>, String> {
        self.parallel(&requests, |me, r| me.generate_one(r))
    }

    fn score_choices(
        &mut self,
        requests: Vec<ChoiceRequest>,
    ) -> Result<Vec<Vec<ChoiceScore>>, String> {
        if self.endpoint == Endpoint::Chat {
            return Err("multiple-choice scoring reads the prompt's log-probabilities, which the chat endpoint does not give; use endpoint=completions with a server that gives them (vLLM, harness serve)".into());
        }
        // One request per option, all options of all requests side by side.
        let flat: Vec<(String, String)> = requests
            .iter()
            .flat_map(|r| {
                r.options
                    .iter()
                    .map(move |o| (r.context.to_string(), o.to_string()))
            })
            .collect();
        let scored = self.parallel(&flat, |me, (context, option)| me.score_one(context, option))?;
        let mut it = scored.into_iter();
        Ok(requests
            .iter()
            .map(|r| it.by_ref().take(r.options.len()).collect())
            .collect())
    }

    fn next_token_logprobs(&mut self, text: &str, top: u32) -> Result<Vec<TokenLogprob>, String> {
        let answer = self.completion(json!({
            "model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0,
            "logprobs": top.min(20),
        }))?;
        let tops = answer
            .pointer("/choices/0/logprobs/top_logprobs/0")
            .and_then(|t| t.as_object())
            .ok_or(NO_LOGPROBS)?;
        let mut out: Vec<TokenLogprob> = tops
            .iter()
            .filter_map(|(t, lp)| {
                lp.as_f64().map(|lp| TokenLogprob {
                    // The API names tokens by text only.
                    id: u32::MAX,
                    text: t.as_str().into(),
                    logprob: lp,
                })
            })
            .collect();
        out.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
        Ok(out)
    }

    fn stats(&self) -> BackendStats {
        BackendStats {
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            generated_tokens: self.generated_tokens.load(Ordering::Relaxed),
            ..Default::default()
        }
    }
}

const NO_LOGPROBS: &str = "the server gave no log-probabilities for the prompt (`echo` with `logprobs`), which multiple-choice scoring needs; vLLM and harness serve give them, hosted chat APIs do not";

impl OpenAi {
    /// `work` over `items` with `concurrency` requests in flight, results in order; the first
    /// error (in item order) is returned.
    fn parallel<T: Sync, R: Send>(
        &self,
        items: &[T],
        work: impl Fn(&Self, &T) -> Result<R, String> + Sync,
    ) -> Result<Vec<R>, String> {
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<Result<R, String>>>> =
            Mutex::new((0..items.len()).map(|_| None).collect());
        std::thread::scope(|s| {
            for _ in 0..self.concurrency.min(items.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= items.len() {
                        break;
                    }
                    let r = work(self, &items[i]);
                    let failed = r.is_err();
                    results.lock().expect("no panic holds the lock")[i] = Some(r);
                    if failed {
                        // Stop handing out work; what is in flight finishes.
                        next.store(items.len(), Ordering::SeqCst);
                    }
                });
            }
        });
        let results = results.into_inner().expect("no panic holds the lock");
        if let Some(Err(e)) = results.iter().flatten().find(|r| r.is_err()) {
            return Err(e.clone());
        }
        Ok(results
            .into_iter()
            .map(|r| r.and_then(Result::ok).expect("every item answered"))
            .collect())
    }

    fn completion(&self, body: Value) -> Result<Value, String> {
        let path = match self.endpoint {
            Endpoint::Completions => "/completions",
            Endpoint::Chat => "/chat/completions",
        };
        let answer = self.client.post(path, &body).map_err(|e| e.to_string())?;
        if let Some(u) = answer.get("usage") {
            let n = |k: &str| u.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
            self.prompt_tokens
                .fetch_add(n("prompt_tokens"), Ordering::Relaxed);
            self.generated_tokens
                .fetch_add(n("completion_tokens"), Ordering::Relaxed);
        }
        Ok(answer)
    }

    fn generate_one(&self, r: &GenerateRequest) -> Result<Generation, String> {
        let stop: Vec<&str> = r.stop.iter().map(|s| s.as_str()).take(4).collect();
        let mut body = match self.endpoint {
            Endpoint::Completions => json!({"model": self.model, "prompt": r.prompt.as_str()}),
            Endpoint::Chat => {
                json!({"model": self.model, "messages": [{"role": "user", "content": r.prompt.as_str()}]})
            }
        };
        body["max_tokens"] = json!(r.max_new_tokens);
        body["temperature"] = json!(0);
        if !stop.is_empty() {
            body["stop"] = json!(stop);
        }
        let answer = self.completion(body)?;
        let text = match self.endpoint {
            Endpoint::Completions => answer.pointer("/choices/0/text"),
            Endpoint::Chat => answer.pointer("/choices/0/message/content"),
        }
        .and_then(|t| t.as_str())
        .ok_or("the server's answer has no text (choices[0])")?;
        // A server may return the stop string, and only four are sent: cut at the first.
        let cut = r
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
            .unwrap_or(text.len());
        let usage = |k: &str| {
            answer
                .pointer(&format!("/usage/{k}"))
                .and_then(|x| x.as_u64())
                .unwrap_or(0) as u32
        };
        Ok(Generation {
            text: text[..cut].into(),
            prompt_tokens: usage("prompt_tokens"),
            generated_tokens: usage("completion_tokens"),
        })
    }

    /// log p(option | context) from the echoed prompt's token log-probabilities: the tokens at
    /// or after the context's end and before the prompt's end (the one generated token, asked
    /// for because some servers refuse `max_tokens: 0`, is left out).
    fn score_one(&self, context: &str, option: &str) -> Result<ChoiceScore, String> {
        let full = format!("{context}{option}");
        let answer = self.completion(json!({
            "model": self.model, "prompt": full, "max_tokens": 1, "temperature": 0,
            "logprobs": 1, "echo": true,
        }))?;
        let lp = answer
            .pointer("/choices/0/logprobs")
            .filter(|v| !v.is_null())
            .ok_or(NO_LOGPROBS)?;
        let list = |k: &str| lp.get(k).and_then(|v| v.as_array()).ok_or(NO_LOGPROBS);
        let (offsets, logprobs, tops) = (
            list("text_offset")?,
            list("token_logprobs")?,
            list("top_logprobs")?,
        );
        let (start, end) = (context.chars().count() as u64, full.chars().count() as u64);
        let mut score = ChoiceScore {
            logprob: 0.0,
            n_tokens: 0,
            is_greedy: true,
        };
        for i in 0..offsets.len().min(logprobs.len()) {
            let at = offsets[i].as_u64().unwrap_or(0);
            if at < start || at >= end {
                continue;
            }
            let p = logprobs[i].as_f64().ok_or(NO_LOGPROBS)?;
            score.logprob += p;
            score.n_tokens += 1;
            let best = tops
                .get(i)
                .and_then(|t| t.as_object())
                .and_then(|t| t.values().filter_map(|v| v.as_f64()).reduce(f64::max));
            if best.is_some_and(|b| p < b - 1e-6) {
                score.is_greedy = false;
            }
        }
        if score.n_tokens == 0 {
            return Err(format!("the server's tokens of the prompt do not cover the option {option:?} (its text offsets end before it)"));
        }
        Ok(score)
    }
}

harness_abi::plugin! { backend "openai" => OpenAi }

#[cfg(test)]
mod tests {
    use super::*;

    fn options(extra: &str) -> Options {
        harness_abi::options::read("openai", &format!("model = \"m\"\ncache = false\n{extra}"))
            .unwrap()
    }

    #[test]
    fn options_are_checked_and_the_key_is_only_named() {
        let mut o = options("base_url = \"ftp://x\"");
        assert!(OpenAi::new(&mut o).err().unwrap().contains("http://"));
        let mut o = options("base_url = \"http://127.0.0.1:9/v1/\"\nconcurrency = 0");
        assert!(OpenAi::new(&mut o).err().unwrap().contains("at least 1"));
        let mut o =
            options("base_url = \"http://127.0.0.1:9/v1/\"\napi_key_env = \"HARNESS_TEST_KEY\"");
        std::env::set_var("HARNESS_TEST_KEY", "sk-never-recorded");
        let b = OpenAi::new(&mut o).unwrap();
        let recorded = harness_abi::options::record(&o).unwrap();
        assert!(!recorded.contains("sk-never"), "{recorded}");
        assert!(
            recorded.contains("base_url = \"http://127.0.0.1:9/v1\""),
            "{recorded}"
        );
        assert_eq!(b.info().device.as_str(), "remote");
        let e = harness_abi::options::read::<Options>("openai", "base_ur = \"x\"").unwrap_err();
        assert!(e.contains("base_url"), "{e}");
    }

    #[test]
    fn the_chat_endpoint_refuses_choice_scoring_with_the_reason() {
        let mut o = options("base_url = \"http://127.0.0.1:9/v1\"\nendpoint = \"chat\"");
        let mut b = OpenAi::new(&mut o).unwrap();
        let e = b
            .score_choices(vec![ChoiceRequest {
                context: "Q".into(),
                options: vec![" A".into()].into(),
                labels: vec!["A".into()].into(),
                length_normalize: false,
            }])
            .unwrap_err();
        assert!(e.contains("endpoint=completions"), "{e}");
    }
}
