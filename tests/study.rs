//! End-to-end tests of `harness report` and `harness study`: figures and report.md from run
//! folders (new and old), a study on a tiny random model run, rerun (nothing to do), cut half-way
//! and resumed (only the missing cells run), edited (refused), malformed study files refused
//! with their line, and the shipped studies on the real model.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A study file over the tiny model in `dir`: a vanilla variant and one the study trains.
fn tiny_study(dir: &Path, n: u32) -> PathBuf {
    write_tiny_model(&dir.join("model"), 5);
    let file = dir.join("tiny.toml");
    std::fs::write(
        &file,
        format!(
            r#"[study]
name = "tiny"
title = "Tiny study"
model = "model"

[variants.vanilla]
label = "vanilla"

[variants.tuned]
label = "tuned on k=1"
train = {{ task = "addition", examples = 8, task_options = {{ digits = "1" }}, train = {{ r = 4, micro_batch = 4, save_every = 1 }} }}

[[evals]]
name = "addition"
task = "addition"
options = {{ digits = "1-2", n = {n}, shots = 1, seen_in = "@tuned", seen_per_k = 1 }}
metrics = ["exact-match", "levenshtein"]
variants = ["vanilla", "tuned"]

[[compare]]
eval = "addition"
a = "vanilla"
b = "tuned"
"#
        ),
    )
    .unwrap();
    file
}

fn study(file: &Path, out: &Path) -> String {
    ok(harness().arg("study").arg(file).arg("--out").arg(out))
}

#[test]
fn a_study_runs_reuses_resumes_and_refuses_a_changed_file() {
    let dir = temp_dir("study-tiny");
    let file = tiny_study(&dir, 3);
    let out = dir.join("out");

    let plan = ok(harness()
        .arg("study")
        .arg(&file)
        .arg("--plan")
        .arg("--out")
        .arg(&out));
    assert!(plan.contains("(0 of 3 cells done)"), "{plan}");
    assert!(
        plan.contains("to do") && plan.contains("train tuned"),
        "{plan}"
    );
    assert!(!out.exists(), "--plan runs nothing");

    let first = study(&file, &out);
    assert!(first.contains("[1/3] train tuned"), "{first}");
    assert!(first.contains("[3/3] eval addition on tuned"), "{first}");
    for f in [
        "report.md",
        "study.toml",
        "adapters/tuned/adapter_model.safetensors",
        "runs/addition/vanilla/results.csv",
        "runs/addition/tuned/results.csv",
        "figures/addition-accuracy-vs-k.png",
        "figures/addition-metrics-vs-k.png",
        "figures/train-loss-tuned.png",
        "figures/addition-by-seen.png",
        "figures/addition-compare-vanilla-tuned.csv",
    ] {
        assert!(out.join(f).is_file(), "{f} missing:\n{first}");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for want in [
        "# Tiny study",
        "## Recipe",
        "![Every metric vs k](figures/addition-metrics-vs-k.png)",
        "| tuned | tuned on k=1 | nf4 | trained into",
        "### tuned on k=1 vs vanilla",
        "McNemar",
    ] {
        assert!(
            report.contains(want),
            "`{want}` not in report.md:\n{report}"
        );
    }

    // A second invocation does nothing but the report.
    let results = out.join("runs/addition/vanilla/results.csv");
    let before = std::fs::read(&results).unwrap();
    let again = study(&file, &out);
    assert!(
        again.contains("all 3 cells are done; nothing to run"),
        "{again}"
    );
    assert!(
        !again.contains("[1/3]") && !again.contains("eval addition on"),
        "{again}"
    );
    let plan = ok(harness()
        .arg("study")
        .arg(&file)
        .arg("--plan")
        .arg("--out")
        .arg(&out));
    assert!(plan.contains("(3 of 3 cells done)"), "{plan}");

    // Cut half-way: one eval loses its results and half its samples (as a kill leaves it),
    // another its whole folder. Only those two run again; the partial one resumes to the same
    // bytes.
    let samples = out.join("runs/addition/vanilla/samples.jsonl");
    let text = std::fs::read_to_string(&samples).unwrap();
    let half: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
    std::fs::write(&samples, half).unwrap();
    std::fs::remove_file(&results).unwrap();
    std::fs::remove_dir_all(out.join("runs/addition/tuned")).unwrap();
    let plan = ok(harness()
        .arg("study")
        .arg(&file)
        .arg("--plan")
        .arg("--out")
        .arg(&out));
    assert!(plan.contains("partial (resumes)"), "{plan}");
    let resumed = study(&file, &out);
    assert!(!resumed.contains("train tuned"), "{resumed}");
    assert!(
        resumed.contains("[2/3] eval addition on vanilla, resuming"),
        "{resumed}"
    );
    assert!(
        resumed.contains("[3/3] eval addition on tuned"),
        "{resumed}"
    );
    assert!(resumed.contains("3 instances already done"), "{resumed}");
    assert_eq!(std::fs::read(&results).unwrap(), before);

    // An edited study file does not mix with the old results.
    let edited = tiny_study(&dir, 4);
    let e = fails(harness().arg("study").arg(&edited).arg("--out").arg(&out));
    assert!(
        e.contains("was made from another definition of eval addition on vanilla"),
        "{e}"
    );
}

#[test]
fn malformed_study_files_are_refused_with_their_line() {
    let dir = temp_dir("study-bad");
    write_tiny_model(&dir.join("model"), 5);
    let header = "[study]\nmodel = \"model\"\n\n[variants.a]\nbase = \"f32\"\n\n";
    let eval = "[[evals]]\nname = \"e\"\ntask = \"addition\"\nvariants = [\"a\"]\n";
    let cases: [(&str, String, &str); 7] = [
        ("syntax", format!("{header}[[evals]\n"), "line 7"),
        (
            "unknown-key",
            format!("{header}{eval}colour = \"red\"\n"),
            "line 11: unknown field `colour`",
        ),
        (
            "unknown-variant",
            format!("{header}[[evals]]\nname = \"e\"\ntask = \"addition\"\nvariants = [\"a\", \"b\"]\n"),
            "line 10: eval `e` names variant `b`, which is not defined",
        ),
        (
            "bad-base",
            "[study]\nmodel = \"model\"\n\n[variants.a]\nbase = \"f16\"\n".to_string() + eval,
            "line 5: variant `a`: base must be `f32` or `nf4`",
        ),
        (
            "unknown-task",
            format!("{header}[[evals]]\nname = \"e\"\ntask = \"adition\"\nvariants = [\"a\"]\n"),
            "line 9: unknown task `adition`; did you mean `addition`?",
        ),
        (
            "bad-option",
            format!("{header}[[evals]]\nname = \"e\"\ntask = \"addition\"\noptions = {{ digits = \"0-3\" }}\nvariants = [\"a\"]\n"),
            "line 9: addition:",
        ),
        (
            "compare",
            format!("{header}{eval}\n[[compare]]\neval = \"e\"\na = \"a\"\nb = \"z\"\n"),
            "line 15: compare: eval `e` does not evaluate variant `z`",
        ),
    ];
    for (name, text, want) in cases {
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, text).unwrap();
        let e = fails(
            harness()
                .arg("study")
                .arg(&file)
                .arg("--out")
                .arg(dir.join(name)),
        );
        assert!(e.contains(&format!("{name}.toml")), "{name}: {e}");
        assert!(e.contains(want), "{name}: `{want}` not in {e}");
        assert!(!dir.join(name).exists(), "{name}: work started");
    }
}

