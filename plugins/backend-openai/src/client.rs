//! HTTP to an OpenAI-compatible server: JSON bodies, the API key from the environment in the
//! Authorization header only, timeouts, retries with exponential backoff on 429, 5xx and
//! transport failures (honouring Retry-After), and an on-disk cache of answered requests keyed
//! by the request itself, so a rerun asks the server nothing it already answered.

// ureq's own `Result<Response, ureq::Error>` is large; it lives only between a send and the
// decision to retry it.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct Client {
    agent: ureq::Agent,
    base_url: String,
    /// The key itself, kept only here: never in options, records or messages.
    api_key: Option<String>,
    retries: u32,
    cache: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("cannot reach {url}: {cause}")]
    Transport { url: String, cause: String },
    #[error("{url} answered with something that is not JSON: {cause}")]
    NotJson { url: String, cause: String },
}

impl Client {
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        timeout: Duration,
        retries: u32,
        cache: Option<PathBuf>,
    ) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(timeout.min(Duration::from_secs(30)))
            .timeout(timeout)
            .build();
        Client {
            agent,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key,
            retries,
            cache,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// GET `path` under the base URL (not cached: it asks what the server has now).
    pub fn get(&self, path: &str) -> Result<Value, HttpError> {
        let url = format!("{}{path}", self.base_url);
        self.with_retries(&url, || self.authorized(self.agent.get(&url)).call())
    }

    /// POST `body` to `url` (absolute), answered from the cache when this very request was
    /// answered before.
    pub fn post_url(&self, url: &str, body: &Value) -> Result<Value, HttpError> {
        let text = body.to_string();
        let cached = self.cache.as_ref().map(|dir| cache_file(dir, url, &text));
        if let Some(file) = &cached {
            if let Some(v) = std::fs::read(file)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                return Ok(v);
            }
        }
        let answer = self.with_retries(url, || {
            self.authorized(self.agent.post(url))
                .set("Content-Type", "application/json")
                .send_string(&text)
        })?;
        if let Some(file) = &cached {
            // A cache that cannot be written only costs a request next time.
            let _ = write_atomic(file, answer.to_string().as_bytes());
        }
        Ok(answer)
    }

    /// POST `body` to `path` under the base URL.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, HttpError> {
        self.post_url(&format!("{}{path}", self.base_url), body)
    }

    fn authorized(&self, r: ureq::Request) -> ureq::Request {
        match &self.api_key {
            Some(k) => r.set("Authorization", &format!("Bearer {k}")),
            None => r,
        }
    }

    fn with_retries(
        &self,
        url: &str,
        send: impl Fn() -> Result<ureq::Response, ureq::Error>,
    ) -> Result<Value, HttpError> {
        let mut attempt = 0;
        loop {
            let (error, retry_after) = match send() {
                Ok(response) => {
                    let text = response.into_string().map_err(|e| HttpError::Transport {
                        url: url.to_string(),
                        cause: e.to_string(),
                    })?;
                    return serde_json::from_str(&text).map_err(|e| HttpError::NotJson {
                        url: url.to_string(),
                        cause: e.to_string(),
                    });
                }
                Err(ureq::Error::Status(status, response)) => {
                    let retry_after = response
                        .header("Retry-After")
                        .and_then(|s| s.trim().parse::<f64>().ok())
                        .map(|s| Duration::from_secs_f64(s.clamp(0.0, MAX_BACKOFF.as_secs_f64())));
                    let message = error_message(&response.into_string().unwrap_or_default());
                    let error = HttpError::Status {
                        url: url.to_string(),
                        status,
                        message,
                    };
                    if status != 429 && status < 500 {
                        return Err(error);
                    }
                    (error, retry_after)
                }
                Err(ureq::Error::Transport(t)) => (
                    HttpError::Transport {
                        url: url.to_string(),
                        // ureq's own text repeats the URL.
                        cause: match t.message() {
                            Some(m) => format!("{}: {m}", t.kind()),
                            None => t.kind().to_string(),
                        },
                    },
                    None,
                ),
            };
            if attempt >= self.retries {
                return Err(error);
            }
            let backoff = Duration::from_millis(250 << attempt.min(10)).min(MAX_BACKOFF);
            std::thread::sleep(retry_after.unwrap_or(backoff));
            attempt += 1;
        }
    }
}

