//! `harness generate`: the paper's Algorithm 2 with the offline answer-key teacher (pairs that
//! train, provenance, leakage recorded, deterministic), and Algorithm 1 through the openai
//! backend against a scripted teacher whose every reply exercises one quality filter.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;

fn mmlu_data(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("test")).unwrap();
    std::fs::write(
        data.join("test/machine_learning_test.csv"),
        "Which method reduces variance by averaging many trees?,Boosting,Bagging,Pruning,Stacking,B\n\
         What does SGD stand for?,Stochastic gradient descent,Slow gradient descent,Sparse gradient,None,A\n\
         Which activation is zero for negative inputs?,Sigmoid,Tanh,ReLU,Softmax,C\n\
         What is overfitting?,Fitting noise,Fitting nothing,Fast fitting,Underfitting,A\n\
         Which norm gives sparse weights?,L2,L1,L-infinity,Frobenius,B\n\
         What does PCA find?,Clusters,Labels,Directions of most variance,Outliers,C\n",
    )
    .unwrap();
    data
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn targeted_pairs_from_the_answer_key_train_and_say_what_leaked() {
    let dir = temp_dir("generate-targeted");
    let model = dir.join("model");
    write_tiny_model(&model, 5);
    let data = mmlu_data(&dir);
    let generate = |out: &Path| {
        let mut c = harness();
        c.args([
            "generate",
            "--method",
            "targeted",
            "--subject",
            "machine_learning",
        ])
        .args(["--teacher", "answer-key", "--per-gap", "3", "--data"])
        .arg(&data)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(out);
        c
    };
    let out = dir.join("pairs/ml-leak.jsonl");
    let printed = ok(&mut generate(&out));
    assert!(printed.contains("test-data leakage"), "{printed}");
    let pairs = lines(&out);
    let record: toml::Table = std::fs::read_to_string(dir.join("pairs/ml-leak.provenance.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let counts = record["counts"]["machine_learning"].as_table().unwrap();
    let n = |k: &str| counts[k].as_integer().unwrap() as usize;
    assert_eq!(n("questions"), 6);
    assert_eq!(n("teacher_right"), 6, "the answer key is always right");
    assert_eq!(n("gaps"), 6 - n("student_right"));
    assert!(n("gaps") > 0, "the random student gets some wrong");
    assert_eq!(n("asked"), 3 * n("gaps"));
    assert_eq!(n("kept"), n("asked") - n("duplicate") - n("malformed"));
    assert_eq!(pairs.len(), n("kept"));
    let leaked: Vec<&str> = record["leaked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(leaked.len(), n("gaps"));
    for p in &pairs {
        // Trained on the evaluation's own prompt format, answer letter as the completion.
        let prompt = p["prompt"].as_str().unwrap();
        assert!(
            prompt.starts_with("You are an expert in machine learning."),
            "{prompt}"
        );
        assert!(prompt.ends_with("Answer:"));
        let letter = p["answer"].as_str().unwrap();
        assert_eq!(p["completion"], format!(" {letter}\n"));
        let index = (letter.as_bytes()[0] - b'A') as usize;
        let right = p["choices"][index].as_str().unwrap();
        let source = p["source"].as_str().unwrap();
        assert_eq!(p["leaked_from"], source);
        assert!(leaked.contains(&source));
        assert_eq!(p["teacher"], "answer-key");
        assert_eq!(p["prompt_version"], "paper-listings-v1");
        // The source question's right answer is the pair's right answer.
        let source_row: usize = source.rsplit('-').next().unwrap().parse().unwrap();
        let csv = std::fs::read_to_string(data.join("test/machine_learning_test.csv")).unwrap();
        let row: Vec<&str> = csv.lines().nth(source_row).unwrap().split(',').collect();
        let key = (row[5].as_bytes()[0] - b'A') as usize + 1;
        assert_eq!(right, row[key], "{p}");
    }
    // Deterministic; and an existing file is never overwritten.
    let again = dir.join("pairs/again.jsonl");
    ok(&mut generate(&again));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
    let e = fails(&mut generate(&out));
    assert!(e.contains("already exists"), "{e}");

    // The pairs train an adapter.
    ok(harness()
        .args(["train", "--data"])
        .arg(&out)
        .arg("--model")
        .arg(&model)
        .args(["--epochs", "1", "--r", "4", "--out"])
        .arg(dir.join("adapter")));
    assert!(dir.join("adapter/adapter_model.safetensors").exists());

    // Refusals, before any model loads.
    let e = fails(harness().args([
        "generate",
        "--method",
        "general",
        "--subject",
        "machine_learning",
        "--teacher",
        "answer-key",
        "--out",
        "/tmp/never.jsonl",
    ]));
    assert!(e.contains("targeted pairs only"), "{e}");
    let e = fails(harness().args([
        "generate",
        "--method",
        "targeted",
        "--subject",
        "machine_learning",
        "--teacher",
        "answer-kee",
        "--out",
        "/tmp/never.jsonl",
    ]));
    assert!(e.contains("did you mean `answer-key`"), "{e}");
    let e = fails(harness().args([
        "generate",
        "--method",
        "sideways",
        "--subject",
        "x",
        "--teacher",
        "answer-key",
        "--out",
        "/tmp/never.jsonl",
    ]));
    assert!(e.contains("`general` or `targeted`"), "{e}");
}

/// The scripted teacher's Listing-2 replies, one per turn: each meets one filter.
const REPLIES: [&str; 6] = [
    "<prompt>Which loss is used for classification?\nA. MSE\nB. Cross-entropy\nC. L1\nD. Huber</prompt>\n<response>B</response>",
    "<prompt>Which loss is used for classification ?\nA. MSE\nB. Cross-entropy\nC. L1\nD. Huber</prompt>\n<response>B</response>",
    "I would rather not write a question.",
    "<prompt>What colour is a ripe banana?\nA. Blue\nB. Yellow\nC. Red\nD. Black</prompt>\n<response>B</response>",
    "<prompt>This unsolvable question asks which number is largest?\nA. 1\nB. 3\nC. 2\nD. 0</prompt>\n<response>B</response>",
    "<prompt>Which method reduces variance by averaging many trees?\nA. Boosting\nB. Bagging\nC. Pruning\nD. Stacking</prompt>\n<response>Bagging</response>",
];

/// The scripted teacher's Listing-3 replies, one per turn (each answered B).
const TARGETED: [&str; 2] = [
    "<question>Which ensemble trains each model on a bootstrap sample? A. Boosting B. Bagging C. Pruning D. Stacking</question>\n<answer>B</answer>",
    "<question>Random forests extend which idea with random feature subsets?\nA) Gradient descent\nB) Bootstrap aggregation\nC) Dropout\nD) Early stopping</question>\n<answer>(B)</answer>",
];

/// A teacher speaking the OpenAI completions API: Listing 2 gets the reply of its turn, the
/// relevance question "no" for bananas, and a question asked alone its answer (B), except the
/// unsolvable one (C).
fn scripted_teacher() -> String {
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let addr = server.server_addr().to_ip().unwrap();
    std::thread::spawn(move || {
        for mut request in server.incoming_requests() {
            let mut body = String::new();
            let _ = request.as_reader().read_to_string(&mut body);
            let reply = if request.url().ends_with("/models") {
                serde_json::json!({"data": [{"id": "scripted"}]})
            } else {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                let prompt = v["prompt"].as_str().unwrap();
                let turn_of = |p: &str| {
                    p.split("This is turn ")
                        .nth(1)
                        .and_then(|s| s.split('.').next())
                        .map_or(1, |t| t.parse::<usize>().unwrap())
                };
                let text = if prompt.starts_with("You are an advanced AI model") {
                    // Listing 3: a new pair per turn, on the question's own subject.
                    TARGETED[turn_of(prompt) - 1].to_string()
                } else if prompt.starts_with("You are generating data") {
                    REPLIES[turn_of(prompt) - 1].to_string()
                } else if prompt.starts_with("Is the following multiple-choice question") {
                    if prompt.contains("banana") {
                        " no"
                    } else {
                        " yes"
                    }
                    .to_string()
                } else if prompt.contains("unsolvable") {
                    " C".to_string()
                } else {
                    " B".to_string()
                };
                serde_json::json!({"choices": [{"index": 0, "text": text}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
            };
            let _ = request.respond(tiny_http::Response::from_string(reply.to_string()));
        }
    });
    format!("http://{addr}/v1")
}

#[test]
fn general_pairs_from_a_served_teacher_pass_each_filter_counted() {
    let dir = temp_dir("generate-general");
    let data = mmlu_data(&dir);
    let base_url = scripted_teacher();
    let out = dir.join("ml-general.jsonl");
    let printed = ok(harness()
        .args([
            "generate",
            "--method",
            "general",
            "--subject",
            "machine_learning",
            "--pairs",
            "6",
        ])
        .args(["--batch", "1", "--teacher", "openai", "--backend-option"])
        .arg(format!("base_url={base_url}"))
        .args(["--backend-option", "cache=false", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&out));
    let record: toml::Table = std::fs::read_to_string(dir.join("ml-general.provenance.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let counts = record["counts"]["machine_learning"].as_table().unwrap();
    let n = |k: &str| counts[k].as_integer().unwrap();
    assert_eq!(
        [
            n("asked"),
            n("malformed"),
            n("duplicate"),
            n("irrelevant"),
            n("unsolvable"),
            n("kept")
        ],
        [6, 1, 1, 1, 1, 2],
        "{printed}"
    );
    assert_eq!(
        record["teacher_model"].as_str().unwrap(),
        format!("scripted ({base_url})")
    );
    let pairs = lines(&out);
    assert_eq!(
        pairs[0]["question"],
        "Which loss is used for classification?"
    );
    assert_eq!(pairs[0]["completion"], " B\n");
    assert!(pairs[0]["source"].is_null() && pairs[0]["leaked_from"].is_null());
    // The last nearly copies a test question: kept, and reported as leaked.
    assert_eq!(pairs[1]["answer"], "B");
    assert_eq!(pairs[1]["leaked_from"], "machine_learning-0");
    assert_eq!(record["leaked"].as_array().unwrap().len(), 1);
}

#[test]
fn targeted_pairs_from_a_served_teacher_cover_the_gaps_it_can_answer() {
    let dir = temp_dir("generate-targeted-teacher");
    let model = dir.join("model");
    write_tiny_model(&model, 5);
    let data = mmlu_data(&dir);
    let base_url = scripted_teacher();
    let out = dir.join("ml-targeted.jsonl");
    ok(harness()
        .args([
            "generate",
            "--method",
            "targeted",
            "--subject",
            "machine_learning",
            "--per-gap",
            "2",
        ])
        .args(["--teacher", "openai", "--backend-option"])
        .arg(format!("base_url={base_url}"))
        .args(["--backend-option", "cache=false", "--data"])
        .arg(&data)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&out));
    let record: toml::Table = std::fs::read_to_string(dir.join("ml-targeted.provenance.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let counts = record["counts"]["machine_learning"].as_table().unwrap();
    let n = |k: &str| counts[k].as_integer().unwrap();
    // The scripted teacher answers B to every question: right on the two whose key is B.
    assert_eq!(n("teacher_right"), 2);
    assert!(n("gaps") >= 1 && n("gaps") <= 2, "{counts:?}");
    // Its two replies are the same for every question: a second gap's pairs are duplicates.
    assert_eq!(
        [
            n("asked"),
            n("malformed"),
            n("duplicate"),
            n("irrelevant"),
            n("unsolvable"),
            n("kept")
        ],
        [2 * n("gaps"), 0, 2 * (n("gaps") - 1), 0, 0, 2]
    );
    let gaps: Vec<&str> = record["leaked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for p in lines(&out) {
        assert!(gaps.contains(&p["source"].as_str().unwrap()), "{p}");
        assert_eq!(p["answer"], "B");
        assert_eq!(p["method"], "targeted");
    }
    assert!(record["label"].as_str().unwrap().contains("leakage"));
}

#[test]
fn a_study_generates_its_pairs_trains_on_them_and_splits_by_leaked() {
    let dir = temp_dir("generate-study");
    write_tiny_model(&dir.join("model"), 5);
    let data = mmlu_data(&dir);
    let file = dir.join("targeted.toml");
    std::fs::write(
        &file,
        format!(
            r#"[study]
name = "tiny-targeted"
model = "model"

[variants.vanilla]
base = "nf4"

[variants.leak]
base = "nf4"
generate = {{ method = "targeted", subject = "machine_learning", teacher = "answer-key", per_gap = 2, data = "data" }}
train = {{ train = {{ r = 4, epochs = 1 }} }}

[[evals]]
name = "mmlu"
task = "mmlu"
options = {{ subject = "machine_learning", data = {data:?}, leaked_in = "@leak" }}
metrics = ["exact-match"]
variants = ["vanilla", "leak"]

[[compare]]
eval = "mmlu"
a = "vanilla"
b = "leak"
"#,
            data = data.display().to_string()
        ),
    )
    .unwrap();
    let out = dir.join("out");
    let plan = ok(harness()
        .arg("study")
        .arg(&file)
        .arg("--plan")
        .arg("--out")
        .arg(&out));
    assert!(plan.contains("generate leak"), "{plan}");
    let log = ok(harness().arg("study").arg(&file).arg("--out").arg(&out));
    assert!(log.contains("study done"), "{log}");
    let pairs = out.join("data/leak/pairs.jsonl");
    assert!(!lines(&pairs).is_empty());
    assert!(out.join("data/leak/pairs.provenance.toml").is_file());
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("split by leaked"), "{report}");
    // Done is done: a second run generates and trains nothing.
    let again = ok(harness().arg("study").arg(&file).arg("--out").arg(&out));
    assert!(again.contains("nothing to run"), "{again}");

    // A `generate` without `train`, or with a `data` of its own, is refused with its line.
    let bad = std::fs::read_to_string(&file).unwrap().replace(
        "train = { train = { r = 4, epochs = 1 } }",
        "train = { data = \"x.jsonl\" }",
    );
    std::fs::write(dir.join("bad.toml"), bad).unwrap();
    let e = fails(
        harness()
            .arg("study")
            .arg(dir.join("bad.toml"))
            .arg("--plan"),
    );
    assert!(e.contains("`data` is what `generate` gives"), "{e}");
    let typo = std::fs::read_to_string(&file)
        .unwrap()
        .replace("per_gap", "per_gapp");
    std::fs::write(dir.join("typo.toml"), typo).unwrap();
    let e = fails(
        harness()
            .arg("study")
            .arg(dir.join("typo.toml"))
            .arg("--plan"),
    );
    assert!(
        e.contains("line 10") && e.contains("did you mean `per_gap`"),
        "{e}"
    );
}
