//! `harness serve` and the `openai` backend, each tested through the other for real: a tiny
//! model served over HTTP answers an eval through the openai backend exactly as the candle
//! backend answers it directly; the API refuses what it cannot do with a status and a reason;
//! the openai backend's cache answers a rerun with the server gone, and the API key never
//! reaches the run folder.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

/// A running `harness serve`; killed when dropped.
struct Served {
    child: Child,
    addr: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    fn start(model: &Path, extra: &[&str]) -> Served {
        let mut child = harness()
            .args(["serve", "--port", "0", "--name", "tiny", "--model"])
            .arg(model)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split("/v1").next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Served { child, addr }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// One HTTP request; returns the status and the JSON body.
    fn request(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let status: u16 = text.split(' ').nth(1).unwrap().parse().unwrap();
        let json = text.split("\r\n\r\n").nth(1).unwrap_or("");
        (
            status,
            serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
        )
    }
}

fn mmlu_data(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("test")).unwrap();
    std::fs::write(
        data.join("test/virology_test.csv"),
        "What spreads?,a virus,a rock,a chair,a song,A\nWhich is alive?,a stone,a cell,a nail,a cup,B\nWhat infects bacteria?,a plant,a fungus,a phage,a prion,C\n",
    )
    .unwrap();
    data
}

