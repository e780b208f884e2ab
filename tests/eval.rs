//! End-to-end evals: the built binary and plugins on a tiny random model (fast) and on the real
//! SmolLM2-135M-Instruct fetched by `harness fetch` (checked against the references in
//! tests/fixtures/smollm2/).

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn tiny_model(name: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir(name);
    write_tiny_model(&dir.join("model"), 7);
    (dir.join("model"), dir)
}

fn addition_eval(model: &Path, out: &Path) -> std::process::Command {
    let mut c = harness();
    c.args([
        "eval",
        "--task",
        "addition",
        "--digits",
        "1,3",
        "--n",
        "6",
        "--metric",
        "exact-match,digit-accuracy,levenshtein",
        "--seed",
        "7",
        "--batch",
        "4",
    ])
    .arg("--model")
    .arg(model)
    .arg("--out")
    .arg(out);
    c
}

#[test]
fn eval_writes_a_complete_run_folder() {
    let (model, dir) = tiny_model("run-folder");
    let out = ok(&mut addition_eval(&model, &dir.join("run")));
    assert!(
        out.contains("digit-accuracy") && out.contains("k=3"),
        "{out}"
    );
    let run = dir.join("run");
    let record = std::fs::read_to_string(run.join("run.toml")).unwrap();
    for key in [
        "harness_version",
        "library_sha256",
        "[model]",
        "sha256",
        "seed = 7",
        "[[metrics]]",
    ] {
        assert!(record.contains(key), "run.toml lacks {key}:\n{record}");
    }
    let samples = std::fs::read_to_string(run.join("samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 12);
    let first: serde_json::Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
    for key in ["id", "group", "prompt", "prediction", "target", "scores"] {
        assert!(first.get(key).is_some(), "sample lacks {key}: {first}");
    }
    let results = std::fs::read_to_string(run.join("results.csv")).unwrap();
    let lines: Vec<&str> = results.lines().collect();
    assert_eq!(lines[0], "task,group,metric,n,mean,stderr,ci_low,ci_high");
    // 2 groups + all + macro, 3 metrics each.
    assert_eq!(lines.len(), 1 + 4 * 3, "{results}");
    // Every interval stays inside its metric's declared range.
    for line in &lines[1..] {
        let f: Vec<&str> = line.split(',').collect();
        let (low, high): (f64, f64) = (f[6].parse().unwrap(), f[7].parse().unwrap());
        let max = if f[2] == "levenshtein" {
            f64::INFINITY
        } else {
            1.0
        };
        assert!(low >= 0.0 && high <= max && low <= high, "{line}");
    }
    assert!(!run.join("results.csv.tmp").exists());
    // A finished run folder is not overwritten.
    let e = fails(&mut addition_eval(&model, &run));
    assert!(e.contains("already holds a run"), "{e}");
}

#[test]
fn same_inputs_give_byte_identical_results() {
    let (model, dir) = tiny_model("determinism");
    ok(&mut addition_eval(&model, &dir.join("a")));
    ok(&mut addition_eval(&model, &dir.join("b")));
    let a = std::fs::read(dir.join("a/results.csv")).unwrap();
    let b = std::fs::read(dir.join("b/results.csv")).unwrap();
    assert_eq!(a, b);
}

/// The predictions of a run, by instance id.
fn predictions(run: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(run.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["id"].as_str().unwrap().to_string(),
                v["prediction"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn batch_sizes_1_8_and_32_give_identical_predictions() {
    // Batched prefill after a shared prefix, padded decoding, rows dropped as they finish and
    // the few-row kernel against gemm: none may change an answer.
    let (model, dir) = tiny_model("batch-sizes");
    let runs: Vec<Vec<(String, String)>> = ["1", "8", "32"]
        .iter()
        .map(|batch| {
            let out = dir.join(format!("b{batch}"));
            let stdout = ok(harness()
                .args(["eval", "--task", "addition", "--digits", "1-4", "--n", "12"])
                .args(["--metric", "exact-match", "--seed", "7", "--batch", batch])
                .arg("--model")
                .arg(&model)
                .arg("--out")
                .arg(&out));
            // The shared instruction is computed once, one prompt at a time or in batches.
            assert!(
                !stdout.contains("(0 more reused"),
                "batch {batch}: nothing reused\n{stdout}"
            );
            predictions(&out)
        })
        .collect();
    assert_eq!(runs[0].len(), 48);
    assert_eq!(runs[0], runs[1], "batch 1 vs 8");
    assert_eq!(runs[0], runs[2], "batch 1 vs 32");
}

#[test]
fn compute_bf16_is_recorded_and_keeps_batch_independence() {
    let (model, dir) = tiny_model("compute-bf16");
    let run = |batch: &str, compute: &str| -> PathBuf {
        let out = dir.join(format!("{compute}-b{batch}"));
        ok(harness()
            .args(["eval", "--task", "addition", "--digits", "1-4", "--n", "12"])
            .args(["--metric", "exact-match", "--seed", "7", "--batch", batch])
            .args(["--compute", compute])
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&out));
        out
    };
    let b1 = run("1", "bf16");
    let b8 = run("8", "bf16");
    let record = std::fs::read_to_string(b1.join("run.toml")).unwrap();
    assert!(record.contains("compute = \"bf16\""), "{record}");
    assert_eq!(predictions(&b1).len(), 48);
    assert_eq!(predictions(&b1), predictions(&b8), "batch 1 vs 8");
    // A wrong name is refused before any work.
    let err = fails(
        harness()
            .args(["eval", "--task", "addition", "--n", "2", "--compute", "f16"])
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(dir.join("bad")),
    );
    assert!(
        err.contains("`compute` must be one of `f32`, `bf16`"),
        "{err}"
    );
    assert!(!dir.join("bad").join("samples.jsonl").exists());
}

#[test]
fn an_interrupted_run_resumes_to_identical_results() {
    let (model, dir) = tiny_model("resume");
    ok(&mut addition_eval(&model, &dir.join("full")));

    // Simulate a kill after 5 samples, mid-way through writing the 6th.
    let run = dir.join("cut");
    ok(&mut addition_eval(&model, &run));
    let samples = std::fs::read_to_string(run.join("samples.jsonl")).unwrap();
    let mut kept: String = samples.lines().take(5).map(|l| format!("{l}\n")).collect();
    kept.push_str(&samples.lines().nth(5).unwrap()[..20]);
    std::fs::write(run.join("samples.jsonl"), kept).unwrap();
    std::fs::remove_file(run.join("results.csv")).unwrap();

    let out = ok(harness().arg("eval").arg("--resume").arg(&run));
    assert!(out.contains("(7 to do)"), "{out}");
    assert_eq!(
        std::fs::read(dir.join("full/results.csv")).unwrap(),
        std::fs::read(run.join("results.csv")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(run.join("samples.jsonl"))
            .unwrap()
            .lines()
            .count(),
        12
    );

    // A real kill: start, kill as soon as some samples exist, resume.
    let killed = dir.join("killed");
    let mut child = addition_eval(&model, &killed)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while start.elapsed().as_secs() < 60 {
        let n = std::fs::read_to_string(killed.join("samples.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if n >= 4 || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    ok(harness().arg("eval").arg("--resume").arg(&killed));
    assert_eq!(
        std::fs::read(dir.join("full/results.csv")).unwrap(),
        std::fs::read(killed.join("results.csv")).unwrap()
    );

    let e = fails(
        harness()
            .args(["eval", "--digits", "3", "--resume"])
            .arg(&killed),
    );
    assert!(e.contains("drop --digits"), "{e}");
}

/// Cuts a finished run back to its first `keep` samples and no results, as a kill would.
fn cut(run: &Path, keep: usize) {
    let samples = std::fs::read_to_string(run.join("samples.jsonl")).unwrap();
    let kept: String = samples
        .lines()
        .take(keep)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(run.join("samples.jsonl"), kept).unwrap();
    std::fs::remove_file(run.join("results.csv")).unwrap();
}

#[test]
fn a_run_started_with_relative_paths_resumes_from_any_folder_but_not_on_a_changed_model() {
    let (_, dir) = tiny_model("relative");
    // Started inside `dir` with relative --model, --out and backend options.
    ok(addition_eval(Path::new("model"), Path::new("run"))
        .args(["--backend-option", "double_quant=false", "--base", "nf4"])
        .current_dir(&dir));
    let full = std::fs::read(dir.join("run/results.csv")).unwrap();
    let record = std::fs::read_to_string(dir.join("run/run.toml")).unwrap();
    let model_abs = dir.canonicalize().unwrap().join("model");
    assert!(
        record.contains(&format!("model = \"{}\"", model_abs.display()))
            && record.contains("double_quant = false"),
        "{record}"
    );

    // Resumed from another folder: the same bytes, and the backend options survive.
    cut(&dir.join("run"), 5);
    ok(harness()
        .args(["eval", "--resume"])
        .arg(dir.join("run"))
        .current_dir(repo_root()));
    assert_eq!(std::fs::read(dir.join("run/results.csv")).unwrap(), full);
    let again = std::fs::read_to_string(dir.join("run/run.toml")).unwrap();
    assert_eq!(again, record);

    // A model changed since the run started is refused before anything is loaded.
    cut(&dir.join("run"), 5);
    write_tiny_model(&dir.join("model"), 8);
    let e = fails(harness().args(["eval", "--resume"]).arg(dir.join("run")));
    assert!(
        e.contains("the run's model") && e.contains("changed since the run started"),
        "{e}"
    );
}

#[test]
fn shards_merged_give_the_unsharded_run_byte_for_byte() {
    let (model, dir) = tiny_model("shards");
    ok(&mut addition_eval(&model, &dir.join("whole")));
    // 12 instances in 5 shards: 3, 3, 2, 2, 2.
    for i in 1..=5 {
        let out =
            ok(addition_eval(&model, &dir.join(format!("s{i}")))
                .args(["--shard", &format!("{i}/5")]));
        let want = if i <= 2 { 3 } else { 2 };
        assert!(
            out.contains(&format!("shard {i}/5: {want} of the task's 12 instances")),
            "{out}"
        );
    }
    let shard = |i: usize| dir.join(format!("s{i}"));
    // Given in any order.
    ok(harness()
        .arg("merge")
        .args([shard(3), shard(1), shard(5), shard(2), shard(4)])
        .arg("--out")
        .arg(dir.join("merged")));
    for file in ["results.csv", "samples.jsonl"] {
        assert_eq!(
            std::fs::read(dir.join("whole").join(file)).unwrap(),
            std::fs::read(dir.join("merged").join(file)).unwrap(),
            "{file}"
        );
    }
    let record = std::fs::read_to_string(dir.join("merged/run.toml")).unwrap();
    assert!(!record.lines().any(|l| l.starts_with("shard")), "{record}");

    let merge = |runs: &[PathBuf], out: &str| {
        let mut c = harness();
        c.arg("merge").args(runs).arg("--out").arg(dir.join(out));
        c
    };
    let e = fails(&mut merge(&[shard(1), shard(2), shard(4), shard(5)], "m1"));
    assert!(e.contains("shard 3/5 is missing"), "{e}");
    let e = fails(&mut merge(&[shard(1), shard(1), shard(2)], "m2"));
    assert!(e.contains("shard 1/5 is given twice"), "{e}");
    let e = fails(&mut merge(&[dir.join("whole"), shard(1)], "m3"));
    assert!(e.contains("is not a shard"), "{e}");
    // A shard of another eval (other task options) is refused.
    ok(addition_eval(&model, &dir.join("other")).args([
        "--shard",
        "2/5",
        "--option",
        "fewshot=shared",
    ]));
    let e = fails(&mut merge(
        &[shard(1), dir.join("other"), shard(3), shard(4), shard(5)],
        "m4",
    ));
    assert!(
        e.contains("not shards of the same eval: their task options differ"),
        "{e}"
    );
    // An unfinished shard is named with the way to finish it.
    std::fs::remove_file(shard(4).join("results.csv")).unwrap();
    let e = fails(&mut merge(
        &[shard(1), shard(2), shard(3), shard(4), shard(5)],
        "m5",
    ));
    assert!(e.contains("unfinished") && e.contains("--resume"), "{e}");
    for m in ["m1", "m2", "m3", "m4", "m5"] {
        assert!(!dir.join(m).exists(), "{m}");
    }
    let e = fails(addition_eval(&model, &dir.join("bad")).args(["--shard", "6/5"]));
    assert!(e.contains("--shard expects I/N with 1 <= I <= N"), "{e}");
}

#[test]
fn mmlu_on_a_csv_folder_and_cloze_scoring() {
    let (model, dir) = tiny_model("mmlu-csv");
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("test")).unwrap();
    std::fs::create_dir_all(data.join("dev")).unwrap();
    std::fs::write(data.join("test/virology_test.csv"), "What spreads?,a virus,a rock,a chair,a song,A\nWhich is alive?,a cell,a stone,a nail,a cup,A\n").unwrap();
    // No dev split for anatomy: its few-shot example comes from its other question.
    std::fs::write(
        data.join("test/anatomy_test.csv"),
        "Where is the heart?,chest,foot,ear,nose,A\nWhere are the lungs?,chest,hand,knee,hair,A\n",
    )
    .unwrap();
    std::fs::write(
        data.join("dev/virology_dev.csv"),
        "Example?,yes,no,maybe,never,A\n",
    )
    .unwrap();
    for scoring in ["letter", "cloze"] {
        let run = dir.join(format!("run-{scoring}"));
        ok(harness()
            .args([
                "eval",
                "--task",
                "mmlu",
                "--subject",
                "virology,anatomy",
                "--shots",
                "1",
                "--scoring",
                scoring,
                "--data",
            ])
            .arg(&data)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&run));
        let results = std::fs::read_to_string(run.join("results.csv")).unwrap();
        for group in ["virology", "anatomy", "all", "macro"] {
            assert!(
                results.contains(&format!("mmlu,{group},exact-match,")),
                "{results}"
            );
        }
    }
}

#[test]
fn addition_marks_carries_and_probes_an_adapters_training_set() {
    let (model, dir) = tiny_model("seen-probe");
    // An adapter folder as `harness train --task addition --digits 1-2 --seed 99 --examples 200`
    // leaves it; the eval only reads its train.toml.
    let adapter = dir.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(
        adapter.join("train.toml"),
        "[plan]\ntask = \"addition\"\nexamples = 200\nout = \"adapter\"\nbackend = \"candle\"\n\n[plan.task_options]\ndigits = \"1-2\"\nseed = 99\n\n[plan.train]\n",
    )
    .unwrap();
    let run = dir.join("run");
    let out = ok(harness()
        .args([
            "eval",
            "--task",
            "addition",
            "--digits",
            "1-2",
            "--n",
            "40",
            "--shots",
            "1",
            "--metric",
            "exact-match",
            "--seed",
            "7",
            "--batch",
            "16",
            "--option",
        ])
        .arg(format!("seen_in={}", adapter.display()))
        .args(["--option", "seen_per_k=2", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&run));
    let samples: Vec<serde_json::Value> = std::fs::read_to_string(run.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), 2 * 40 + 2 * 2);
    let mut yes = 0;
    for s in &samples {
        let attrs = &s["attributes"];
        let carries = attrs["carries"].as_str().expect("carries attribute");
        assert!(carries.parse::<u32>().unwrap() <= 2, "{s}");
        let seen = attrs["seen"].as_str().expect("seen attribute");
        assert!(seen == "yes" || seen == "no", "{s}");
        yes += usize::from(seen == "yes");
        if s["id"].as_str().unwrap().contains("-seen-") {
            assert_eq!(seen, "yes", "{s}");
        }
    }
    for id in ["k1-seen-0", "k1-seen-1", "k2-seen-0", "k2-seen-1"] {
        assert!(samples.iter().any(|s| s["id"] == id), "no sample {id}");
    }
    assert!(yes > 4, "some regular k=1 problems overlap training: {yes}");
    let line = format!(
        "overlap with the adapter's training set: {yes} of {} instances (attribute seen = yes)",
        samples.len()
    );
    assert!(out.contains(&line), "{out}");
    let record = std::fs::read_to_string(run.join("run.toml")).unwrap();
    assert!(
        record.contains(&format!("seen_overlap = {}", yes - 4))
            && record.contains("seen_per_k = 2"),
        "{record}"
    );

    // Without the options no line has `seen`, and nothing is printed about overlap.
    let plain = dir.join("plain");
    let out = ok(harness()
        .args([
            "eval",
            "--task",
            "addition",
            "--digits",
            "1",
            "--n",
            "3",
            "--metric",
            "exact-match",
            "--model",
        ])
        .arg(&model)
        .arg("--out")
        .arg(&plain));
    assert!(!out.contains("overlap with"), "{out}");
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(plain.join("samples.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(first["attributes"]["carries"].is_string(), "{first}");
    assert!(first["attributes"].get("seen").is_none(), "{first}");
}

// ---- The real default model. `harness fetch` must have run (CI does it first). ----

fn fixture_readme() -> String {
    let path = repo_root().join("tests/fixtures/smollm2/README.md");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("reference fixtures missing at {}", path.display()))
}

fn results_map(run: &Path) -> Vec<(String, String, f64)> {
    std::fs::read_to_string(run.join("results.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1].to_string(), f[2].to_string(), f[4].parse().unwrap())
        })
        .collect()
}

#[test]
fn smollm2_mmlu_machine_learning_letter_scoring_matches_reference() {
    let _ = real_model();
    // The reference: "accuracy 0.3125 (35/112)".
    let readme = fixture_readme();
    let text = readme.replace('\n', " ");
    let after = &text[text
        .find("MMLU `machine_learning`")
        .expect("reference line")..];
    let (hits, total) = after
        .split('(')
        .skip(1)
        .filter_map(|part| {
            let inside = part.split(')').next()?;
            let (a, b) = inside.split_once('/')?;
            Some((a.trim().parse::<f64>().ok()?, b.trim().parse::<f64>().ok()?))
        })
        .next()
        .expect("a (hits/total) figure after the machine_learning reference");
    let dir = temp_dir("smollm2-mmlu");
    ok(harness()
        .args([
            "eval",
            "--task",
            "mmlu",
            "--subject",
            "machine_learning",
            "--metric",
            "exact-match",
            "--out",
        ])
        .arg(dir.join("run")));
    let r = results_map(&dir.join("run"));
    let (_, _, acc) = r
        .iter()
        .find(|(g, m, _)| g == "machine_learning" && m == "exact-match")
        .unwrap();
    assert_eq!(
        *acc,
        (hits / total * 1e6).round() / 1e6,
        "letter accuracy on machine_learning"
    );
}

#[test]
fn smollm2_vanilla_addition_is_within_sampling_error_of_reference() {
    let _ = real_model();
    // The reference line: "exact match k=1 0.74, k=2 0.30, k=3 0.09".
    let readme = fixture_readme();
    let text = readme.replace('\n', " ");
    let at = text.find("exact match k=1").expect("reference numbers");
    let refs: Vec<(String, f64)> = text[at + "exact match ".len()..]
        .split(',')
        .take(3)
        .map(|part| {
            let mut it = part.split_whitespace();
            let k = it.next().unwrap().to_string();
            let v: f64 = it.next().unwrap().trim_end_matches('.').parse().unwrap();
            (k, v)
        })
        .collect();
    let dir = temp_dir("smollm2-addition");
    ok(harness()
        .args([
            "eval",
            "--task",
            "addition",
            "--digits",
            "1-3",
            "--n",
            "100",
            "--metric",
            "exact-match",
            "--out",
        ])
        .arg(dir.join("run")));
    let r = results_map(&dir.join("run"));
    for (k, want) in refs {
        let (_, _, got) = r
            .iter()
            .find(|(g, m, _)| *g == k && m == "exact-match")
            .unwrap();
        // Both sides sample 100 problems: the difference has a standard error of about
        // sqrt(2 p (1 - p) / 100); allow three of them.
        let se = (2.0 * want * (1.0 - want) / 100.0).sqrt().max(0.02);
        assert!(
            (got - want).abs() <= 3.0 * se,
            "{k}: exact match {got}, reference {want}"
        );
    }
}

#[test]
fn smollm2_with_the_peft_adapter_records_it_in_the_run() {
    let _ = real_model();
    let adapter = repo_root().join("tests/fixtures/smollm2/peft-adapter");
    let dir = temp_dir("smollm2-adapter");
    ok(harness()
        .args([
            "eval",
            "--task",
            "addition",
            "--digits",
            "1",
            "--n",
            "4",
            "--adapter",
        ])
        .arg(&adapter)
        .arg("--out")
        .arg(dir.join("run")));
    let record = std::fs::read_to_string(dir.join("run/run.toml")).unwrap();
    assert!(
        record.contains("adapter = ") && record.contains("peft-adapter"),
        "{record}"
    );
}

#[test]
fn ctrl_c_stops_an_eval_after_its_batch_and_resume_finishes_it_to_the_same_bytes() {
    let (model, dir) = tiny_model("ctrl-c");
    let eval = |out: &str| {
        let mut c = harness();
        c.args([
            "eval",
            "--task",
            "addition",
            "--digits",
            "1-4",
            "--n",
            "60",
            "--metric",
            "exact-match",
            "--batch",
            "1",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(dir.join(out));
        c
    };
    ok(&mut eval("whole"));
    let child = eval("cut")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let samples = dir.join("cut/samples.jsonl");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&samples).map_or(0, |c| c.lines().count()) < 3 {
        assert!(start.elapsed().as_secs() < 120, "no samples appeared");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        err.contains("interrupted after") && err.contains("--resume"),
        "{err}"
    );
    assert!(!dir.join("cut/results.csv").exists());
    ok(harness().arg("eval").arg("--resume").arg(dir.join("cut")));
    assert_eq!(
        std::fs::read(dir.join("cut/results.csv")).unwrap(),
        std::fs::read(dir.join("whole/results.csv")).unwrap()
    );
}

#[test]
fn bench_eval_reports_prefill_decoding_memory_and_kernel_path() {
    let dir = temp_dir("bench-eval");
    write_tiny_model(&dir.join("model"), 5);
    let json = dir.join("bench.json");
    let out = ok(harness()
        .args(["bench", "eval", "--runs", "2", "--batch", "3"])
        .args(["--prompt-len", "12", "--new-tokens", "5", "--model"])
        .arg(dir.join("model"))
        .arg("--json")
        .arg(&json));
    for want in [
        "prefill 3 x 12 tokens",
        "greedy decoding, batch 1",
        "greedy decoding, batch 3",
        "kernel path: ",
        "peak resident memory",
    ] {
        assert!(out.contains(want), "lacks {want:?}:\n{out}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // 3 distinct prompts of 12 tokens each are computed whole (nothing shared or reused).
    assert_eq!(v["prefill"]["tokens_per_run"], 36, "{v}");
    assert_eq!(v["prefill"]["runs"].as_array().unwrap().len(), 2);
    assert!(v["prefill"]["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["decode_batch_n"]["tokens_per_s"].as_f64().unwrap() > 0.0);
    let e = fails(harness().args(["bench", "eval", "--runs", "0"]));
    assert!(e.contains("--runs"), "{e}");
}
