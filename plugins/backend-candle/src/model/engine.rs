//! Answering requests with a loaded model: greedy generation (batched decoding with a KV
//! cache, stop strings, token limit) and log-likelihood scoring of continuations.
//!
//! Prompts that share a prefix with the previous one (the instruction and few-shot examples of
//! an eval) reuse its cached keys and values instead of recomputing them: the engine keeps the
//! cache of the last prompt it ran and starts each new prompt after their common prefix.
//! Logits are computed only for the positions that are read (the last prompt token, the
//! continuation tokens), never for the whole prompt.

use std::time::Instant;

use candle_core::{IndexOp, Tensor, D};
use harness_abi::abi_stable::std_types::{ROption, RVec};
use harness_abi::{BackendStats, ChoiceScore, Generation, Prompt, PromptToken, TokenLogprob};
use tokenizers::Tokenizer;

use crate::error::{BackendError, Result};
use crate::model::llama::{KvCache, Llama};

pub struct Engine {
    model: Llama,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    /// Token ids and cache of the last prompt run, for prefix reuse.
    last: Option<(Vec<u32>, KvCache)>,
    stats: BackendStats,
    max_batch: usize,
}

/// One row of a decoding batch.
struct Row {
    /// Index of the request in the caller's list.
    index: usize,
    prompt_len: usize,
    generated: Vec<u32>,
    text: String,
    max_new: usize,
    stop: Vec<String>,
}

impl Engine {
    pub fn new(model: Llama, tokenizer: Tokenizer, eos: Vec<u32>, max_batch: usize) -> Self {
        Engine {
            model,
            tokenizer,
            eos,
            last: None,
            stats: BackendStats::default(),
            max_batch: max_batch.max(1),
        }
    }