fn samples(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn eval(task: &[&str], out: &Path) -> Command {
    let mut c = harness();
    c.arg("eval").args(task).arg("--out").arg(out);
    c
}

#[test]
fn a_served_model_answers_through_the_openai_backend_as_it_does_locally() {
    let dir = temp_dir("serve-parity");
    let model = dir.join("model");
    write_tiny_model(&model, 11);
    let data = mmlu_data(&dir);
    let data = data.to_str().unwrap();
    let served = Served::start(&model, &[]);
    let cache = dir.join("cache");
    let openai = |c: &mut Command| {
        c.args(["--backend", "openai", "--backend-option"])
            .arg(format!("base_url={}", served.base_url()))
            .arg("--backend-option")
            .arg(format!("cache_dir={}", cache.display()))
            .env("OPENAI_API_KEY", "sk-test-secret-4242");
    };
    let addition = [
        "--task",
        "addition",
        "--digits",
        "1-2",
        "--n",
        "3",
        "--metric",
        "exact-match",
    ];
    let mmlu = ["--task", "mmlu", "--subject", "virology", "--data", data];
    for (name, task) in [("addition", &addition[..]), ("mmlu", &mmlu[..])] {
        let local = dir.join(format!("{name}-local"));
        ok(eval(task, &local).arg("--model").arg(&model));
        let remote = dir.join(format!("{name}-remote"));
        let mut c = eval(task, &remote);
        openai(&mut c);
        ok(&mut c);
        let (l, r) = (samples(&local), samples(&remote));
        assert_eq!(l.len(), r.len());
        for (a, b) in l.iter().zip(&r) {
            assert_eq!(a["prediction"], b["prediction"], "{name}: {a} vs {b}");
            if let Some(la) = a["option_logprobs"].as_array() {
                for (x, y) in la.iter().zip(b["option_logprobs"].as_array().unwrap()) {
                    let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                    assert!((x - y).abs() < 1e-4, "{name}: {x} vs {y}");
                }
            }
        }
        assert_eq!(
            std::fs::read_to_string(local.join("results.csv")).unwrap(),
            std::fs::read_to_string(remote.join("results.csv")).unwrap(),
            "{name}"
        );
        // The key is read from the environment and recorded nowhere.
        for f in ["run.toml", "samples.jsonl", "results.csv"] {
            let text = std::fs::read_to_string(remote.join(f)).unwrap();
            assert!(!text.contains("sk-test-secret"), "{f} holds the key");
        }
        let run_toml = std::fs::read_to_string(remote.join("run.toml")).unwrap();
        assert!(
            run_toml.contains("api_key_env = \"OPENAI_API_KEY\""),
            "{run_toml}"
        );
        assert!(run_toml.contains("model = \"tiny\""), "{run_toml}");
    }
    // With the server gone, the cache answers the same requests.
    let base_url = served.base_url();
    drop(served);
    let again = dir.join("mmlu-cached");
    let mut c = eval(&mmlu, &again);
    c.args(["--backend", "openai", "--backend-option"])
        .arg(format!("base_url={base_url}"))
        .args([
            "--backend-option",
            "model=tiny",
            "--backend-option",
            "retries=0",
            "--backend-option",
        ])
        .arg(format!("cache_dir={}", cache.display()));
    ok(&mut c);
    assert_eq!(
        std::fs::read_to_string(dir.join("mmlu-remote/results.csv")).unwrap(),
        std::fs::read_to_string(again.join("results.csv")).unwrap()
    );
    // An uncached request to no server: one line naming the URL.
    let mut c = eval(
        &["--task", "addition", "--digits", "3", "--n", "1"],
        &dir.join("down"),
    );
    c.args([
        "--backend",
        "openai",
        "--backend-option",
        "base_url=http://127.0.0.1:9/v1",
    ])
    .args([
        "--backend-option",
        "model=tiny",
        "--backend-option",
        "retries=0",
        "--backend-option",
        "cache=false",
    ]);
    let e = fails(&mut c);
    assert!(
        e.contains("cannot reach http://127.0.0.1:9/v1/completions"),
        "{e}"
    );
    let e = fails(
        eval(&["--task", "addition"], &dir.join("nourl"))
            .args(["--backend", "openai"])
            .env_remove("OPENAI_BASE_URL"),
    );
    assert!(e.contains("base_url="), "{e}");
}

#[test]
fn the_api_scores_prompts_tokenizes_templates_chats_and_refuses_with_reasons() {
    let dir = temp_dir("serve-api");
    let model = dir.join("model");
    write_tiny_model(&model, 12);
    // The tiny model gets a chat template as an HF folder carries it.
    std::fs::write(
        model.join("tokenizer_config.json"),
        r#"{"bos_token": null, "eos_token": "<|endoftext|>", "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'].strip() }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"}"#,
    )
    .unwrap();
    let served = Served::start(&model, &["--max-body", "4096"]);

    let (status, models) = served.request("GET", "/v1/models", "");
    assert_eq!(
        (status, models["data"][0]["id"].as_str()),
        (200, Some("tiny"))
    );

    // Scoring a prompt: every token with its log-probability (none for the first), the tokens'
    // texts spelling the prompt, offsets in characters.
    let (status, v) = served.request(
        "POST",
        "/v1/completions",
        r#"{"model": "tiny", "prompt": "12+30=", "max_tokens": 0, "echo": true, "logprobs": 2}"#,
    );
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), "12+30=");
    assert!(lp["token_logprobs"][0].is_null());
    assert!(lp["token_logprobs"][1].as_f64().unwrap() < 0.0);
    assert_eq!(lp["top_logprobs"][1].as_object().unwrap().len(), 2);
    assert_eq!(lp["text_offset"][2], 2);
    assert_eq!(v["choices"][0]["text"], "12+30=");

    // The same prompt as token ids (lm-evaluation-harness with its remote tokenizer), and one
    // generated token: the prompt's log-probabilities are the same.
    let (_, ids) = served.request(
        "POST",
        "/tokenize",
        r#"{"prompt": "12+30=", "add_special_tokens": false}"#,
    );
    let ids = ids["tokens"].clone();
    let (_, text) = served.request("POST", "/detokenize", &format!(r#"{{"tokens": {ids}}}"#));
    assert_eq!(text["prompt"], "12+30=");
    let (status, by_ids) = served.request(
        "POST",
        "/v1/completions",
        &format!(r#"{{"prompt": [{ids}], "max_tokens": 1, "echo": true, "logprobs": 1}}"#),
    );
    assert_eq!(status, 200, "{by_ids}");
    let a = lp["token_logprobs"].as_array().unwrap();
    let b = by_ids["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(b.len(), a.len() + 1, "the generated token comes last");
    for (x, y) in a.iter().zip(b).skip(1) {
        assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-5);
    }
    let (status, info) = served.request("GET", "/tokenizer_info", "");
    assert_eq!(status, 200);
    assert_eq!(info["eos_token"], "<|endoftext|>");
    assert!(info["chat_template"]
        .as_str()
        .unwrap()
        .contains("add_generation_prompt"));

    // Generation with a stop string, batched with others sent at once.
    let (status, v) = served.request(
        "POST",
        "/v1/completions",
        r#"{"prompt": ["1+1=", "2+2=", "3+3="], "max_tokens": 5, "stop": ["\n"]}"#,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 3);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 15);

    // Chat goes through the model's template.
    let (status, v) = served.request(
        "POST",
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": " hi "}], "max_tokens": 3}"#,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["usage"]["prompt_tokens"], "<user>hi\n<assistant>".len());

    // Refusals: status and reason.
    let refused = |path: &str, body: &str| served.request("POST", path, body);
    let (s, e) = refused("/v1/completions", r#"{"model": "gpt-9", "prompt": "x"}"#);
    assert_eq!(s, 404);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("serves `tiny`"),
        "{e}"
    );
    let (s, e) = refused(
        "/v1/completions",
        &format!(r#"{{"prompt": "{}"}}"#, "x".repeat(5000)),
    );
    assert_eq!(s, 413, "{e}");
    let (s, _) = refused("/v1/completions", "{not json");
    assert_eq!(s, 400);
    let (s, e) = refused("/v1/completions", r#"{"prompt": [70000]}"#);
    assert_eq!(s, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outside the vocabulary"),
        "{e}"
    );
    let (s, _) = served.request("GET", "/v1/nothing", "");
    assert_eq!(s, 404);
    let (s, _) = served.request("DELETE", "/v1/models", "");
    assert_eq!(s, 405);
    drop(served);

    // A model without a template: chat is refused with the reason; a full queue gets 429.
    std::fs::remove_file(model.join("tokenizer_config.json")).unwrap();
    let served = Served::start(&model, &["--max-pending", "0"]);
    let (s, e) = served.request(
        "POST",
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
    );
    assert_eq!(s, 429, "{e}");
    drop(served);
    let served = Served::start(&model, &[]);
    let (s, e) = served.request(
        "POST",
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
    );
    assert_eq!(s, 400);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no chat template"),
        "{e}"
    );
}

#[test]
fn chat_template_wraps_eval_prompts_and_is_recorded() {
    let dir = temp_dir("chat-template");
    let model = dir.join("model");
    write_tiny_model(&model, 13);
    let task = [
        "--task",
        "addition",
        "--digits",
        "1",
        "--n",
        "2",
        "--shots",
        "0",
        "--chat-template",
    ];
    let e = fails(eval(&task, &dir.join("none")).arg("--model").arg(&model));
    assert!(
        e.contains("--chat-template") && e.contains("ships no chat template"),
        "{e}"
    );
    std::fs::write(
        model.join("tokenizer_config.json"),
        r#"{"eos_token": "<|endoftext|>", "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"}"#,
    )
    .unwrap();
    let run = dir.join("run");
    ok(eval(&task, &run).arg("--model").arg(&model));
    for s in samples(&run) {
        let prompt = s["prompt"].as_str().unwrap();
        assert!(
            prompt.starts_with("<user>") && prompt.ends_with("\n<assistant>"),
            "{prompt}"
        );
    }
    let record = std::fs::read_to_string(run.join("run.toml")).unwrap();
    assert!(record.contains("chat_template = true"), "{record}");
    // Without the flag the prompt is the task's own, and run.toml says nothing.
    let plain = dir.join("plain");
    ok(eval(&task[..8], &plain).arg("--model").arg(&model));
    assert!(!samples(&plain)[0]["prompt"]
        .as_str()
        .unwrap()
        .starts_with("<user>"));
    assert!(!std::fs::read_to_string(plain.join("run.toml"))
        .unwrap()
        .contains("chat_template"));
}
