//! End-to-end tests of `harness train` on a tiny random model: the adapter lands in PEFT layout
//! with its loss curve, evaluates with `--adapter`, and bad inputs are one clear line.

mod common;

use common::*;

#[test]
fn train_then_eval_with_the_adapter() {
    let dir = temp_dir("train-tiny");
    write_tiny_model(&dir.join("model"), 3);
    let out = ok(harness()
        .args([
            "train",
            "--task",
            "addition",
            "--digits",
            "1-2",
            "--examples",
            "8",
            "--micro-batch",
            "4",
            "--r",
            "4",
            "--lr",
            "1e-3",
            "--model",
        ])
        .arg(dir.join("model"))
        .arg("--out")
        .arg(dir.join("adapter")));
    assert!(out.contains("2 steps on 8 examples"), "{out}");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "train.csv",
        "train.toml",
    ] {
        assert!(dir.join("adapter").join(f).is_file(), "{f} missing");
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    let curve = std::fs::read_to_string(dir.join("adapter/train.csv")).unwrap();
    assert_eq!(curve.lines().count(), 3, "{curve}");
    let record = std::fs::read_to_string(dir.join("adapter/train.toml")).unwrap();
    assert!(
        record.contains("r = 4") && record.contains("final_loss"),
        "{record}"
    );

    ok(harness()
        .args([
            "eval", "--task", "addition", "--digits", "1", "--n", "3", "--model",
        ])
        .arg(dir.join("model"))
        .arg("--adapter")
        .arg(dir.join("adapter"))
        .arg("--out")
        .arg(dir.join("run")));

    // The same adapter folder is not overwritten.
    let e = fails(
        harness()
            .args(["train", "--task", "addition", "--examples", "8", "--model"])
            .arg(dir.join("model"))
            .arg("--out")
            .arg(dir.join("adapter")),
    );
    assert!(e.contains("already holds an adapter"), "{e}");
}

#[test]
fn stopped_or_killed_runs_resume_to_the_uninterrupted_result() {
    let dir = temp_dir("train-resume");
    write_tiny_model(&dir.join("model"), 5);
    let train = |out: &str| {
        let mut cmd = harness();
        cmd.args([
            "train",
            "--task",
            "addition",
            "--digits",
            "1-3",
            "--examples",
            "1000",
            "--micro-batch",
            "1",
            "--r",
            "4",
            "--lr",
            "1e-3",
            "--model",
        ])
        .arg(dir.join("model"))
        .arg("--out")
        .arg(dir.join(out));
        cmd
    };
    ok(&mut train("whole"));

    let child = train("split")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let curve = dir.join("split/train.csv");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&curve).map_or(0, |c| c.lines().count()) < 4 {
        assert!(
            start.elapsed().as_secs() < 120,
            "no training steps appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(
        text.contains("(stopped early)") && text.contains("--resume"),
        "{text}"
    );
    assert!(dir.join("split/optimizer.safetensors").is_file());

    let e = fails(&mut train("split"));
    assert!(e.contains("harness train --resume"), "{e}");
    let e = fails(
        harness()
            .args(["train", "--r", "8", "--resume"])
            .arg(dir.join("split")),
    );
    assert!(e.contains("give no other training option"), "{e}");

    // A model changed since the run started is refused; the same model again is accepted.
    write_tiny_model(&dir.join("model"), 6);
    let e = fails(harness().args(["train", "--resume"]).arg(dir.join("split")));
    assert!(
        e.contains("the run's model") && e.contains("changed since the run started"),
        "{e}"
    );
    write_tiny_model(&dir.join("model"), 5);

    ok(harness().args(["train", "--resume"]).arg(dir.join("split")));
    // A resumed run ends with the adapter and the loss curve of the uninterrupted one.
    let read = |p: String| std::fs::read(dir.join(p)).unwrap();
    let assert_same_as_whole = |run: &str| {
        assert!(
            read("whole/adapter_model.safetensors".into())
                == read(format!("{run}/adapter_model.safetensors")),
            "the adapter of `{run}` differs from the uninterrupted one"
        );
        assert_eq!(
            String::from_utf8(read("whole/train.csv".into())).unwrap(),
            String::from_utf8(read(format!("{run}/train.csv"))).unwrap()
        );
    };
    assert_same_as_whole("split");
    assert!(!dir.join("split/optimizer.safetensors").exists());
    let e = fails(harness().args(["train", "--resume"]).arg(dir.join("split")));
    assert!(e.contains("nothing to resume"), "{e}");

    // Killed outright (SIGKILL) at pseudo-random steps, three times, each time resumed from its
    // last periodic checkpoint: the end is the uninterrupted run's, byte for byte.
    let curve = dir.join("killed/train.csv");
    let rows = || std::fs::read_to_string(&curve).map_or(0, |c| c.lines().count());
    let mut state = 0x2545_f491_u64;
    for round in 0..3 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = rows() + 4 + (state >> 33) as usize % 9;
        let mut cmd = if round == 0 {
            let mut c = train("killed");
            c.args(["--train-option", "save_every=3"]);
            c
        } else {
            let mut c = harness();
            c.args(["train", "--resume"]).arg(dir.join("killed"));
            c
        };
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while !dir.join("killed/optimizer.safetensors").is_file() || rows() < at {
            assert!(start.elapsed().as_secs() < 120, "no checkpoint appeared");
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before step {at}"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let out = ok(harness()
        .args(["train", "--resume"])
        .arg(dir.join("killed")));
    assert!(out.contains("resume training"), "{out}");
    assert_same_as_whole("killed");
}

