//! `harness generate`: fine-tuning pairs written by a teacher, the paper's Algorithm 1
//! (`general`: broad pairs per subject, Listing 2) and Algorithm 2 (`targeted`: pairs for the
//! test questions the student gets wrong and the teacher right, Listing 3), through the quality
//! filters ([`filter`]), into a JSONL file `harness train --data` reads, with the provenance of
//! every pair and a record of the run beside it.
//!
//! The test questions come from the `mmlu` task plugin (its Listing-1 prompts, so the pairs are
//! trained on the very prompt format the student is evaluated with); the student and a model
//! teacher are backend plugins; `answer-key` is the offline teacher ([`teacher`]).

mod filter;
mod pair;
mod teacher;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use harness_abi::{ChoiceRequest, PluginKind, Request};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::json;

use crate::cli::GenerateArgs;
use crate::plan::{insert_pair, BackendFlags};
use crate::registry::{suggest, Registry};
use crate::run_dir::{self, write_atomic};
use filter::{Candidate, Counts};
use pair::Pair;
use teacher::{Model, PROMPT_VERSION};

/// The offline teacher's name.
const ANSWER_KEY: &str = "answer-key";
/// A generated question at least this alike a test question (by question text) is reported as
/// a near copy of it.
const NEAR_COPY: f64 = 0.8;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Method {
    General,
    Targeted,
}

/// One test question of the subject: its id, its Listing-1 prompt (the student's request) and
/// the question read back from it.
struct TestQuestion {
    id: String,
    subject: String,
    request: ChoiceRequest,
    pair: Pair,
}

/// Stops between batches on Ctrl-C; nothing is written (a served teacher's responses are in the
/// openai backend's cache, so a rerun costs nothing for what was asked).
pub fn check_interrupt() -> Result<()> {
    if crate::interrupt::requested() {
        bail!("interrupted: nothing written (run the command again; a cached teacher answers at once)");
    }
    Ok(())
}

/// The `.provenance.toml` beside a generated file.
pub fn provenance_path(out: &Path) -> PathBuf {
    out.with_extension("provenance.toml")
}

