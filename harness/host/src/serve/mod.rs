//! `harness serve`: a backend plugin behind an OpenAI-compatible API ([`api`]).
//!
//! A few HTTP threads read and check requests and hand them to the model loop over a channel;
//! the model loop (this thread, which owns the backend) takes every request waiting, up to
//! `--batch` sequences, and decodes their generations as one batch. Each HTTP thread then
//! waits for its answer. Bodies over `--max-body` get 413 and requests beyond
//! `--max-pending` waiting get 429, before they reach the model.

mod api;

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use harness_abi::abi_stable::std_types::{ROption, RString, RVec};
use harness_abi::{BackendBox, GenerateRequest, Prompt, PromptToken};
use serde_json::{json, Value};
use tiny_http::{Header, Method, Response, Server};

use crate::cli::ServeArgs;
use crate::plan::{insert_pair, BackendFlags};
use crate::registry::{Entry, Registry};
use api::{ApiError, Work};

/// HTTP threads: they parse and wait; the model is the bottleneck.
const HTTP_THREADS: usize = 8;

/// A request on its way to the model loop, with where to send the answer.
struct Job {
    work: Work,
    reply: Sender<Result<Value, ApiError>>,
}

pub fn run(reg: &Registry, args: &ServeArgs) -> Result<()> {
    if args.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    let mut options = BackendFlags {
        model: args.model.as_deref(),
        adapter: args.adapter.as_deref(),
        base: args.base.as_deref(),
        max_batch: Some(args.batch),
        ..Default::default()
    }
    .table();
    for pair in &args.backend_options {
        insert_pair(&mut options, pair, "--backend-option")?;
    }
    let (entry, mut backend) = reg.backend(&args.backend, &options.to_string())?;
    let info = entry.outcome(backend.info())?;
    // The file's stem names a local model (`SmolLM2-135M-Instruct.Q4_1`): no spaces, and it
    // says which file is served; a backend whose model is no file gives its own name.
    let path = std::path::Path::new(info.path.as_str());
    let stem = path
        .is_file()
        .then(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .flatten();
    let name = args
        .name
        .clone()
        .or(stem)
        .unwrap_or_else(|| info.name.to_string());

    let server = Server::http((args.host.as_str(), args.port))
        .map_err(|e| anyhow!("cannot listen on {}:{}: {e}", args.host, args.port))?;
    let server = Arc::new(server);
    let addr = server
        .server_addr()
        .to_ip()
        .context("the server has no IP address")?;
    crate::interrupt::install();

    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
    let pending = Arc::new(AtomicUsize::new(0));
    for _ in 0..HTTP_THREADS {
        let server = Arc::clone(&server);
        let jobs = jobs_tx.clone();
        let pending = Arc::clone(&pending);
        let name = name.clone();
        let limits = (args.max_body, args.max_pending as usize);
        std::thread::spawn(move || {
            while let Ok(request) = server.recv() {
                handle(request, &name, &jobs, &pending, limits);
            }
        });
    }
    drop(jobs_tx);
    if !addr.ip().is_loopback() {
        eprintln!("warning: listening on {addr}: anyone who can reach it can use the model");
    }
    println!(
        "serving `{name}` ({}) at http://{addr}/v1 (Ctrl-C stops)",
        info.path
    );
    model_loop(entry, &mut backend, &jobs_rx, args.batch as usize);
    server.unblock();
    Ok(())
}

/// Reads, checks and answers one HTTP request (the model's part through the model loop).
fn handle(
    mut request: tiny_http::Request,
    name: &str,
    jobs: &Sender<Job>,
    pending: &AtomicUsize,
    (max_body, max_pending): (u64, usize),
) {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let outcome: Result<Value, ApiError> = (|| {
        match (&method, path.trim_end_matches('/')) {
            (Method::Get, "/v1/models") => Ok(json!({
                "object": "list",
                "data": [{"id": name, "object": "model", "created": 0, "owned_by": "harness"}],
            })),
            (Method::Get, "/health") => Ok(json!({"status": "ok"})),
            (Method::Get, "/tokenizer_info" | "/v1/tokenizer_info") => {
                through_model(Work::TokenizerInfo, jobs, pending, max_pending)
            }
            (Method::Post, "/tokenize" | "/v1/tokenize") => {
                let body = read_body(&mut request, max_body)?;
                through_model(api::tokenize(&body)?, jobs, pending, max_pending)
            }
            (Method::Post, "/detokenize" | "/v1/detokenize") => {
                let body = read_body(&mut request, max_body)?;
                through_model(api::detokenize(&body)?, jobs, pending, max_pending)
            }
            (Method::Post, "/v1/completions") | (Method::Post, "/v1/chat/completions") => {
                let body = read_body(&mut request, max_body)?;
                let work = if path.contains("chat") {
                    api::chat(&body, name)?
                } else {
                    api::completion(&body, name)?
                };
                let mut answer = through_model(work, jobs, pending, max_pending)?;
                answer["model"] = json!(name);
                Ok(answer)
            }
            (_, "/v1/models" | "/v1/completions" | "/v1/chat/completions" | "/health" | "/tokenize"
                | "/detokenize" | "/tokenizer_info") => Err(ApiError {
                status: 405,
                message: format!("{method} is not allowed on {path}"),
            }),
            _ => Err(ApiError {
                status: 404,
                message: format!("no such endpoint: {path} (the API is /v1/models, /v1/completions, /v1/chat/completions)"),
            }),
        }
    })();
    let (status, body) = match outcome {
        Ok(v) => (200, v),
        Err(e) => (e.status, e.body()),
    };
    eprintln!(
        "{method} {path} {status} {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let header = Header::from_bytes("Content-Type", "application/json").expect("static header");
    let response = Response::from_string(body.to_string())
        .with_status_code(status)
        .with_header(header);
    let _ = request.respond(response);
}

/// Hands `work` to the model loop and waits for its answer; 429 when `max_pending` requests
/// already wait.
fn through_model(
    work: Work,
    jobs: &Sender<Job>,
    pending: &AtomicUsize,
    max_pending: usize,
) -> Result<Value, ApiError> {
    if pending.fetch_add(1, Ordering::SeqCst) >= max_pending {
        pending.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError {
            status: 429,
            message: format!("{max_pending} requests are already waiting; retry later"),
        });
    }
    let (tx, rx) = mpsc::channel();
    let answer = match jobs.send(Job { work, reply: tx }) {
        Ok(()) => rx.recv().unwrap_or_else(|_| Err(stopping())),
        Err(_) => Err(stopping()),
    };
    pending.fetch_sub(1, Ordering::SeqCst);
    answer
}

fn stopping() -> ApiError {
    ApiError {
        status: 503,
        message: "the server is stopping".into(),
    }
}

/// The body, refused with 413 beyond `max` bytes (by its Content-Length or as read).
fn read_body(request: &mut tiny_http::Request, max: u64) -> Result<Vec<u8>, ApiError> {
    let too_large = || ApiError {
        status: 413,
        message: format!("the request body is over {max} bytes (--max-body)"),
    };
    if request.body_length().is_some_and(|n| n as u64 > max) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    request
        .as_reader()
        .take(max + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::bad(format!("cannot read the request body: {e}")))?;
    if body.len() as u64 > max {
        return Err(too_large());
    }
    Ok(body)
}

/// Answers jobs until Ctrl-C: every job waiting (up to `batch` sequences) is decoded together.
fn model_loop(entry: &Entry, backend: &mut BackendBox, jobs: &Receiver<Job>, batch: usize) {
    loop {
        if crate::interrupt::requested() {
            return;
        }
        let first = match jobs.recv_timeout(Duration::from_millis(200)) {
            Ok(j) => j,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut group = vec![first];
        let mut size = group[0].work.size();
        while size < batch {
            match jobs.try_recv() {
                Ok(j) => {
                    size += j.work.size();
                    group.push(j);
                }
                Err(_) => break,
            }
        }
        let answers = answer(entry, backend, &group);
        for (job, a) in group.into_iter().zip(answers) {
            let _ = job.reply.send(a);
        }
    }
}

/// One decoded sequence of a job: its prompt as given (after the chat template), its text,
/// and what it asks.
struct Sequence {
    job: usize,
    prompt: Prompt,
    text: String,
    max_tokens: u32,
    stop: Vec<String>,
}

fn server_error(e: anyhow::Error) -> ApiError {
    ApiError {
        status: 500,
        message: crate::error_line(&e),
    }
}

/// The answers of a group of jobs: their generations as one backend call, then the
/// log-probabilities asked for.
fn answer(entry: &Entry, backend: &mut BackendBox, group: &[Job]) -> Vec<Result<Value, ApiError>> {
    let mut answers: Vec<Option<Result<Value, ApiError>>> = vec![None; group.len()];
    let mut sequences = Vec::new();
    for (j, job) in group.iter().enumerate() {
        match &job.work {
            Work::Completion {
                prompts,
                max_tokens,
                stop,
                ..
            } => {
                for p in prompts {
                    let text = match p {
                        Prompt::Text(t) => Ok(t.to_string()),
                        Prompt::Tokens(ids) => entry
                            .outcome(backend.detokenize(ids.clone()))
                            .map(|t| t.into_string())
                            .map_err(|e| ApiError::bad(crate::error_line(&e))),
                    };
                    match text {
                        Ok(text) => sequences.push(Sequence {
                            job: j,
                            prompt: p.clone(),
                            text,
                            max_tokens: *max_tokens,
                            stop: stop.clone(),
                        }),
                        Err(e) => answers[j] = Some(Err(e)),
                    }
                }
            }
            Work::Chat {
                messages,
                max_tokens,
                stop,
            } => match entry.outcome(backend.chat_prompt(messages.iter().cloned().collect())) {
                Ok(prompt) => sequences.push(Sequence {
                    job: j,
                    text: prompt.to_string(),
                    prompt: Prompt::Text(prompt),
                    max_tokens: *max_tokens,
                    stop: stop.clone(),
                }),
                Err(e) => answers[j] = Some(Err(ApiError::bad(crate::error_line(&e)))),
            },
            Work::Tokenize(text) => {
                answers[j] = Some(
                    entry
                        .outcome(backend.tokenize(text.as_str().into()))
                        .map(|ids| json!({"tokens": ids.as_slice(), "count": ids.len()}))
                        .map_err(|e| ApiError::bad(crate::error_line(&e))),
                )
            }
            Work::Detokenize(ids) => {
                answers[j] = Some(
                    entry
                        .outcome(backend.detokenize(ids.iter().copied().collect()))
                        .map(|t| json!({"prompt": t.as_str()}))
                        .map_err(|e| ApiError::bad(crate::error_line(&e))),
                )
            }
            Work::TokenizerInfo => {
                answers[j] = Some(
                    entry
                        .outcome(backend.tokenizer_info())
                        .map(|t| {
                            let opt = |o: &ROption<RString>| -> Option<String> {
                                o.as_ref().map(|s| s.to_string()).into_option()
                            };
                            json!({
                                "bos_token": opt(&t.bos_token),
                                "eos_token": opt(&t.eos_token),
                                "pad_token": opt(&t.eos_token),
                                "chat_template": opt(&t.chat_template),
                            })
                        })
                        .map_err(server_error),
                )
            }
        }
    }
    // Generation, all jobs' sequences in one call (scoring-only sequences skip it).
    let to_generate: Vec<usize> = (0..sequences.len())
        .filter(|&i| {
            sequences[i].max_tokens > 0
                && !scores_one_token(&group[sequences[i].job].work, &sequences[i])
        })
        .collect();
    let mut generated: Vec<Option<(String, u32, u32)>> = vec![None; sequences.len()];
    if !to_generate.is_empty() {
        let reqs: RVec<GenerateRequest> = to_generate
            .iter()
            .map(|&i| GenerateRequest {
                prompt: sequences[i].text.as_str().into(),
                stop: sequences[i]
                    .stop
                    .iter()
                    .map(|s| s.as_str().into())
                    .collect(),
                max_new_tokens: sequences[i].max_tokens,
            })
            .collect();
        match entry.outcome(backend.generate(reqs)) {
            Ok(out) => {
                for (&i, g) in to_generate.iter().zip(out.iter()) {
                    generated[i] = Some((g.text.to_string(), g.prompt_tokens, g.generated_tokens));
                }
            }
            Err(e) => {
                let err = server_error(e);
                for &i in &to_generate {
                    answers[sequences[i].job].get_or_insert_with(|| Err(err.clone()));
                }
            }
        }
    }
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for (j, job) in group.iter().enumerate() {
        if answers[j].is_some() {
            continue;
        }
        let mine: Vec<usize> = (0..sequences.len())
            .filter(|&i| sequences[i].job == j)
            .collect();
        answers[j] = Some(respond(
            entry, backend, job, &mine, &sequences, &generated, created,
        ));
    }
    answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(stopping())))
        .collect()
}