#[test]
fn training_pairs_come_from_a_jsonl_file_with_errors_by_line() {
    let dir = temp_dir("train-pairs");
    write_tiny_model(&dir.join("model"), 4);
    let pairs = dir.join("pairs.jsonl");
    std::fs::write(&pairs, "{\"prompt\": \"Q: 1+1\\nA:\", \"completion\": \" 2\\n\"}\n{\"prompt\": \"Q: 2+2\\nA:\", \"completion\": \" 4\\n\"}\n").unwrap();
    let out = ok(harness()
        .args(["train", "--data"])
        .arg(&pairs)
        .args(["--r", "2", "--model"])
        .arg(dir.join("model"))
        .arg("--out")
        .arg(dir.join("a")));
    assert!(out.contains("on 2 examples"), "{out}");

    std::fs::write(
        &pairs,
        "{\"prompt\": \"Q\", \"completion\": \" 2\"}\n{\"prompt\": \"Q\"}\n",
    )
    .unwrap();
    let e = fails(
        harness()
            .args(["train", "--data"])
            .arg(&pairs)
            .arg("--out")
            .arg(dir.join("b")),
    );
    assert!(
        e.contains("line 2: missing string field `completion`"),
        "{e}"
    );

    let e = fails(
        harness()
            .args(["train", "--task", "addition", "--out"])
            .arg(dir.join("c")),
    );
    assert!(e.contains("--examples N"), "{e}");
    let e = fails(
        harness()
            .args([
                "train",
                "--task",
                "addition",
                "--examples",
                "4",
                "--train-option",
                "rank=3",
                "--model",
            ])
            .arg(dir.join("model"))
            .arg("--out")
            .arg(dir.join("d")),
    );
    assert!(e.contains("unknown option `rank`"), "{e}");

    // Training options are checked before any model is read: a model that is not even a model
    // does not get in the way of the option's error (it would if it were loaded first).
    std::fs::write(dir.join("not-a-model.gguf"), b"GGUF junk").unwrap();
    for (option, want) in [
        (
            "rank=3",
            "candle train: unknown option `rank` (did you mean `r`?)",
        ),
        ("dropout=2", "`dropout` must be in [0, 1)"),
        (
            "schedule=steep",
            "option `schedule` must be one of `constant`, `linear`, `cosine`",
        ),
    ] {
        let e = fails(
            harness()
                .args(["train", "--task", "addition", "--examples", "4"])
                .args(["--train-option", option, "--model"])
                .arg(dir.join("not-a-model.gguf"))
                .arg("--out")
                .arg(dir.join("e")),
        );
        assert!(e.contains(want), "{option}: {e}");
        assert!(!dir.join("e").exists(), "{option}");
    }
}

