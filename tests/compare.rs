//! End-to-end tests of `harness compare`: two hand-made run folders in, the paired comparison
//! table, verdicts and CSV out. No model or plugins are needed.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// One instance of a hand-made run: id, group, exact-match, levenshtein.
type Row = (String, &'static str, f64, f64);

/// Writes a finished run folder (run.toml, results.csv, samples.jsonl) holding `rows`.
fn write_run(dir: &Path, label: &str, rows: &[Row]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("run.toml"),
        format!("label = \"{label}\"\n\n[task]\nname = \"addition\"\n\n[model]\nname = \"m\"\n"),
    )
    .unwrap();
    let n = rows.len();
    let mean = rows.iter().map(|r| r.2).sum::<f64>() / n as f64;
    std::fs::write(
        dir.join("results.csv"),
        format!(
            "task,group,metric,n,mean,stderr,ci_low,ci_high\naddition,all,exact-match,{n},{mean:.6},0.000000,{mean:.6},{mean:.6}\n"
        ),
    )
    .unwrap();
    let lines: String = rows
        .iter()
        .map(|(id, group, em, lev)| {
            format!(
                "{}\n",
                serde_json::json!({
                    "id": id,
                    "group": group,
                    "prediction": "",
                    "scores": {"exact-match": em, "levenshtein": lev},
                })
            )
        })
        .collect();
    std::fs::write(dir.join("samples.jsonl"), lines).unwrap();
}

/// 40 instances in groups k=1 and k=2. Exact match: 10 flipped to correct in B (ids 0-9), one
/// flipped to wrong (id 10), 15 right in both, 14 wrong in both: A 16/40, B 25/40. McNemar's
/// p for 10 vs 1 discordant pairs is 2 * (1 + 11) / 2^11 = 0.01171875.
fn two_runs(name: &str) -> (PathBuf, PathBuf) {
    let root = temp_dir(name);
    let mut a = Vec::new();
    let mut b = Vec::new();
    for i in 0..40u32 {
        let group = if i < 20 { "k=1" } else { "k=2" };
        let (x, y) = match i {
            0..=9 => (0.0, 1.0),
            10 => (1.0, 0.0),
            11..=25 => (1.0, 1.0),
            _ => (0.0, 0.0),
        };
        let lev_a = if x == 1.0 { 0.0 } else { f64::from(1 + i % 3) };
        let lev_b = if y == 1.0 { 0.0 } else { f64::from(1 + i % 4) };
        a.push((format!("add-{i}"), group, x, lev_a));
        b.push((format!("add-{i}"), group, y, lev_b));
    }
    // B's samples.jsonl in another order: pairing is by id.
    b.reverse();
    let (dir_a, dir_b) = (root.join("base"), root.join("tuned"));
    write_run(&dir_a, "base", &a);
    write_run(&dir_b, "tuned", &b);
    (dir_a, dir_b)
}

#[test]
fn prints_the_table_and_a_verdict_with_the_mcnemar_p_value() {
    let (a, b) = two_runs("compare-table");
    let out = ok(harness().arg("compare").arg(&a).arg(&b));
    assert!(
        out.starts_with(&format!(
            "A: base ({})\nB: tuned ({})\n",
            a.display(),
            b.display()
        )),
        "{out}"
    );
    let header = out
        .lines()
        .find(|l| l.starts_with("group"))
        .unwrap_or_else(|| panic!("no table header in:\n{out}"));
    for column in [
        "metric",
        "n",
        "A",
        "B",
        "B−A [95% CI]",
        "test",
        "p",
        "flips",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let all_em = out
        .lines()
        .find(|l| l.starts_with("all") && l.contains("exact-match"))
        .unwrap_or_else(|| panic!("no `all` exact-match row in:\n{out}"));
    assert!(
        all_em.contains("0.400  0.625")
            && all_em.contains("McNemar")
            && all_em.contains("0.0117")
            && all_em.ends_with("+10/−1"),
        "{all_em}"
    );
    for group in ["k=1", "k=2"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(group) && l.contains("exact-match")),
            "{out}"
        );
    }
    let verdict = out
        .lines()
        .find(|l| l.starts_with("exact-match: B − A = +0.225 ["))
        .unwrap_or_else(|| panic!("no exact-match verdict in:\n{out}"));
    assert!(
        verdict.ends_with("McNemar p = 0.0117: B is higher, beyond noise at the 5% level"),
        "{verdict}"
    );
    let lev = out
        .lines()
        .find(|l| l.starts_with("levenshtein: B − A ="))
        .unwrap_or_else(|| panic!("no levenshtein verdict in:\n{out}"));
    assert!(lev.contains(", permutation p "), "{lev}");
}

