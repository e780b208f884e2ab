//! End-to-end tests of the plugin registry and the command line: what a user sees when things
//! are right and when they get something wrong.

mod common;

use common::*;

#[test]
fn list_shows_every_plugin_with_version_and_library() {
    let out = ok(harness().arg("list"));
    for (kind, name, lib) in [
        ("task", "addition", "task_addition"),
        ("task", "mmlu", "task_mmlu"),
        ("metric", "exact-match", "harness_metrics"),
        ("metric", "digit-accuracy", "harness_metrics"),
        ("metric", "levenshtein", "harness_metrics"),
        ("backend", "candle", "backend_candle"),
    ] {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().take(2).eq([kind, name]))
            .unwrap_or_else(|| panic!("{kind} {name} missing from:\n{out}"));
        assert!(line.contains(env!("CARGO_PKG_VERSION")), "{line}");
        assert!(line.contains(lib), "{line}");
    }
}

#[test]
fn junk_in_a_plugin_folder_is_one_warning_and_list_goes_on() {
    let dir = temp_dir("junk");
    let ext = std::env::consts::DLL_EXTENSION;
    std::fs::write(
        dir.join(format!("libjunk.{ext}")),
        b"\x7fELF but not really",
    )
    .unwrap();
    std::fs::write(dir.join("notes.txt"), b"not a plugin").unwrap();
    let o = run(harness().arg("--plugin-dir").arg(&dir).arg("list"));
    assert!(o.status.success());
    let err = stderr(&o);
    let warnings: Vec<&str> = err.lines().collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].starts_with("warning: skipped") && warnings[0].contains("libjunk"),
        "{err}"
    );
    assert!(stdout(&o).contains("addition"));
}