/// Whether a sequence is a prompt scored with one token after it (`echo`, `logprobs`,
/// `max_tokens: 1`: how lm-evaluation-harness asks for log-likelihoods). Those are answered by
/// [`echo_one_token`], without a generation pass, and always end in exactly one token, as
/// OpenAI's API does (an end-of-sequence token included), since clients drop that last token.
fn scores_one_token(work: &Work, s: &Sequence) -> bool {
    matches!(
        work,
        Work::Completion {
            echo: true,
            logprobs: Some(_),
            ..
        }
    ) && s.max_tokens == 1
}

/// The prompt's tokens as given with their log-probabilities, then the greedy next token with
/// its own: returns (that token's text, prompt + token, the logprobs object, prompt tokens).
fn echo_one_token(
    entry: &Entry,
    backend: &mut BackendBox,
    s: &Sequence,
    top: u32,
    echo: bool,
) -> Result<(String, String, Value, u64), ApiError> {
    let scored = entry
        .outcome(backend.prompt_logprobs(RVec::from(vec![s.prompt.clone()]), top))
        .map_err(server_error)?;
    let mut tokens = scored.into_iter().next().unwrap_or_default().into_vec();
    let n_prompt = tokens.len() as u64;
    let prompt_text: String = tokens.iter().map(|t| t.text.as_str()).collect();
    let next = entry
        .outcome(backend.next_token_logprobs(s.text.as_str().into(), top.max(1)))
        .map_err(server_error)?;
    let greedy = next
        .first()
        .cloned()
        .ok_or_else(|| server_error(anyhow!("the backend gave no next token")))?;
    tokens.push(PromptToken {
        id: greedy.id,
        text: greedy.text.clone(),
        offset: prompt_text.len() as u32,
        logprob: ROption::RSome(greedy.logprob),
        top: next.into_iter().take(top as usize).collect(),
    });
    let full = format!("{prompt_text}{}", greedy.text);
    let from = if echo { 0 } else { prompt_text.len() };
    let value = api::logprobs_object(&tokens, &full, from);
    Ok((greedy.text.into_string(), full, value, n_prompt))
}