    pub fn stats(&self) -> BackendStats {
        self.stats
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model, for changes such as quantization or adapters; forgets cached prefixes, which
    /// the change makes stale.
    pub fn model_mut(&mut self) -> &mut Llama {
        self.last = None;
        &mut self.model
    }

    /// Token ids of `text`, without special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| BackendError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// The text of `ids` with special tokens kept.
    pub fn decode_all(&self, ids: &[u32]) -> Result<String> {
        let vocab = self.tokenizer.get_vocab_size(true) as u32;
        if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
            return Err(BackendError::Options(format!(
                "token id {bad} is outside the vocabulary of {vocab} tokens"
            )));
        }
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| BackendError::Tokenizer(e.to_string()))
    }

    /// The text of the first end-of-sequence token.
    pub fn eos_text(&self) -> Option<String> {
        self.eos
            .first()
            .and_then(|&e| self.tokenizer.id_to_token(e))
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| BackendError::Tokenizer(e.to_string()))
    }

    /// Runs `ids` from scratch or after the longest reusable cached prefix and returns the
    /// sequence's cache and the logits of positions `from..to`, shape (to - from, vocab).
    pub fn prefill(&mut self, ids: &[u32], from: usize, to: usize) -> Result<(KvCache, Tensor)> {
        debug_assert!(from < to && to <= ids.len());
        let start = Instant::now();
        let (reuse, mut cache) = match &self.last {
            Some((prev, cache)) => {
                let common = prev.iter().zip(ids).take_while(|(a, b)| a == b).count();
                let reuse = common.min(from);
                (reuse, cache.truncated(reuse)?)
            }
            None => (0, KvCache::default()),
        };
        let hidden = self
            .model
            .forward(&[ids[reuse..].to_vec()], &[reuse], None, &mut cache)?;
        let rows = hidden.i((0, from - reuse..to - reuse))?;
        let logits = self.model.logits(&rows.contiguous()?)?;
        self.last = Some((ids.to_vec(), cache.clone()));
        self.stats.prompt_tokens += (ids.len() - reuse) as u64;
        self.stats.reused_prefix_tokens += reuse as u64;
        self.stats.prompt_seconds += start.elapsed().as_secs_f64();
        Ok((cache, logits))
    }

    /// Runs the prompts of one decoding batch as one forward pass and returns their cache
    /// (row r real up to `prompts[r].len()`, right-padded after) and each row's greedy next
    /// token.
    ///
    /// The prefix every prompt shares (an eval's instruction, and its shots when they are the
    /// same) is computed once, or reused from the previous call, and copied to each row; the
    /// rest of each prompt is padded on the right to the longest, so the padding comes after
    /// every real token and causal attention never reads it. Batching the prompts turns many
    /// thin products into one tall one, which keeps the matmul kernels busy.
    fn prefill_rows(&mut self, prompts: &[Vec<u32>]) -> Result<(KvCache, Vec<u32>)> {
        let shortest = prompts.iter().map(Vec::len).min().unwrap_or(0);
        // Every row keeps at least its last token to run, whose logits give the next token.
        // A lone prompt: the part the previous prompt already computed.
        let against: Vec<&[u32]> = match (prompts.len(), &self.last) {
            (1, Some((prev, _))) => vec![prev],
            (1, None) => vec![&[]],
            _ => prompts[1..].iter().map(Vec::as_slice).collect(),
        };
        let shared = against
            .iter()
            .map(|p| {
                p.iter()
                    .zip(&prompts[0])
                    .take_while(|(a, b)| a == b)
                    .count()
            })
            .min()
            .unwrap_or(0)
            .min(shortest - 1);
        let start = Instant::now();
        let prefix = self.prefix_cache(&prompts[0][..shared])?;
        let mut cache = if prompts.len() == 1 {
            prefix
        } else {
            KvCache::stack(&vec![prefix; prompts.len()])?
        };
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let rest: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let mut row = p[shared..].to_vec();
                // Padding repeats the last token: any real id keeps the padded keys finite.
                row.resize(longest - shared, *p.last().expect("prompts are not empty"));
                row
            })
            .collect();
        let hidden = self
            .model
            .forward(&rest, &vec![shared; prompts.len()], None, &mut cache)?;
        if let [only] = prompts {
            // A lone prompt's whole cache (no padding) is the next call's reusable prefix.
            self.last = Some((only.clone(), cache.clone()));
        }
        let last: Vec<Tensor> = prompts
            .iter()
            .enumerate()
            .map(|(r, p)| hidden.i((r, p.len() - shared - 1)))
            .collect::<candle_core::Result<_>>()?;
        let logits = self.model.logits(&Tensor::stack(&last, 0)?)?;
        let first = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let computed: usize = prompts.iter().map(|p| p.len() - shared).sum();
        self.stats.prompt_tokens += computed as u64;
        self.stats.reused_prefix_tokens += (shared * (prompts.len() - 1)) as u64;
        self.stats.prompt_seconds += start.elapsed().as_secs_f64();
        Ok((cache, first))
    }

    /// The cache of `ids` alone (empty for no ids), computed after the longest prefix it shares
    /// with the last prompt run, and kept as the last prompt.
    fn prefix_cache(&mut self, ids: &[u32]) -> Result<KvCache> {
        if ids.is_empty() {
            return Ok(KvCache::default());
        }
        let (reuse, mut cache) = match &self.last {
            Some((prev, cache)) => {
                let common = prev.iter().zip(ids).take_while(|(a, b)| a == b).count();
                (common, cache.truncated(common)?)
            }
            None => (0, KvCache::default()),
        };
        if reuse < ids.len() {
            self.model
                .forward(&[ids[reuse..].to_vec()], &[reuse], None, &mut cache)?;
            self.stats.prompt_tokens += (ids.len() - reuse) as u64;
        }
        self.stats.reused_prefix_tokens += reuse as u64;
        self.last = Some((ids.to_vec(), cache.clone()));
        Ok(cache)
    }

    /// Greedy generation for every request, in request order.
    pub fn generate(
        &mut self,
        requests: &[harness_abi::GenerateRequest],
    ) -> Result<Vec<Generation>> {
        let limit = self.model.config().max_position_embeddings;
        let mut prompts = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            let ids = self.encode(r.prompt.as_str())?;
            if ids.is_empty() {
                return Err(BackendError::Options(format!(
                    "request {i} has an empty prompt; a prompt needs at least one token"
                )));
            }
            if ids.len() >= limit {
                return Err(BackendError::TooLong {
                    tokens: ids.len(),
                    limit,
                });
            }
            prompts.push(ids);
        }
        // Batches of similar lengths pad less; the order of the answers is the requests'.
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by_key(|&i| prompts[i].len());
        let mut out: Vec<Option<Generation>> = vec![None; requests.len()];
        for chunk in order.chunks(self.max_batch) {
            for (i, g) in self.generate_batch(requests, &prompts, chunk)? {
                out[i] = Some(g);
            }
        }
        Ok(out
            .into_iter()
            .map(|g| g.expect("every request answered"))
            .collect())
    }

    /// Decodes the requests `chunk` (indices into `requests` and their token ids `all`) as one
    /// batch.
    fn generate_batch(
        &mut self,
        requests: &[harness_abi::GenerateRequest],
        all: &[Vec<u32>],
        chunk: &[usize],
    ) -> Result<Vec<(usize, Generation)>> {
        let limit = self.model.config().max_position_embeddings;
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| all[i].clone()).collect();
        let (mut cache, first) = self.prefill_rows(&prompts)?;
        let mut rows = Vec::new();
        let mut keep = Vec::new();
        let mut next = Vec::new();
        let mut done = Vec::new();
        for (r, (&i, ids)) in chunk.iter().zip(&prompts).enumerate() {
            let req = &requests[i];
            let mut row = Row {
                index: i,
                prompt_len: ids.len(),
                generated: Vec::new(),
                text: String::new(),
                max_new: (req.max_new_tokens as usize).min(limit - ids.len()),
                stop: req.stop.iter().map(|s| s.to_string()).collect(),
            };
            if row.max_new == 0 || self.push(&mut row, first[r])? {
                done.push(row);
            } else {
                next.push(first[r]);
                keep.push(r as u32);
                rows.push(row);
            }
        }
        if !rows.is_empty() && rows.len() < prompts.len() {
            cache = cache.select_rows(&keep)?;
        }

        let start = Instant::now();
        let mut generated_here = 0u64;
        if !rows.is_empty() {
            // valid[r][j]: whether cached position j of row r is real, not padding.
            let longest = cache.len();
            let mut valid: Vec<Vec<bool>> = rows
                .iter()
                .map(|r| (0..longest).map(|j| j < r.prompt_len).collect())
                .collect();
            while !rows.is_empty() {
                let tokens: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
                let positions: Vec<usize> = rows
                    .iter()
                    .map(|r| r.prompt_len + r.generated.len() - 1)
                    .collect();
                let padded = valid.iter().any(|v| v.iter().any(|ok| !ok));
                let hidden = self.model.forward(
                    &tokens,
                    &positions,
                    padded.then_some(valid.as_slice()),
                    &mut cache,
                )?;
                let (b, _, h) = hidden.dims3()?;
                let logits = self.model.logits(&hidden.reshape((b, h))?)?;
                let best = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
                generated_here += rows.len() as u64;
                for v in valid.iter_mut() {
                    v.push(true);
                }
                let mut keep = Vec::new();
                let mut kept_rows = Vec::new();
                let mut kept_valid = Vec::new();
                let mut kept_next = Vec::new();
                for (r, (mut row, v)) in rows.drain(..).zip(valid.drain(..)).enumerate() {
                    if self.push(&mut row, best[r])? {
                        done.push(row);
                    } else {
                        keep.push(r as u32);
                        kept_next.push(best[r]);
                        kept_rows.push(row);
                        kept_valid.push(v);
                    }
                }
                if kept_rows.len() < b && !kept_rows.is_empty() {
                    cache = cache.select_rows(&keep)?;
                }
                rows = kept_rows;
                valid = kept_valid;
                next = kept_next;
            }
        }
        self.stats.generated_tokens += generated_here;
        self.stats.generate_seconds += start.elapsed().as_secs_f64();

        done.into_iter()
            .map(|row| {
                Ok((
                    row.index,
                    Generation {
                        text: row.text.into(),
                        prompt_tokens: row.prompt_len as u32,
                        generated_tokens: row.generated.len() as u32,
                    },
                ))
            })
            .collect()
    }

    /// Appends `token` to `row`; returns whether the row is finished.
    fn push(&self, row: &mut Row, token: u32) -> Result<bool> {
        if self.eos.contains(&token) {
            return Ok(true);
        }
        row.generated.push(token);
        row.text = self.decode(&row.generated)?;
        if let Some(cut) = row
            .stop
            .iter()
            .filter_map(|s| row.text.find(s.as_str()))
            .min()
        {
            row.text.truncate(cut);
            return Ok(true);
        }
        Ok(row.generated.len() >= row.max_new)
    }

    /// Log-likelihood of each option after `context`.
    pub fn score_choices(&mut self, context: &str, options: &[String]) -> Result<Vec<ChoiceScore>> {
        let ctx = self.encode(context)?;
        if ctx.is_empty() {
            return Err(BackendError::Options(
                "a multiple-choice request has an empty context".into(),
            ));
        }
        let encoded: Vec<Vec<u32>> = options
            .iter()
            .map(|o| self.encode(o))
            .collect::<Result<_>>()?;
        if let Some(empty) = encoded.iter().position(Vec::is_empty) {
            return Err(BackendError::Options(format!(
                "option {:?} has no tokens",
                options[empty]
            )));
        }
        // Single-token options (letters) all read the same next-token distribution: one pass.
        if encoded.iter().all(|o| o.len() == 1) {
            let (_, logits) = self.prefill(&ctx, ctx.len() - 1, ctx.len())?;
            let logp = candle_nn::ops::log_softmax(&logits.i(0)?, D::Minus1)?.to_vec1::<f32>()?;
            let best = argmax(&logits.i(0)?)?;
            return Ok(encoded
                .iter()
                .map(|o| ChoiceScore {
                    logprob: f64::from(logp[o[0] as usize]),
                    n_tokens: 1,
                    is_greedy: o[0] == best,
                })
                .collect());
        }
        let mut out = Vec::with_capacity(options.len());
        for opt in encoded {
            let ids: Vec<u32> = ctx.iter().chain(&opt).copied().collect();
            let (_, logits) = self.prefill(&ids, ctx.len() - 1, ids.len() - 1)?;
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let targets = Tensor::new(opt.as_slice(), logp.device())?.unsqueeze(1)?;
            let picked = logp.gather(&targets, 1)?.squeeze(1)?.to_vec1::<f32>()?;
            let greedy = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            out.push(ChoiceScore {
                logprob: picked.iter().map(|&x| f64::from(x)).sum(),
                n_tokens: opt.len() as u32,
                is_greedy: greedy == opt,
            });
        }
        Ok(out)
    }

    /// The `top` most likely next tokens after `text`, with log-probabilities.
    pub fn next_token_logprobs(&mut self, text: &str, top: usize) -> Result<Vec<(u32, f64)>> {
        let ids = self.encode(text)?;
        if ids.is_empty() {
            return Err(BackendError::Options("the text has no tokens".into()));
        }
        let (_, logits) = self.prefill(&ids, ids.len() - 1, ids.len())?;
        let logp = candle_nn::ops::log_softmax(&logits.i(0)?, D::Minus1)?.to_vec1::<f32>()?;
        let mut order: Vec<usize> = (0..logp.len()).collect();
        order.sort_by(|&a, &b| logp[b].total_cmp(&logp[a]).then(a.cmp(&b)));
        Ok(order
            .into_iter()
            .take(top)
            .map(|i| (i as u32, f64::from(logp[i])))
            .collect())
    }

    /// Every token of the prompt with log p(token | the tokens before) (none for the first)
    /// and the `top` most likely tokens at its position. A text prompt's tokens are the spans
    /// between their offsets, so they concatenate to the text; token ids are scored as given,
    /// each with its own text.
    pub fn prompt_logprobs(&mut self, prompt: &Prompt, top: usize) -> Result<Vec<PromptToken>> {
        let (ids, texts, starts): (Vec<u32>, Vec<String>, Vec<usize>) = match prompt {
            Prompt::Text(text) => {
                let text = text.as_str();
                let encoding = self
                    .tokenizer
                    .encode(text, false)
                    .map_err(|e| BackendError::Tokenizer(e.to_string()))?;
                let mut starts: Vec<usize> = encoding.get_offsets().iter().map(|o| o.0).collect();
                if let Some(first) = starts.first_mut() {
                    *first = 0;
                }
                let texts = (0..starts.len())
                    .map(|i| {
                        let to = starts.get(i + 1).copied().unwrap_or(text.len());
                        text.get(starts[i]..to.max(starts[i]))
                            .unwrap_or_default()
                            .to_string()
                    })
                    .collect();
                (encoding.get_ids().to_vec(), texts, starts)
            }
            Prompt::Tokens(ids) => {
                let vocab = self.tokenizer.get_vocab_size(true) as u32;
                if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
                    return Err(BackendError::Options(format!(
                        "token id {bad} is outside the vocabulary of {vocab} tokens"
                    )));
                }
                let texts: Vec<String> = ids
                    .iter()
                    .map(|&i| {
                        self.tokenizer
                            .decode(&[i], false)
                            .map_err(|e| BackendError::Tokenizer(e.to_string()))
                    })
                    .collect::<Result<_>>()?;
                let mut starts = Vec::with_capacity(texts.len());
                let mut at = 0;
                for t in &texts {
                    starts.push(at);
                    at += t.len();
                }
                (ids.to_vec(), texts, starts)
            }
        };
        if ids.is_empty() {
            return Err(BackendError::Options("the prompt has no tokens".into()));
        }
        let mut out = vec![PromptToken {
            id: ids[0],
            text: texts[0].as_str().into(),
            offset: 0,
            logprob: ROption::RNone,
            top: RVec::new(),
        }];
        if ids.len() > 1 {
            let (_, logits) = self.prefill(&ids, 0, ids.len() - 1)?;
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
            for (i, row) in logp.iter().enumerate() {
                let id = ids[i + 1];
                let mut order: Vec<usize> = (0..row.len()).collect();
                let top = top.min(row.len());
                if top > 0 {
                    order.select_nth_unstable_by(top - 1, |&a, &b| {
                        row[b].total_cmp(&row[a]).then(a.cmp(&b))
                    });
                    order.truncate(top);
                    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                } else {
                    order.clear();
                }
                let alternatives = order
                    .into_iter()
                    .map(|t| {
                        Ok(TokenLogprob {
                            id: t as u32,
                            text: self
                                .tokenizer
                                .decode(&[t as u32], false)
                                .map_err(|e| BackendError::Tokenizer(e.to_string()))?
                                .into(),
                            logprob: f64::from(row[t]),
                        })
                    })
                    .collect::<Result<RVec<_>>>()?;
                out.push(PromptToken {
                    id,
                    text: texts[i + 1].as_str().into(),
                    offset: starts[i + 1] as u32,
                    logprob: ROption::RSome(f64::from(row[id as usize])),
                    top: alternatives,
                });
            }
        }
        Ok(out)
    }

    /// Raw logits of the next token after `ids` (for tests against reference logits).
    pub fn next_token_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let (_, logits) = self.prefill(ids, ids.len() - 1, ids.len())?;
        Ok(logits.i(0)?.to_vec1::<f32>()?)
    }

    /// Log p(ids[i+1] | ids[..=i]) for every i (for tests against reference log-probs).
    pub fn token_logprobs(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let (_, logits) = self.prefill(ids, 0, ids.len() - 1)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets = Tensor::new(&ids[1..], logp.device())?.unsqueeze(1)?;
        Ok(logp.gather(&targets, 1)?.squeeze(1)?.to_vec1::<f32>()?)
    }
}

fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?)
}