#[test]
fn bench_train_reports_speed_and_memory() {
    let dir = temp_dir("bench-tiny");
    write_tiny_model(&dir.join("model"), 5);
    let out = ok(harness()
        .args([
            "bench",
            "train",
            "--steps",
            "2",
            "--seq-len",
            "16",
            "--micro-batch",
            "2",
            "--r",
            "4",
            "--model",
        ])
        .arg(dir.join("model")));
    assert!(out.contains("micro-batch 2 x 16 tokens"), "{out}");
    assert!(
        out.contains("tokens/s: median") && out.contains("peak resident memory"),
        "{out}"
    );
}

/// The predictions of a run folder's samples, in order.
fn predictions(run: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(run.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["prediction"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn smollm2_trains_over_its_gguf_blocks_and_its_adapter_evaluates_on_the_checkpoint() {
    let model = real_model();
    let dir = temp_dir("train-gguf");
    let out = ok(harness()
        .args([
            "train",
            "--task",
            "addition",
            "--digits",
            "1-2",
            "--examples",
            "8",
            "--micro-batch",
            "4",
            "--r",
            "4",
            "--base",
            "gguf",
            "--out",
        ])
        .arg(dir.join("adapter")));
    assert!(out.contains("2 steps on 8 examples"), "{out}");
    let record = std::fs::read_to_string(dir.join("adapter/train.toml")).unwrap();
    assert!(
        record.contains("base = \"gguf\"") && !record.contains("nf4-packed"),
        "{record}"
    );
    // The adapter goes onto the checkpoint as it is (f32), not onto the NF4 round trip.
    ok(harness()
        .args(["eval", "--task", "addition", "--digits", "1", "--n", "2"])
        .arg("--adapter")
        .arg(dir.join("adapter"))
        .arg("--out")
        .arg(dir.join("tuned")));
    let run = std::fs::read_to_string(dir.join("tuned/run.toml")).unwrap();
    assert!(run.contains("base = \"f32\""), "{run}");

    // Evaluation over the blocks alone predicts what the f32 copy predicts.
    let eval = |base: &str, out: &str| {
        ok(harness()
            .args([
                "eval", "--task", "addition", "--digits", "1-8", "--n", "3", "--base", base,
                "--model",
            ])
            .arg(&model)
            .arg("--out")
            .arg(dir.join(out)));
        predictions(&dir.join(out))
    };
    let (f32, gguf) = (eval("f32", "f32"), eval("gguf", "gguf"));
    assert_eq!(f32.len(), 24);
    assert_eq!(f32, gguf);
}

#[test]
fn training_over_gguf_blocks_needs_a_gguf_checkpoint() {
    let dir = temp_dir("train-gguf-hf");
    write_tiny_model(&dir.join("model"), 4);
    let e = fails(
        harness()
            .args([
                "train",
                "--task",
                "addition",
                "--examples",
                "4",
                "--base",
                "gguf",
                "--model",
            ])
            .arg(dir.join("model"))
            .arg("--out")
            .arg(dir.join("adapter")),
    );
    assert!(
        e.contains("has none") && e.contains("train with base = \"nf4\""),
        "{e}"
    );
    assert!(!dir.join("adapter/adapter_model.safetensors").exists());
    let e = fails(
        harness()
            .args([
                "train",
                "--task",
                "addition",
                "--examples",
                "4",
                "--base",
                "q8",
                "--model",
            ])
            .arg(dir.join("model"))
            .arg("--out")
            .arg(dir.join("adapter")),
    );
    assert!(e.contains("q8") && e.contains("gguf"), "{e}");
}