/// The record of one `harness generate` run, written beside the pairs.
#[derive(Debug, Serialize)]
struct Provenance {
    method: String,
    teacher: String,
    /// The teacher's model and its options as the backend resolved them (an API key is never
    /// among them: the openai backend records only the name of its variable).
    teacher_model: Option<String>,
    teacher_options: Option<String>,
    prompt_version: String,
    student_model: Option<String>,
    subjects: Vec<String>,
    data: String,
    seed: u64,
    similarity: f64,
    pairs_per_subject: Option<u64>,
    pairs_per_gap: Option<u64>,
    created: String,
    command: String,
    /// What the data is: the answer-key teacher's pairs, and any pair made from a test
    /// question, are that question leaked into training.
    label: String,
    counts: BTreeMap<String, SubjectRecord>,
    /// Test questions whose content is in the pairs (made from them, or nearly copied).
    leaked: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
struct SubjectRecord {
    questions: usize,
    student_right: Option<usize>,
    teacher_right: Option<usize>,
    gaps: Option<usize>,
    #[serde(flatten)]
    counts: Counts,
}

/// The generation arguments a study variant's `generate` table gives (the study sets `out` and
/// the student `model`); paths in it are resolved by `resolve`.
pub fn args_from_table(
    table: &toml::Table,
    resolve: impl Fn(&str) -> PathBuf,
    model: &Path,
    out: PathBuf,
) -> Result<GenerateArgs> {
    const KEYS: [&str; 12] = [
        "method",
        "subject",
        "teacher",
        "backend_options",
        "pairs",
        "per_gap",
        "limit",
        "similarity",
        "max_new_tokens",
        "batch",
        "seed",
        "data",
    ];
    for k in table.keys() {
        if !KEYS.contains(&k.as_str()) {
            let known: Vec<String> = KEYS.iter().map(|k| k.to_string()).collect();
            let hint = suggest(k, &known)
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            bail!("unknown key `{k}`{hint} (keys: {})", KEYS.join(", "));
        }
    }
    let text = |k: &str| -> Result<Option<String>> {
        match table.get(k) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => bail!("`{k}` must be text, got {v}"),
        }
    };
    let int = |k: &str| -> Result<Option<u64>> {
        match table.get(k) {
            None => Ok(None),
            Some(toml::Value::Integer(n)) if *n >= 0 => Ok(Some(*n as u64)),
            Some(v) => bail!("`{k}` must be a whole number, got {v}"),
        }
    };
    let required = |k: &str| -> Result<String> {
        text(k)?.ok_or_else(|| anyhow!("`{k}` is required (method, subject and teacher are)"))
    };
    let backend_options = match table.get("backend_options") {
        None => Vec::new(),
        Some(toml::Value::Table(t)) => t.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        Some(v) => bail!("`backend_options` must be a table, got {v}"),
    };
    let similarity = match table.get("similarity") {
        None => 0.9,
        Some(toml::Value::Float(x)) => *x,
        Some(toml::Value::Integer(n)) => *n as f64,
        Some(v) => bail!("`similarity` must be a number, got {v}"),
    };
    Ok(GenerateArgs {
        method: required("method")?,
        subject: required("subject")?,
        teacher: required("teacher")?,
        backend_options,
        pairs: int("pairs")?.unwrap_or(100),
        per_gap: int("per_gap")?.unwrap_or(3),
        student_backend: "candle".into(),
        model: Some(model.to_path_buf()),
        student_options: Vec::new(),
        adapter: None,
        data: text("data")?.map(|d| resolve(&d)),
        limit: int("limit")?,
        similarity,
        max_new_tokens: int("max_new_tokens")?.map_or(384, |n| n as u32),
        batch: int("batch")?.unwrap_or(8),
        seed: int("seed")?.unwrap_or(1234),
        out,
    })
}