#[test]
fn out_writes_the_csv_and_the_same_seed_gives_the_same_bytes() {
    let (a, b) = two_runs("compare-csv");
    let csv = a.parent().unwrap().join("compare.csv");
    let out = ok(harness()
        .arg("compare")
        .arg(&a)
        .arg(&b)
        .args(["--seed", "3", "--resamples", "2000", "--out"])
        .arg(&csv));
    assert!(out.contains(&format!("wrote {}", csv.display())), "{out}");
    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "group,metric,n,mean_a,mean_b,diff,ci_low,ci_high,test,p_value,b_higher,a_higher,ties"
    );
    // Groups k=1, k=2, then all; each with exact-match and levenshtein.
    let keys: Vec<String> = lines[1..]
        .iter()
        .map(|l| l.split(',').take(2).collect::<Vec<_>>().join(","))
        .collect();
    assert_eq!(
        keys,
        [
            "k=1,exact-match",
            "k=1,levenshtein",
            "k=2,exact-match",
            "k=2,levenshtein",
            "all,exact-match",
            "all,levenshtein"
        ]
    );
    let all_em = lines[5];
    assert!(
        all_em.starts_with("all,exact-match,40,0.400000,0.625000,0.225000,")
            && all_em.ends_with(",McNemar,1.171875e-2,10,1,29"),
        "{all_em}"
    );
    assert!(lines[6].contains(",permutation,"), "{}", lines[6]);
    assert!(!a.parent().unwrap().join("compare.csv.tmp").exists());

    // Same seed, same bytes.
    let again = a.parent().unwrap().join("again.csv");
    ok(harness()
        .arg("compare")
        .arg(&a)
        .arg(&b)
        .args(["--seed", "3", "--resamples", "2000", "--out"])
        .arg(&again));
    assert_eq!(std::fs::read(&again).unwrap(), text.as_bytes());

    // One metric only.
    let out = ok(harness()
        .arg("compare")
        .arg(&a)
        .arg(&b)
        .args(["--metric", "exact-match"]));
    assert!(!out.contains("levenshtein"), "{out}");
}

#[test]
fn runs_over_different_instances_are_refused_in_one_line() {
    let (a, _) = two_runs("compare-ids");
    let root = a.parent().unwrap();
    let other: Vec<Row> = (0..40u32)
        .map(|i| {
            (
                format!("sub-{i}"),
                if i < 20 { "k=1" } else { "k=2" },
                1.0,
                0.0,
            )
        })
        .collect();
    let b = root.join("other");
    write_run(&b, "other", &other);
    let e = fails(harness().arg("compare").arg(&a).arg(&b));
    assert!(
        e.contains("not over the same instances")
            && e.contains("40 ids only in A (e.g. add-0, add-1, add-2)")
            && e.contains("40 only in B (e.g. sub-0, sub-1, sub-2)")
            && e.contains("same task options and seed"),
        "{e}"
    );

    // A metric one run lacks names what each has.
    let e = fails(
        harness()
            .arg("compare")
            .arg(&a)
            .arg(&a)
            .args(["--metric", "digit-accuracy"]),
    );
    assert!(
        e.contains("metric `digit-accuracy` is not in run A")
            && e.contains("A has: exact-match, levenshtein"),
        "{e}"
    );

    // A folder that is not a run.
    let e = fails(harness().arg("compare").arg(&a).arg(root.join("missing")));
    assert!(e.contains("not a finished run folder"), "{e}");
}