/// The `error.message` of an OpenAI-style error body, else the body's first line, shortened.
fn error_message(body: &str) -> String {
    let from_json = serde_json::from_str::<Value>(body).ok().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("message"))
            .or_else(|| v.get("error"))
            .and_then(|m| m.as_str().map(str::to_string))
    });
    let text = from_json.unwrap_or_else(|| body.lines().next().unwrap_or("").to_string());
    let mut short: String = text.chars().take(300).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    if short.is_empty() {
        "(no message)".into()
    } else {
        short
    }
}

/// Where the answer to POST `body` at `url` is cached: the sha256 of both names it.
fn cache_file(dir: &Path, url: &str, body: &str) -> PathBuf {
    let mut h = Sha256::new();
    h.update(url.as_bytes());
    h.update([0]);
    h.update(body.as_bytes());
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    dir.join(&hex[..2]).join(format!("{hex}.json"))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_are_one_short_line() {
        assert_eq!(
            error_message(r#"{"error": {"message": "model not found", "type": "x"}}"#),
            "model not found"
        );
        assert_eq!(error_message("Bad Gateway\n<html>"), "Bad Gateway");
        assert_eq!(error_message(""), "(no message)");
        assert!(error_message(&"x".repeat(1000)).chars().count() <= 301);
    }

    #[test]
    fn the_cache_key_is_the_request() {
        let d = Path::new("/c");
        let a = cache_file(d, "http://127.0.0.1:9/v1/completions", r#"{"prompt":"a"}"#);
        assert_eq!(
            a,
            cache_file(d, "http://127.0.0.1:9/v1/completions", r#"{"prompt":"a"}"#)
        );
        assert_ne!(
            a,
            cache_file(d, "http://127.0.0.1:9/v1/completions", r#"{"prompt":"b"}"#)
        );
        assert_ne!(
            a,
            cache_file(d, "http://127.0.0.1:8/v1/completions", r#"{"prompt":"a"}"#)
        );
    }
}

#[cfg(test)]
mod retry_tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A server answering its requests with `statuses` in turn (then 200 forever), counting them.
    fn server(statuses: Vec<u16>) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&count);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let n = seen.fetch_add(1, Ordering::SeqCst);
                let status = statuses.get(n).copied().unwrap_or(200);
                let text = if status == 200 {
                    r#"{"ok": true}"#.to_string()
                } else {
                    format!(r#"{{"error": {{"message": "busy {n}"}}}}"#)
                };
                write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nRetry-After: 0\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                )
                .unwrap();
            }
        });
        (url, count)
    }

    fn client(url: &str, retries: u32) -> Client {
        Client::new(url, None, Duration::from_secs(5), retries, None)
    }

    #[test]
    fn busy_and_failing_servers_are_retried_until_the_limit() {
        let (url, count) = server(vec![429, 503]);
        let v = client(&url, 2)
            .post("/completions", &serde_json::json!({}))
            .unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(count.load(Ordering::SeqCst), 3);

        let (url, count) = server(vec![503, 503, 503]);
        let e = client(&url, 1)
            .post("/completions", &serde_json::json!({}))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{url}/completions answered 503: busy 1")
        );
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_server_that_never_answers_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        // Accepts connections and never answers.
        std::thread::spawn(move || {
            let _held: Vec<_> = listener.incoming().take(4).collect();
            std::thread::sleep(Duration::from_secs(30));
        });
        let started = std::time::Instant::now();
        let c = Client::new(&url, None, Duration::from_millis(300), 0, None);
        let e = c.post("/completions", &serde_json::json!({})).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot reach {url}/completions")),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_refused_request_is_not_retried() {
        let (url, count) = server(vec![400]);
        let e = client(&url, 3)
            .post("/completions", &serde_json::json!({}))
            .unwrap_err();
        assert!(e.to_string().ends_with("answered 400: busy 0"), "{e}");
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn answers_are_cached_by_request() {
        let (url, count) = server(vec![]);
        let dir = std::env::temp_dir().join(format!("openai-cache-{}", std::process::id()));
        let c = Client::new(&url, None, Duration::from_secs(5), 0, Some(dir.clone()));
        let body = serde_json::json!({"prompt": "x"});
        c.post("/completions", &body).unwrap();
        c.post("/completions", &body).unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 1);
        c.post("/completions", &serde_json::json!({"prompt": "y"}))
            .unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 2);
        let _ = std::fs::remove_dir_all(dir);
    }
}
