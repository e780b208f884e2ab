//! Turning results into files, tables and figures people read: `results.csv` (one row per
//! task, group and metric), the summary table printed after an eval, run folders read back
//! ([`run`]), paired comparisons of two runs ([`compare`]), figures ([`figures`]) and reports.
//!
//! Key decision: numbers are written with a fixed number of decimals, so the same samples always
//! give byte-identical files whatever the platform's float printing.

use std::io::Write;

pub mod compare;
pub mod figures;
pub mod report;
pub mod run;
pub mod stats;

/// One aggregated result: a metric over the samples of a group.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResultRow {
    pub task: String,
    /// A group name, `all` (micro average over samples) or `macro` (mean of the group means).
    pub group: String,
    pub metric: String,
    pub n: u64,
    pub mean: f64,
    pub stderr: f64,
    pub ci_low: f64,
    pub ci_high: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write results: {0}")]
    Csv(#[from] csv::Error),
    #[error("cannot write results: {0}")]
    Io(#[from] std::io::Error),
    /// A file that could not be read or written (the message names it).
    #[error("{0}")]
    File(String),
    /// A run folder that cannot be read for a report (the message names the file).
    #[error("{0}")]
    Run(String),
    /// A figure that could not be drawn or written.
    #[error("cannot draw figure: {0}")]
    Figure(String),
}

/// Six fixed decimals (with −0 written as 0): the one number format of every file the
/// harness writes, so the same scores give the same bytes.
pub fn fixed(x: f64) -> String {
    format!("{:.6}", x + 0.0)
}

/// Writes `bytes` to `PATH.tmp`, syncs it, and renames it over `path` (making its folder), so
/// `path` is always either the old file or the whole new one, never half-written.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<(), ReportError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| io_at(dir, e))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(|e| io_at(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_at(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_at(path, e))?;
    Ok(())
}

/// An I/O error with the file it happened on.
fn io_at(path: &std::path::Path, e: std::io::Error) -> ReportError {
    ReportError::File(format!("{}: {e}", path.display()))
}

/// Writes `rows` as CSV with a header line.
pub fn write_csv(rows: &[ResultRow], out: impl Write) -> Result<(), ReportError> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record([
        "task", "group", "metric", "n", "mean", "stderr", "ci_low", "ci_high",
    ])?;
    for r in rows {
        w.write_record([
            r.task.clone(),
            r.group.clone(),
            r.metric.clone(),
            r.n.to_string(),
            fixed(r.mean),
            fixed(r.stderr),
            fixed(r.ci_low),
            fixed(r.ci_high),
        ])?;
    }
    w.flush()?;
    Ok(())
}

/// A plain-text table: one line per group, one `mean [ci_low, ci_high]` column per metric.
pub fn summary_table(rows: &[ResultRow]) -> String {
    let mut metrics: Vec<&str> = Vec::new();
    let mut groups: Vec<&str> = Vec::new();
    for r in rows {
        if !metrics.contains(&r.metric.as_str()) {
            metrics.push(&r.metric);
        }
        if !groups.contains(&r.group.as_str()) {
            groups.push(&r.group);
        }
    }
    let mut table: Vec<Vec<String>> = Vec::new();
    let mut header = vec!["group".to_string(), "n".to_string()];
    header.extend(metrics.iter().map(|m| m.to_string()));
    table.push(header);
    for g in &groups {
        let mut line = vec![g.to_string()];
        let n = rows
            .iter()
            .find(|r| r.group == *g)
            .map(|r| r.n.to_string())
            .unwrap_or_default();
        line.push(n);
        for m in &metrics {
            let cell = rows
                .iter()
                .find(|r| r.group == *g && r.metric == *m)
                .map(|r| format!("{:.3} [{:.3}, {:.3}]", r.mean, r.ci_low, r.ci_high))
                .unwrap_or_default();
            line.push(cell);
        }
        table.push(line);
    }
    let mut left = vec![false; table[0].len()];
    left[0] = true;
    aligned(&table, &left)
}

/// Lines of cells as a plain-text table: columns padded to their widest cell (counted in
/// characters), left- or right-aligned per column, two spaces apart, a rule under the first
/// line (the header).
pub fn aligned(lines: &[Vec<String>], left: &[bool]) -> String {
    let columns = lines.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .zip(left)
            .map(|((cell, &w), &left)| {
                let pad = " ".repeat(w - cell.chars().count());
                if left {
                    format!("{cell}{pad}")
                } else {
                    format!("{pad}{cell}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(group: &str, metric: &str, mean: f64) -> ResultRow {
        ResultRow {
            task: "addition".into(),
            group: group.into(),
            metric: metric.into(),
            n: 100,
            mean,
            stderr: 0.01,
            ci_low: mean - 0.02,
            ci_high: mean + 0.02,
        }
    }

    #[test]
    fn csv_has_fixed_decimals() {
        let mut out = Vec::new();
        write_csv(&[row("k=1", "exact-match", 0.74)], &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "task,group,metric,n,mean,stderr,ci_low,ci_high\naddition,k=1,exact-match,100,0.740000,0.010000,0.720000,0.760000\n"
        );
    }

    #[test]
    fn table_has_one_column_per_metric() {
        let t = summary_table(&[
            row("k=1", "exact-match", 0.5),
            row("k=1", "levenshtein", 1.0),
            row("k=2", "exact-match", 0.25),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["group", "n", "exact-match", "levenshtein"]
        );
        assert!(lines[2].contains("0.500 [0.480, 0.520]"));
        assert_eq!(lines.len(), 4);
    }
}