/// Hand-made run folder as an older harness wrote it: no label, no attributes.
fn old_run(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("run.toml"),
        "harness_version = \"0.1.0\"\n[task]\nname = \"mmlu\"\n[model]\nname = \"SmolLM2\"\n[backend]\noptions = \"\"\"\nbase = \"f32\"\n\"\"\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("results.csv"),
        "task,group,metric,n,mean,stderr,ci_low,ci_high\n\
         mmlu,machine_learning,exact-match,112,0.312500,0.043980,0.235000,0.402000\n\
         mmlu,virology,exact-match,166,0.400000,0.038000,0.328000,0.477000\n\
         mmlu,all,exact-match,278,0.366906,0.028966,0.312000,0.425000\n\
         mmlu,macro,exact-match,2,0.356250,0.029000,0.299000,0.413000\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("samples.jsonl"),
        "{\"id\":\"machine_learning-0\",\"group\":\"machine_learning\",\"scores\":{\"exact-match\":1.0}}\n",
    )
    .unwrap();
}

#[test]
fn report_draws_group_bars_from_old_run_folders_and_refuses_non_runs() {
    let dir = temp_dir("report-old");
    old_run(&dir.join("a"));
    old_run(&dir.join("b"));
    let out = ok(harness()
        .arg("report")
        .arg(dir.join("a"))
        .arg(dir.join("b"))
        .arg("--out")
        .arg(dir.join("rep"))
        .args(["--format", "svg"]));
    assert!(out.contains("mmlu-exact-match-by-group.svg"), "{out}");
    let md = std::fs::read_to_string(dir.join("rep/report.md")).unwrap();
    assert!(
        md.contains("| macro |") && md.contains("| all (micro) |"),
        "{md}"
    );
    // Same labels: the folder names tell them apart.
    assert!(
        md.contains("SmolLM2 (f32) [a]") && md.contains("SmolLM2 (f32) [b]"),
        "{md}"
    );
    let csv =
        std::fs::read_to_string(dir.join("rep/figures/mmlu-exact-match-by-group.csv")).unwrap();
    assert!(
        csv.contains(
            "exact-match,SmolLM2 (f32) [a],machine_learning,112,0.312500,0.235000,0.402000"
        ),
        "{csv}"
    );

    let e = fails(
        harness()
            .arg("report")
            .arg(&dir)
            .arg("--out")
            .arg(dir.join("x")),
    );
    assert!(e.contains("not a finished run folder"), "{e}");
    let e = fails(
        harness()
            .arg("report")
            .arg(dir.join("a"))
            .args(["--format", "pdf", "--out"])
            .arg(dir.join("x")),
    );
    assert!(e.contains("png or svg"), "{e}");
}