/// Everything about `args` that can be wrong before any model loads (the output file aside).
/// Returns the teacher's backend options as the TOML its plugin reads.
pub fn check(reg: &Registry, args: &GenerateArgs) -> Result<toml::Table> {
    method(args)?;
    if !(0.0..=1.0).contains(&args.similarity) {
        bail!(
            "--similarity must be between 0 and 1, got {}",
            args.similarity
        );
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let answer_key = args.teacher == ANSWER_KEY;
    if answer_key && method(args)? == Method::General {
        bail!("the answer-key teacher writes targeted pairs only (it rewords test questions); use --method targeted, or a model teacher for general pairs");
    }
    if !answer_key {
        let mut known = reg.names(PluginKind::Backend);
        if !known.contains(&args.teacher) {
            known.push(ANSWER_KEY.into());
            let hint = suggest(&args.teacher, &known)
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            bail!(
                "unknown teacher `{}`{hint} (teachers: {})",
                args.teacher,
                known.join(", ")
            );
        }
    } else if !args.backend_options.is_empty() {
        bail!("--backend-option sets up a model teacher; the answer-key teacher takes none");
    }
    let mut table = toml::Table::new();
    for pair in &args.backend_options {
        insert_pair(&mut table, pair, "--backend-option")?;
    }
    Ok(table)
}

fn method(args: &GenerateArgs) -> Result<Method> {
    match args.method.as_str() {
        "general" => Ok(Method::General),
        "targeted" => Ok(Method::Targeted),
        other => bail!("--method must be `general` or `targeted`, not `{other}`"),
    }
}

pub fn run(reg: &Registry, args: &GenerateArgs, command_line: String) -> Result<()> {
    let teacher_table = check(reg, args)?;
    let method = method(args)?;
    if args.out.exists() {
        bail!(
            "{} already exists; choose another --out or remove it",
            args.out.display()
        );
    }
    let answer_key = args.teacher == ANSWER_KEY;
    crate::interrupt::install();

    let questions = test_questions(reg, args)?;
    let subjects: Vec<String> = {
        let mut s: Vec<String> = questions.iter().map(|q| q.subject.clone()).collect();
        s.dedup();
        s
    };
    let prefix = |subject: &str| -> String {
        let q = questions
            .iter()
            .find(|q| q.subject == subject)
            .expect("subject has questions");
        let at = q.request.context.rfind("Question: ").unwrap_or(0);
        q.request.context[..at].to_string()
    };

    let mut records: BTreeMap<String, SubjectRecord> = subjects
        .iter()
        .map(|s| {
            let n = questions.iter().filter(|q| &q.subject == s).count();
            (
                s.clone(),
                SubjectRecord {
                    questions: n,
                    ..Default::default()
                },
            )
        })
        .collect();

    // Algorithm 2's first half: who gets which test question right.
    let mut student_model = None;
    let mut gaps: Vec<&TestQuestion> = Vec::new();
    let mut student_right = vec![false; questions.len()];
    if method == Method::Targeted {
        let mut student_table = BackendFlags {
            model: args.model.as_deref(),
            adapter: args.adapter.as_deref(),
            ..Default::default()
        }
        .table();
        for pair in &args.student_options {
            insert_pair(&mut student_table, pair, "--student-option")?;
        }
        let (entry, backend) = reg.backend(&args.student_backend, &student_table.to_string())?;
        let mut student = Model {
            entry,
            backend,
            batch: args.batch as usize,
        };
        let info = entry.outcome(student.backend.info())?;
        student_model = Some(info.path.to_string());
        let bar = bar(questions.len(), "student answers");
        let reqs: Vec<ChoiceRequest> = questions.iter().map(|q| q.request.clone()).collect();
        let picks = student.choose(&reqs, &bar)?;
        bar.finish_and_clear();
        for (i, q) in questions.iter().enumerate() {
            student_right[i] = picks[i] == q.pair.answer;
        }
    }

    let mut teacher = if answer_key {
        None
    } else {
        let (entry, backend) = reg.backend(&args.teacher, &teacher_table.to_string())?;
        Some(Model {
            entry,
            backend,
            batch: args.batch as usize,
        })
    };
    let teacher_info = match &mut teacher {
        Some(t) => Some(t.entry.outcome(t.backend.info())?),
        None => None,
    };

    if method == Method::Targeted {
        let teacher_picks: Vec<Option<usize>> = match &mut teacher {
            None => questions.iter().map(|q| Some(q.pair.answer)).collect(),
            Some(t) => {
                let bar = bar(questions.len(), "teacher answers");
                let prompts: Vec<String> = questions
                    .iter()
                    .map(|q| q.request.context.to_string())
                    .collect();
                let replies = t.complete(&prompts, 4, &["\n"], &bar)?;
                bar.finish_and_clear();
                replies.iter().map(|r| pair::letter_in_reply(r)).collect()
            }
        };
        for (i, q) in questions.iter().enumerate() {
            let r = records.get_mut(&q.subject).expect("subject recorded");
            let teacher_ok = teacher_picks[i] == Some(q.pair.answer);
            *r.student_right.get_or_insert(0) += student_right[i] as usize;
            *r.teacher_right.get_or_insert(0) += teacher_ok as usize;
            if teacher_ok && !student_right[i] {
                *r.gaps.get_or_insert(0) += 1;
                gaps.push(q);
            }
        }
    }

    // New pairs, per subject, through the filters.
    let mut lines = Vec::new();
    let mut leaked: Vec<String> = Vec::new();
    for subject in &subjects {
        let record = records.get_mut(subject).expect("subject recorded");
        let raw: Vec<(Option<String>, String)>;
        let mut candidates: Vec<Candidate> = Vec::new();
        match (method, &mut teacher) {
            (Method::Targeted, None) => {
                for q in gaps.iter().filter(|q| &q.subject == subject) {
                    for turn in 0..args.per_gap as usize {
                        record.counts.asked += 1;
                        candidates.push(Candidate {
                            pair: teacher::reword(&q.pair, &q.id, turn, args.seed),
                            source: Some(q.id.clone()),
                        });
                    }
                }
            }
            (Method::Targeted, Some(t)) => {
                let sources: Vec<&&TestQuestion> =
                    gaps.iter().filter(|q| &q.subject == subject).collect();
                let firsts: Vec<String> = sources
                    .iter()
                    .map(|q| teacher::listing_3(subject, &q.pair))
                    .collect();
                raw = turns(
                    t,
                    &firsts,
                    args.per_gap as usize,
                    ("<question>", "</answer>"),
                    args.max_new_tokens,
                )?
                .into_iter()
                .map(|(chain, text)| (Some(sources[chain].id.clone()), text))
                .collect();
                parse_all(&raw, pair::from_question_answer, record, &mut candidates);
            }
            (Method::General, Some(t)) => {
                let chains = (args.batch as usize).min(args.pairs as usize).max(1);
                let first = teacher::listing_2(subject);
                let firsts: Vec<String> = (0..chains)
                    .map(|c| if chains == 1 { first.clone() } else {
                        format!("{first}\n\n(You are writing series {} of {chains}; make its pairs differ from the other series'.)", c + 1)
                    })
                    .collect();
                let per_chain = (args.pairs as usize).div_ceil(chains);
                let mut got = turns(
                    t,
                    &firsts,
                    per_chain,
                    ("<prompt>", "</response>"),
                    args.max_new_tokens,
                )?;
                got.truncate(args.pairs as usize);
                raw = got.into_iter().map(|(_, text)| (None, text)).collect();
                parse_all(&raw, pair::from_prompt_response, record, &mut candidates);
            }
            (Method::General, None) => unreachable!("refused above"),
        }

        let mut seen = Vec::new();
        let (kept, dups) = filter::dedupe(candidates, &mut seen, args.similarity);
        record.counts.duplicate = dups;
        let kept = match &mut teacher {
            // The answer key's pairs are its own questions reworded, relevant and solvable by
            // construction: both filters pass them all.
            None => kept,
            Some(t) => judge(t, subject, kept, &mut record.counts, &prefix(subject))?,
        };
        record.counts.kept = kept.len();

        let tests: Vec<(String, Pair)> = questions
            .iter()
            .filter(|q| &q.subject == subject)
            .map(|q| (q.id.clone(), q.pair.clone()))
            .collect();
        let header = prefix(subject);
        for c in kept {
            let near = filter::nearest_test(&c.pair, &tests, NEAR_COPY);
            let leak = c
                .source
                .clone()
                .or_else(|| near.map(|(id, _)| id.to_string()));
            if let Some(id) = &leak {
                if !leaked.contains(id) {
                    leaked.push(id.clone());
                }
            }
            lines.push(json!({
                "prompt": format!("{header}{}", c.pair.block()),
                "completion": format!(" {}\n", c.pair.answer_letter()),
                "group": subject,
                "question": c.pair.question,
                "choices": c.pair.options,
                "answer": c.pair.answer_letter().to_string(),
                "method": args.method,
                "teacher": args.teacher,
                "prompt_version": PROMPT_VERSION,
                "source": c.source,
                "leaked_from": leak,
                "near_test_similarity": near.map(|(_, s)| (s * 1000.0).round() / 1000.0),
            }));
        }
    }

    leaked.sort_by_key(|id| {
        questions
            .iter()
            .position(|q| &q.id == id)
            .unwrap_or(usize::MAX)
    });
    let (created, _) = run_dir::utc_now();
    let label = if answer_key {
        "test-data leakage: the answer-key teacher's pairs are test questions reworded".to_string()
    } else if method == Method::Targeted {
        "test-data leakage: targeted pairs are made from test questions (as the paper's are)"
            .to_string()
    } else if leaked.is_empty() {
        "teacher-generated; no pair is a near copy of a test question".to_string()
    } else {
        format!(
            "teacher-generated; {} pairs nearly copy a test question (see `leaked`)",
            leaked.len()
        )
    };
    let provenance = Provenance {
        method: args.method.clone(),
        teacher: args.teacher.clone(),
        teacher_model: teacher_info
            .as_ref()
            .map(|i| format!("{} ({})", i.name, i.path)),
        teacher_options: teacher_info
            .as_ref()
            .map(|i| i.resolved_options.to_string()),
        prompt_version: PROMPT_VERSION.into(),
        student_model,
        subjects: subjects.clone(),
        data: args
            .data
            .clone()
            .unwrap_or_else(harness_abi::paths::default_mmlu)
            .display()
            .to_string(),
        seed: args.seed,
        similarity: args.similarity,
        pairs_per_subject: (method == Method::General).then_some(args.pairs),
        pairs_per_gap: (method == Method::Targeted).then_some(args.per_gap),
        created,
        command: command_line,
        label,
        counts: records,
        leaked,
    };

    let total: usize = provenance.counts.values().map(|r| r.counts.kept).sum();
    if total == 0 {
        print_counts(&provenance);
        bail!("no pair passed the filters, so nothing was written (the counts above say which filter removed them)");
    }
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut body = String::new();
    for l in &lines {
        body.push_str(&serde_json::to_string(l)?);
        body.push('\n');
    }
    let record = toml::to_string(&provenance).context("cannot write the provenance record")?;
    write_atomic(&provenance_path(&args.out), record.as_bytes())?;
    write_atomic(&args.out, body.as_bytes())?;
    print_counts(&provenance);
    println!(
        "wrote {total} pairs to {} ({}); provenance in {}",
        args.out.display(),
        provenance.label,
        provenance_path(&args.out).display()
    );
    Ok(())
}

/// The subjects' test questions from the mmlu task (letter scoring, no shots: the Listing-1
/// prompt), each read back into a question with its options.
fn test_questions(reg: &Registry, args: &GenerateArgs) -> Result<Vec<TestQuestion>> {
    let mut options = toml::Table::new();
    options.insert("subject".into(), args.subject.clone().into());
    if let Some(d) = &args.data {
        options.insert("data".into(), d.display().to_string().into());
    }
    if let Some(l) = args.limit {
        options.insert("limit".into(), (l as i64).into());
    }
    let (entry, task) = reg.task("mmlu", &options.to_string())?;
    let instances = entry.outcome(task.eval_instances())?;
    let mut out = Vec::with_capacity(instances.len());
    for inst in instances {
        let Request::Choice(request) = inst.request else {
            bail!("mmlu instance {} is not multiple choice", inst.id);
        };
        let pair = pair::from_block(&request.context, &inst.target)
            .map_err(|e| anyhow!("mmlu question {} cannot be read back: {e}", inst.id))?;
        out.push(TestQuestion {
            id: inst.id.to_string(),
            subject: inst.group.to_string(),
            request,
            pair,
        });
    }
    if out.is_empty() {
        bail!("the subject `{}` has no test questions", args.subject);
    }
    Ok(out)
}

/// Conversations of `turns` turns, one per first prompt, run side by side: every turn sends
/// one request per conversation (a batch), each shown its own earlier replies. Returns
/// (conversation, reply) in turn order.
fn turns(
    t: &mut Model,
    firsts: &[String],
    turns: usize,
    tag: (&str, &str),
    max_new_tokens: u32,
) -> Result<Vec<(usize, String)>> {
    let bar = bar(firsts.len() * turns, "teacher writes pairs");
    let mut history: Vec<Vec<String>> = vec![Vec::new(); firsts.len()];
    let mut out = Vec::new();
    for turn in 1..=turns {
        let prompts: Vec<String> = firsts
            .iter()
            .zip(&history)
            .map(|(f, h)| teacher::next_turn(f, h, turn, tag))
            .collect();
        let replies = t.complete(&prompts, max_new_tokens, &[], &bar)?;
        for (c, r) in replies.into_iter().enumerate() {
            history[c].push(r.clone());
            out.push((c, r));
        }
    }
    bar.finish_and_clear();
    // Conversation-major order: a conversation's pairs together, as asked.
    out.sort_by_key(|(c, _)| *c);
    Ok(out)
}

/// The well-formedness filter over the teacher's replies.
fn parse_all(
    raw: &[(Option<String>, String)],
    parse: fn(&str) -> Result<Pair, pair::Malformed>,
    record: &mut SubjectRecord,
    out: &mut Vec<Candidate>,
) {
    for (source, text) in raw {
        record.counts.asked += 1;
        match parse(text) {
            Ok(pair) => out.push(Candidate {
                pair,
                source: source.clone(),
            }),
            Err(_) => record.counts.malformed += 1,
        }
    }
}

/// The relevance and solvability filters of a model teacher: asked whether each question is
/// about the subject (kept on "yes"), then asked the question alone with the Listing-1 prompt
/// (kept when it gives the stated answer).
fn judge(
    t: &mut Model,
    subject: &str,
    kept: Vec<Candidate>,
    counts: &mut Counts,
    header: &str,
) -> Result<Vec<Candidate>> {
    let bar = bar(kept.len() * 2, "teacher checks pairs");
    let prompts: Vec<String> = kept
        .iter()
        .map(|c| teacher::relevance_prompt(subject, &c.pair))
        .collect();
    let verdicts = t.complete(&prompts, 3, &["\n"], &bar)?;
    let (relevant, irrelevant): (Vec<_>, Vec<_>) = kept
        .into_iter()
        .zip(verdicts)
        .partition(|(_, v)| teacher::says_yes(v));
    counts.irrelevant = irrelevant.len();
    let relevant: Vec<Candidate> = relevant.into_iter().map(|(c, _)| c).collect();
    let prompts: Vec<String> = relevant
        .iter()
        .map(|c| format!("{header}{}", c.pair.block()))
        .collect();
    bar.inc((counts.irrelevant) as u64);
    let answers = t.complete(&prompts, 4, &["\n"], &bar)?;
    bar.finish_and_clear();
    let (solvable, unsolvable): (Vec<_>, Vec<_>) = relevant
        .into_iter()
        .zip(answers)
        .partition(|(c, a)| pair::letter_in_reply(a) == Some(c.pair.answer));
    counts.unsolvable = unsolvable.len();
    Ok(solvable.into_iter().map(|(c, _)| c).collect())
}

fn print_counts(p: &Provenance) {
    println!(
        "{:<28} {:>9} {:>8} {:>8} {:>5} | {:>5} {:>9} {:>9} {:>10} {:>10} {:>5}",
        "subject",
        "questions",
        "student",
        "teacher",
        "gaps",
        "asked",
        "malformed",
        "duplicate",
        "irrelevant",
        "unsolvable",
        "kept"
    );
    let opt = |x: Option<usize>| x.map_or("-".to_string(), |v| v.to_string());
    for (s, r) in &p.counts {
        println!(
            "{:<28} {:>9} {:>8} {:>8} {:>5} | {:>5} {:>9} {:>9} {:>10} {:>10} {:>5}",
            s,
            r.questions,
            opt(r.student_right),
            opt(r.teacher_right),
            opt(r.gaps),
            r.counts.asked,
            r.counts.malformed,
            r.counts.duplicate,
            r.counts.irrelevant,
            r.counts.unsolvable,
            r.counts.kept
        );
    }
    if !p.leaked.is_empty() {
        println!("test questions leaked into the pairs: {}", p.leaked.len());
    }
}

fn bar(len: usize, what: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} [{elapsed}<{eta}]")
    {
        bar.set_style(style);
    }
    bar.set_message(what);
    bar
}