#[test]
fn a_library_without_a_root_module_is_reported() {
    // A real shared library that is not a harness plugin.
    let dir = temp_dir("foreign");
    let libc = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists());
    let Some(libm) = libc else {
        return; // not a glibc system: nothing to copy
    };
    std::fs::copy(
        libm,
        dir.join(format!("libforeign.{}", std::env::consts::DLL_EXTENSION)),
    )
    .unwrap();
    let o = run(harness().arg("--plugin-dir").arg(&dir).arg("list"));
    assert!(o.status.success());
    assert!(
        stderr(&o).contains("not a harness plugin"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn misspelt_names_get_suggestions() {
    let e = fails(harness().args(["eval", "--task", "additon", "--model", "none"]));
    assert!(
        e.contains("unknown task `additon`; did you mean `addition`?"),
        "{e}"
    );
    let e = fails(harness().args([
        "eval",
        "--task",
        "addition",
        "--metric",
        "levenstein",
        "--model",
        "none",
    ]));
    assert!(
        e.contains("unknown metric `levenstein`; did you mean `levenshtein`?"),
        "{e}"
    );
    let e = fails(harness().args([
        "eval",
        "--task",
        "addition",
        "--backend",
        "candel",
        "--model",
        "none",
    ]));
    assert!(
        e.contains("unknown backend `candel`; did you mean `candle`?"),
        "{e}"
    );
}

#[test]
fn bad_task_options_are_named_before_any_model_loads() {
    let e = fails(harness().args([
        "eval", "--task", "addition", "--option", "digts=3", "--model", "none",
    ]));
    assert!(
        e.contains("unknown option `digts` (did you mean `digits`?)"),
        "{e}"
    );
    let e = fails(harness().args([
        "eval", "--task", "addition", "--digits", "0-3", "--model", "none",
    ]));
    assert!(e.contains("cannot read digits `0-3`"), "{e}");
    let e = fails(harness().args([
        "eval",
        "--task",
        "addition",
        "--subject",
        "virology",
        "--model",
        "none",
    ]));
    assert!(e.contains("unknown option `subject`"), "{e}");
    let e = fails(harness().args(["eval", "--task", "mmlu", "--model", "none"]));
    assert!(e.contains("choose a subject with --subject"), "{e}");
}

#[test]
fn a_missing_model_is_one_clear_line() {
    let dir = temp_dir("missing-model");
    let e = fails(
        harness()
            .args([
                "eval", "--task", "addition", "--digits", "1", "--n", "1", "--model",
            ])
            .arg(dir.join("nope.gguf"))
            .arg("--out")
            .arg(dir.join("run")),
    );
    assert!(e.contains("nope.gguf") && e.contains("no such file"), "{e}");
}

#[test]
fn a_gpu_asked_of_the_cpu_build_says_how_to_get_one_and_leaves_no_run_folder() {
    let dir = temp_dir("device");
    write_tiny_model(&dir.join("model"), 1);
    let eval = |device: &str, run: &str| {
        let mut cmd = harness();
        cmd.args(["eval", "--task", "addition", "--digits", "1", "--n", "1"])
            .args(["--device", device, "--model"])
            .arg(dir.join("model"))
            .arg("--out")
            .arg(dir.join(run));
        cmd
    };
    let e = fails(&mut eval("cuda", "run"));
    assert!(
        e.contains("built without CUDA") && e.contains("scripts/build-cuda.sh"),
        "{e}"
    );
    assert!(!dir.join("run").exists(), "a failed load left a run folder");
    let e = fails(&mut eval("gpu", "run2"));
    assert!(e.contains("`cpu`, `cuda` or `cuda:N`"), "{e}");
    // The CPU, named, is the default.
    let out = eval("cpu", "run3").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record = std::fs::read_to_string(dir.join("run3/run.toml")).unwrap();
    assert!(record.contains("device = \"cpu\""), "{record}");
}

#[test]
fn a_corrupt_model_file_is_one_clear_line() {
    let dir = temp_dir("corrupt-model");
    let model = dir.join("broken.gguf");
    std::fs::write(&model, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let e = fails(
        harness()
            .args([
                "eval", "--task", "addition", "--digits", "1", "--n", "1", "--model",
            ])
            .arg(&model)
            .arg("--out")
            .arg(dir.join("run")),
    );
    assert!(e.contains("is not a usable checkpoint"), "{e}");
    std::fs::write(&model, b"hello").unwrap();
    let e = fails(
        harness()
            .args([
                "eval", "--task", "addition", "--digits", "1", "--n", "1", "--model",
            ])
            .arg(&model)
            .arg("--out")
            .arg(dir.join("run2")),
    );
    assert!(e.contains("not a GGUF file"), "{e}");
}

#[test]
fn model_metadata_out_of_range_is_one_line_naming_the_field() {
    let dir = temp_dir("bad-metadata");
    write_tiny_model(&dir.join("model"), 1);
    let config_path = dir.join("model/config.json");
    let good = std::fs::read_to_string(&config_path).unwrap();
    for (key, value, want) in [
        (
            "num_attention_heads",
            "0",
            "config.json `num_attention_heads` is 0",
        ),
        (
            "num_hidden_layers",
            "1073741824",
            "config.json `num_hidden_layers` = 1073741824 but the file holds tensors of 2 layers",
        ),
        (
            "num_key_value_heads",
            "3",
            "`num_key_value_heads` = 3 does not divide",
        ),
    ] {
        let mut config: serde_json::Value = serde_json::from_str(&good).unwrap();
        config[key] = serde_json::from_str(value).unwrap();
        std::fs::write(&config_path, config.to_string()).unwrap();
        let e = fails(
            harness()
                .args([
                    "eval", "--task", "addition", "--digits", "1", "--n", "1", "--model",
                ])
                .arg(dir.join("model"))
                .arg("--out")
                .arg(dir.join("run")),
        );
        assert!(
            e.contains(want) && e.contains("not a usable checkpoint"),
            "{e}"
        );
        assert!(!dir.join("run").exists());
    }
}

#[test]
fn duplicate_plugin_names_name_both_files() {
    let dir = temp_dir("duplicate");
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_harness"))
        .parent()
        .unwrap();
    let name = format!("libharness_metrics.{}", std::env::consts::DLL_EXTENSION);
    std::fs::copy(bin_dir.join(&name), dir.join(&name)).unwrap();
    let e = fails(harness().arg("--plugin-dir").arg(&dir).arg("list"));
    assert!(e.contains("two plugins provide the metric"), "{e}");
    assert!(e.matches(name.as_str()).count() == 2, "{e}");
}

#[test]
fn a_task_built_outside_the_workspace_loads_without_rebuilding_harness() {
    let plugin_dir = build_fixture("copy-task");
    let out = ok(harness().arg("--plugin-dir").arg(&plugin_dir).arg("list"));
    let line = out
        .lines()
        .find(|l| l.starts_with("task") && l.contains(" copy "))
        .expect(&out);
    assert!(
        line.contains("0.3.1") && line.contains("libcopy_task"),
        "{line}"
    );

    // It evaluates end to end on a tiny model with the released binary.
    let dir = temp_dir("copy-eval");
    write_tiny_model(&dir.join("model"), 1);
    let out = ok(harness()
        .arg("--plugin-dir")
        .arg(&plugin_dir)
        .args(["eval", "--task", "copy", "--option", "n=4", "--model"])
        .arg(dir.join("model"))
        .arg("--out")
        .arg(dir.join("run")));
    assert!(out.contains("exact-match"), "{out}");
    let results = std::fs::read_to_string(dir.join("run/results.csv")).unwrap();
    assert!(results.contains("copy,all,exact-match,4,"), "{results}");

    // A panic inside the plugin is an error naming it, not a crash.
    let e = fails(
        harness()
            .arg("--plugin-dir")
            .arg(&plugin_dir)
            .args([
                "eval",
                "--task",
                "copy",
                "--option",
                "panic=true",
                "--model",
            ])
            .arg(dir.join("model"))
            .arg("--out")
            .arg(dir.join("run-panic")),
    );
    assert!(e.contains("plugin `copy` panicked: asked to panic"), "{e}");
}

#[test]
fn a_metric_built_outside_the_workspace_scores_and_its_panic_ends_the_run_cleanly() {
    let plugin_dir = build_fixture("char-f1");
    build_fixture("copy-task");
    let out = ok(harness().arg("--plugin-dir").arg(&plugin_dir).arg("list"));
    assert!(
        out.lines()
            .any(|l| l.starts_with("metric") && l.contains(" char-f1 ")),
        "{out}"
    );
    let dir = temp_dir("char-f1");
    write_tiny_model(&dir.join("model"), 1);
    let eval = |words: &str, run: &str| {
        let mut c = harness();
        c.arg("--plugin-dir")
            .arg(&plugin_dir)
            .args(["eval", "--task", "copy", "--option", "n=6", "--option"])
            .arg(format!("words={words}"))
            .args(["--metric", "char-f1,exact-match", "--batch", "2", "--model"])
            .arg(dir.join("model"))
            .arg("--out")
            .arg(dir.join(run));
        c
    };
    ok(&mut eval("apple,river", "run"));
    let results = std::fs::read_to_string(dir.join("run/results.csv")).unwrap();
    assert!(results.contains("copy,all,char-f1,6,"), "{results}");
    let run_toml = std::fs::read_to_string(dir.join("run/run.toml")).unwrap();
    assert!(run_toml.contains("[metrics.scale]"), "{run_toml}");

    // The third instance's target makes the metric panic: the run ends with one line naming
    // the metric and the instance, and keeps the two instances of the first batch.
    let e = fails(&mut eval("apple,river,panic", "run-panic"));
    assert!(
        e.contains("metric `char-f1` failed on instance `copy-2`")
            && e.contains("plugin `char-f1` panicked: asked to panic")
            && e.contains("the 2 instances answered before are kept")
            && e.contains("harness eval --resume"),
        "{e}"
    );
    let samples = std::fs::read_to_string(dir.join("run-panic/samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 2, "{samples}");
    assert!(dir.join("run-panic/run.toml").exists());
    assert!(!dir.join("run-panic/results.csv").exists());
}

/// The code blocks of README.md's "Write your own task" and "Write your own metric", in order.
fn readme_plugin_code() -> (String, String, String) {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme.find("## Write your own task").unwrap();
    let end = start + readme[start..].find("## Layout").unwrap();
    let mut blocks = Vec::new();
    let mut rest = &readme[start..end];
    while let Some(open) = rest.find("```") {
        let body_start = open + rest[open..].find('\n').unwrap() + 1;
        let close = body_start + rest[body_start..].find("```").unwrap();
        blocks.push(rest[body_start..close].to_string());
        rest = &rest[close + 3..];
    }
    assert_eq!(blocks.len(), 3, "expected Cargo.toml, task and metric code");
    (blocks[0].clone(), blocks[1].clone(), blocks[2].clone())
}

#[test]
fn the_readme_task_and_metric_build_outside_the_workspace_and_run() {
    let (manifest, task, metric) = readme_plugin_code();
    let root = repo_root();
    let abi = root.join("harness/abi").display().to_string();
    let manifest = manifest.replace("/path/to/harness/harness/abi", &abi);
    let work = root.join("target").join("readme-plugins");
    let target = root.join("target").join("fixtures");
    for (name, code) in [("double-task", &task), ("contains-metric", &metric)] {
        let dir = work.join(name);
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(
            dir.join("Cargo.toml"),
            manifest.replace("double-task", name) + "\n[workspace]\n",
        )
        .unwrap();
        std::fs::write(dir.join("src/lib.rs"), code).unwrap();
        // The fixture's lock pins the same dependencies, so no new versions are resolved.
        std::fs::copy(
            root.join("tests/fixtures/copy-task/Cargo.lock"),
            dir.join("Cargo.lock"),
        )
        .unwrap();
        let status =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["build", "--release", "--quiet", "--manifest-path"])
                .arg(dir.join("Cargo.toml"))
                .arg("--target-dir")
                .arg(&target)
                .status()
                .unwrap();
        assert!(status.success(), "the README's {name} does not build");
    }
    let plugin_dir = target.join("release");
    let dir = temp_dir("readme-plugins");
    write_tiny_model(&dir.join("model"), 1);
    let out = ok(harness()
        .arg("--plugin-dir")
        .arg(&plugin_dir)
        .args([
            "eval", "--task", "double", "--option", "start=50", "--n", "3",
        ])
        .args(["--metric", "contains,exact-match", "--model"])
        .arg(dir.join("model"))
        .arg("--out")
        .arg(dir.join("run")));
    assert!(out.contains("contains"), "{out}");
    let results = std::fs::read_to_string(dir.join("run/results.csv")).unwrap();
    assert!(results.contains("double,all,contains,3,"), "{results}");
    let samples = std::fs::read_to_string(dir.join("run/samples.jsonl")).unwrap();
    assert!(samples.contains("Question: 50 + 50"), "{samples}");
    let e = fails(
        harness()
            .arg("--plugin-dir")
            .arg(&plugin_dir)
            .args(["eval", "--task", "double", "--option", "strt=5", "--model"])
            .arg(dir.join("model")),
    );
    assert!(
        e.contains("double: unknown option `strt` (did you mean `start`?)"),
        "{e}"
    );
}

#[test]
fn without_a_fetched_model_eval_says_how_to_fetch_it() {
    let cache = temp_dir("empty-cache");
    let e = fails(
        harness()
            .env("HARNESS_CACHE", &cache)
            .args(["eval", "--task", "addition", "--digits", "1", "--n", "1"]),
    );
    assert!(e.contains("run `harness fetch` first"), "{e}");
    assert!(e.contains(&cache.display().to_string()), "{e}");
    let e = fails(harness().env("HARNESS_CACHE", &cache).args([
        "eval",
        "--task",
        "mmlu",
        "--subject",
        "virology",
        "--model",
        "x.gguf",
    ]));
    assert!(e.contains("run `harness fetch`"), "{e}");
}

#[test]
fn help_teaches_the_options() {
    let out = ok(harness().args(["eval", "--help"]));
    for flag in [
        "--task",
        "--metric",
        "--digits",
        "--subject",
        "--scoring",
        "--resume",
        "--plugin-dir",
    ] {
        assert!(out.contains(flag), "eval --help lacks {flag}");
    }
}

#[test]
fn a_missing_adapter_is_one_clear_line() {
    let dir = temp_dir("no-adapter");
    let e = fails(
        harness()
            .args([
                "eval",
                "--task",
                "addition",
                "--model",
                "x.gguf",
                "--adapter",
            ])
            .arg(dir.join("nothing")),
    );
    assert!(e.contains("no adapter_config.json there"), "{e}");
}

#[test]
fn a_plugin_built_against_another_abi_version_is_refused_with_the_reason() {
    // Build the copy-task plugin against a copy of harness-abi that claims to be the previous
    // ABI version, 0.1.0: an old plugin.
    let root = repo_root();
    let work = root.join("target").join("fixtures-abi-old");
    let abi = work.join("abi");
    let task = work.join("copy-task");
    std::fs::create_dir_all(abi.join("src")).unwrap();
    std::fs::create_dir_all(task.join("src")).unwrap();
    for entry in std::fs::read_dir(root.join("harness/abi/src")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, abi.join("src").join(p.file_name().unwrap())).unwrap();
    }
    let ours = format!("version = \"{}\"", harness_abi::VERSION);
    let abi_manifest = std::fs::read_to_string(root.join("harness/abi/Cargo.toml")).unwrap();
    assert!(abi_manifest.contains(&ours), "{abi_manifest}");
    let abi_manifest = abi_manifest
        .replace(&ours, "version = \"0.1.0\"")
        .replace("edition.workspace = true", "edition = \"2021\"")
        .replace("license.workspace = true", "")
        .replace("abi_stable.workspace = true", "abi_stable = \"0.11.3\"")
        .replace("toml.workspace = true", "toml = \"0.8\"")
        .replace(
            "serde.workspace = true",
            "serde = { version = \"1\", features = [\"derive\"] }",
        );
    std::fs::write(abi.join("Cargo.toml"), abi_manifest).unwrap();
    let manifest = std::fs::read_to_string(root.join("tests/fixtures/copy-task/Cargo.toml"))
        .unwrap()
        .replace("../../../harness/abi", "../abi");
    std::fs::write(task.join("Cargo.toml"), manifest).unwrap();
    std::fs::copy(
        root.join("tests/fixtures/copy-task/src/lib.rs"),
        task.join("src/lib.rs"),
    )
    .unwrap();
    std::fs::copy(
        root.join("tests/fixtures/copy-task/Cargo.lock"),
        task.join("Cargo.lock"),
    )
    .unwrap();
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--quiet", "--manifest-path"])
            .arg(task.join("Cargo.toml"))
            .arg("--target-dir")
            .arg(work.join("target"))
            .status()
            .unwrap();
    assert!(status.success());
    let plugin_dir = work.join("target/release");

    let o = run(harness().arg("--plugin-dir").arg(&plugin_dir).arg("list"));
    assert!(o.status.success());
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("libcopy_task")
            && err.contains("built against harness-abi 0.1.0")
            && err.contains("rebuild the plugin"),
        "{err}"
    );
    assert!(!stdout(&o).contains(" copy "));
}

#[test]
fn plugins_are_found_through_harness_plugin_path() {
    let plugin_dir = build_fixture("copy-task");
    let out = ok(harness()
        .env("HARNESS_PLUGIN_PATH", &plugin_dir)
        .arg("list"));
    assert!(
        out.lines()
            .any(|l| l.starts_with("task") && l.contains(" copy ")),
        "{out}"
    );
}