// ---- The real default model. `harness fetch` must have run (CI does it first). ----

#[test]
fn shipped_studies_are_valid_and_the_smoke_study_runs() {
    let root = repo_root();
    let dir = temp_dir("study-shipped");
    for f in [
        "studies/addition-length-generalization.toml",
        "studies/mmlu-knowledge-transfer.toml",
        "studies/mmlu-targeted.toml",
    ] {
        let plan = ok(harness()
            .arg("study")
            .arg(root.join(f))
            .arg("--plan")
            .arg("--out")
            .arg(dir.join("plan")));
        assert!(plan.contains("cells done"), "{f}: {plan}");
    }
    let out = dir.join("smoke");
    let log = ok(harness()
        .arg("study")
        .arg(root.join("studies/smoke.toml"))
        .arg("--out")
        .arg(&out));
    assert!(log.contains("study done"), "{log}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("addition-metrics-vs-k.png"), "{report}");
    assert!(out.join("figures/addition-by-carries.png").is_file());
}

/// The figure of two old MMLU runs, drawn with no environment at all (no HOME, no fontconfig,
/// no font path), is byte for byte the committed one: text comes from the embedded font, never
/// from the machine. `HARNESS_BLESS=1` rewrites the committed file after an intended change.
#[test]
fn figures_render_the_same_bytes_without_any_system_font() {
    let dir = temp_dir("report-golden");
    old_run(&dir.join("a"));
    old_run(&dir.join("b"));
    ok(harness()
        .env_clear()
        .env("FONTCONFIG_FILE", "/nonexistent")
        .current_dir(&dir)
        .args(["report", "a", "b", "--out", "rep"]));
    let made = std::fs::read(dir.join("rep/figures/mmlu-exact-match-by-group.png")).unwrap();
    let golden = repo_root().join("tests/fixtures/figures/mmlu-exact-match-by-group.png");
    if std::env::var_os("HARNESS_BLESS").is_some() {
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        std::fs::write(&golden, &made).unwrap();
    }
    let want = std::fs::read(&golden).unwrap();
    assert!(
        made == want,
        "the figure differs from {} (HARNESS_BLESS=1 rewrites it after an intended change)",
        golden.display()
    );
}

/// A variant that only an option refers to (`seen_in = "@tuned"`) is trained before the eval
/// that needs it, and a study folder given as `./x` or `x` is the same study.
#[test]
fn a_variant_only_referred_to_is_trained_and_paths_do_not_depend_on_spelling() {
    let dir = temp_dir("study-refs");
    write_tiny_model(&dir.join("model"), 5);
    std::fs::write(
        dir.join("refs.toml"),
        r#"[study]
model = "model"

[variants.vanilla]

[variants.tuned]
train = { task = "addition", examples = 4, task_options = { digits = "1" }, train = { r = 4, micro_batch = 4 } }

[[evals]]
name = "probe"
task = "addition"
options = { digits = "1", n = 2, shots = 1, seen_in = "@tuned", seen_per_k = 1 }
variants = ["vanilla"]
"#,
    )
    .unwrap();
    let out = ok(harness()
        .current_dir(&dir)
        .args(["study", "refs.toml", "--out", "x"]));
    assert!(out.contains("[1/2] train tuned"), "{out}");
    let again = ok(harness()
        .current_dir(&dir)
        .args(["study", "./refs.toml", "--out", "./x"]));
    assert!(again.contains("nothing to run"), "{again}");
    let record = std::fs::read_to_string(dir.join("x/runs/probe/vanilla/run.toml")).unwrap();
    assert!(
        record.contains(&format!(
            "seen_in = \"{}",
            dir.canonicalize().unwrap().display()
        )),
        "seen_in is recorded absolute:\n{record}"
    );
}