/// One job's response body.
fn respond(
    entry: &Entry,
    backend: &mut BackendBox,
    job: &Job,
    mine: &[usize],
    sequences: &[Sequence],
    generated: &[Option<(String, u32, u32)>],
    created: u64,
) -> Result<Value, ApiError> {
    let mut choices = Vec::new();
    let (mut prompt_tokens, mut completion_tokens) = (0u64, 0u64);
    for (index, &i) in mine.iter().enumerate() {
        let s = &sequences[i];
        let (text, p_tokens, g_tokens) = generated[i].clone().unwrap_or_default();
        completion_tokens += g_tokens as u64;
        prompt_tokens += p_tokens as u64;
        let finish = if s.max_tokens > 0 && g_tokens >= s.max_tokens {
            "length"
        } else {
            "stop"
        };
        match &job.work {
            Work::Chat { .. } => choices.push(json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            })),
            Work::Completion {
                echo,
                logprobs: Some(top),
                ..
            } if scores_one_token(&job.work, s) => {
                let (text, full, value, n_prompt) = echo_one_token(entry, backend, s, *top, *echo)?;
                prompt_tokens += n_prompt;
                completion_tokens += 1;
                choices.push(json!({
                    "index": index,
                    "text": if *echo { full } else { text },
                    "logprobs": value,
                    "finish_reason": "length",
                }));
            }
            Work::Completion { echo, logprobs, .. } => {
                let full = format!("{}{text}", s.text);
                let logprobs_value = match logprobs {
                    None => Value::Null,
                    Some(top) => {
                        // The prompt as given, then the generated text's tokens.
                        let scored_prompt = match &s.prompt {
                            Prompt::Text(_) => Prompt::Text(full.as_str().into()),
                            Prompt::Tokens(ids) => {
                                let mut all = ids.clone();
                                if !text.is_empty() {
                                    all.extend(
                                        entry
                                            .outcome(backend.tokenize(text.as_str().into()))
                                            .map_err(server_error)?,
                                    );
                                }
                                Prompt::Tokens(all)
                            }
                        };
                        let prompt_len = match &s.prompt {
                            Prompt::Tokens(ids) => ids.len(),
                            Prompt::Text(_) => 0,
                        };
                        let scored = entry
                            .outcome(backend.prompt_logprobs(RVec::from(vec![scored_prompt]), *top))
                            .map_err(server_error)?;
                        let tokens = scored.into_iter().next().unwrap_or_default();
                        if s.max_tokens == 0 {
                            prompt_tokens += tokens.len() as u64;
                        }
                        // Without echo, only the generated tokens: those at or past the
                        // prompt's end (by offset for text, by count for token ids).
                        let from = if *echo {
                            0
                        } else if prompt_len > 0 {
                            tokens
                                .get(prompt_len)
                                .map_or(usize::MAX, |t| t.offset as usize)
                        } else {
                            s.text.len()
                        };
                        let joined: String = tokens.iter().map(|t| t.text.as_str()).collect();
                        let basis = if matches!(s.prompt, Prompt::Tokens(_)) {
                            &joined
                        } else {
                            &full
                        };
                        api::logprobs_object(&tokens, basis, from)
                    }
                };
                choices.push(json!({
                    "index": index,
                    "text": if *echo { full } else { text },
                    "logprobs": logprobs_value,
                    "finish_reason": finish,
                }));
            }
            _ => {}
        }
    }
    let (id, object) = match job.work {
        Work::Chat { .. } => ("chatcmpl", "chat.completion"),
        _ => ("cmpl", "text_completion"),
    };
    Ok(json!({
        "id": format!("{id}-{created}"),
        "object": object,
        "created": created,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
}
