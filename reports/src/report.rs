//! From run folders to a report: the figures each kind of result calls for, the CSV of exactly
//! the numbers each figure plots, and Markdown tables, gathered as sections that `report.md`
//! embeds.
//!
//! What is drawn is decided by what the runs hold, not by task name:
//! - groups named `k=N` (addition): exact match vs k (the paper's Figure 2) and, with several
//!   metrics, every metric vs k side by side (Figure 3), the adapter's training range shaded;
//! - other groups (MMLU subjects): grouped bars per metric with the micro (`all`) and macro
//!   averages (Tables 2-3);
//! - a run whose adapter folder holds `train.csv`: its loss curve, raw and smoothed;
//! - instance attributes in samples.jsonl: accuracy split by each (`carries` as a line over its
//!   values, `seen` as bars per group), with Wilson intervals recomputed from the samples.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::figures::{self, BarFigure, BarSeries, Format, LineFigure, Panel, Point, Series};
use crate::run::{Run, Sample};
use crate::stats::Scale;
use crate::{fixed, stats, write_atomic, ReportError, ResultRow};

/// One part of a report: a figure (with its CSV) and/or a table.
#[derive(Debug, Clone)]
pub struct Section {
    pub title: String,
    /// The figure file, relative to the report folder.
    pub figure: Option<PathBuf>,
    /// The CSV of the plotted numbers, relative to the report folder.
    pub csv: Option<PathBuf>,
    /// A Markdown table (may be empty).
    pub table: String,
    /// A sentence on how to read it.
    pub caption: String,
}

/// Where figures go and in which format.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// The report folder; figures go to `out/figures/`.
    pub out: &'a Path,
    /// Prefix of every file name (an eval's name in a study; the task's otherwise).
    pub prefix: &'a str,
    pub format: Format,
    /// Draw the loss curve of each run's adapter (a study draws them once, under its recipe).
    pub loss: bool,
}

impl Target<'_> {
    fn paths(&self, name: &str) -> (PathBuf, PathBuf) {
        let dir = PathBuf::from("figures");
        (
            dir.join(format!(
                "{}-{name}.{}",
                self.prefix,
                self.format.extension()
            )),
            dir.join(format!("{}-{name}.csv", self.prefix)),
        )
    }
}

/// Legend labels, made unique (a repeated label gets its run folder's name).
pub fn labels(runs: &[Run]) -> Vec<String> {
    runs.iter()
        .map(|r| {
            let dup = runs.iter().filter(|o| o.label == r.label).count() > 1;
            if dup {
                format!(
                    "{} [{}]",
                    r.label,
                    r.dir.file_name().unwrap_or_default().to_string_lossy()
                )
            } else {
                r.label.clone()
            }
        })
        .collect()
}

/// The k of a group named `k=N`.
fn k_of(group: &str) -> Option<u32> {
    group.strip_prefix("k=")?.parse().ok()
}

/// Metrics in first-appearance order across runs.
fn metrics(runs: &[Run]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in runs {
        for row in &r.results {
            if !out.contains(&row.metric) {
                out.push(row.metric.clone());
            }
        }
    }
    out
}

fn metric_axis(metric: &str) -> (String, Option<(f64, f64)>) {
    match metric {
        "exact-match" => ("exact match (fraction correct)".into(), Some((0.0, 1.0))),
        "digit-accuracy" => (
            "digit accuracy (fraction of digits right)".into(),
            Some((0.0, 1.0)),
        ),
        "levenshtein" => ("Levenshtein distance (characters)".into(), None),
        other => (other.to_string(), None),
    }
}

fn metric_title(metric: &str) -> String {
    match metric {
        "exact-match" => "Exact match".into(),
        "digit-accuracy" => "Digit accuracy".into(),
        "levenshtein" => "Levenshtein distance (lower is better)".into(),
        other => other.to_string(),
    }
}

/// Writes the CSV rows (a header first) atomically.
fn write_csv_rows(path: &Path, header: &[&str], rows: &[Vec<String>]) -> Result<(), ReportError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(header)?;
    for r in rows {
        w.write_record(r)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| ReportError::Run(e.to_string()))?;
    write_atomic(path, &bytes)
}

/// Draws a figure to a temporary name and renames it, like [`write_atomic`].
fn draw_atomic(
    path: &Path,
    draw: impl FnOnce(&Path) -> Result<(), ReportError>,
) -> Result<(), ReportError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("png");
    let tmp = path.with_extension(format!("tmp.{ext}"));
    draw(&tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn point(r: &ResultRow, x: f64) -> Point {
    Point {
        x,
        mean: r.mean,
        low: r.ci_low,
        high: r.ci_high,
    }
}

/// The training range to shade: the first run whose adapter records its digits.
fn shade(runs: &[Run]) -> Option<(f64, f64, String)> {
    let digits = runs.iter().find_map(|r| r.trained_digits.clone())?;
    let (lo, hi) = (*digits.first()?, *digits.last()?);
    let contiguous = digits.len() as u32 == hi - lo + 1;
    let spec = if contiguous {
        format!("{lo}..{hi}")
    } else {
        digits
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    Some((
        f64::from(lo),
        f64::from(hi),
        format!("adapter trained on k = {spec}"),
    ))
}

/// Sections for the runs of one task: length-generalisation figures, per-group bars, loss
/// curves and attribute splits, whichever the runs call for.
pub fn sections(runs: &[Run], target: &Target<'_>) -> Result<Vec<Section>, ReportError> {
    let mut out = Vec::new();
    let labels = labels(runs);
    let has_k = runs
        .iter()
        .any(|r| r.results.iter().any(|row| k_of(&row.group).is_some()));
    if has_k {
        out.extend(length_sections(runs, &labels, target)?);
    } else {
        out.extend(group_sections(runs, &labels, target)?);
    }
    out.extend(attribute_sections(runs, &labels, target)?);
    if target.loss {
        out.extend(loss_sections(runs, target)?);
    }
    Ok(out)
}

fn length_sections(
    runs: &[Run],
    labels: &[String],
    target: &Target<'_>,
) -> Result<Vec<Section>, ReportError> {
    let metrics = metrics(runs);
    let shade = shade(runs);
    let panel = |metric: &str, rows: &mut Vec<Vec<String>>| -> Panel {
        let (y_label, y_range) = metric_axis(metric);
        let series = runs
            .iter()
            .zip(labels)
            .enumerate()
            .map(|(i, (run, label))| {
                let mut pts: Vec<(u32, &ResultRow)> = run
                    .metric(metric)
                    .filter_map(|row| k_of(&row.group).map(|k| (k, row)))
                    .collect();
                pts.sort_by_key(|(k, _)| *k);
                for (k, row) in &pts {
                    rows.push(vec![
                        metric.to_string(),
                        label.clone(),
                        row.group.clone(),
                        k.to_string(),
                        row.n.to_string(),
                        fixed(row.mean),
                        fixed(row.ci_low),
                        fixed(row.ci_high),
                    ]);
                }
                Series {
                    label: label.clone(),
                    points: pts
                        .iter()
                        .map(|(k, row)| point(row, f64::from(*k)))
                        .collect(),
                    band: true,
                    color: run.color.unwrap_or(i),
                    faint: false,
                }
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        Panel {
            title: metric_title(metric),
            y_label,
            y_range,
            series,
        }
    };
    const HEADER: [&str; 8] = [
        "metric", "run", "group", "k", "n", "mean", "ci_low", "ci_high",
    ];
    let mut sections = Vec::new();
    let primary = if metrics.iter().any(|m| m == "exact-match") {
        "exact-match".to_string()
    } else {
        metrics[0].clone()
    };
    {
        let mut rows = Vec::new();
        let fig = LineFigure {
            title: format!("{} vs number of digits k", metric_title(&primary)),
            x_label: "k (digits per operand)".into(),
            integer_x: true,
            // One panel: the figure's title says it all.
            panels: vec![Panel {
                title: String::new(),
                ..panel(&primary, &mut rows)
            }],
            shade: shade.clone(),
        };
        let (png, csv) = target.paths("accuracy-vs-k");
        draw_atomic(&target.out.join(&png), |p| {
            figures::line_figure(&fig, p, target.format)
        })?;
        write_csv_rows(&target.out.join(&csv), &HEADER, &rows)?;
        sections.push(Section {
            title: format!("{} vs k", metric_title(&primary)),
            figure: Some(png),
            csv: Some(csv),
            table: by_k_table(runs, labels, &primary),
            caption: format!(
                "One line per run; bands are 95% intervals (Wilson for 0/1 metrics){}.",
                if shade.is_some() {
                    "; the grey span is the range of k the adapter was trained on"
                } else {
                    ""
                }
            ),
        });
    }
    if metrics.len() > 1 {
        let mut rows = Vec::new();
        let panels: Vec<Panel> = metrics.iter().map(|m| panel(m, &mut rows)).collect();
        let fig = LineFigure {
            title: "Binary and continuous metrics vs number of digits k".into(),
            x_label: "k (digits per operand)".into(),
            integer_x: true,
            panels,
            shade,
        };
        let (png, csv) = target.paths("metrics-vs-k");
        draw_atomic(&target.out.join(&png), |p| {
            figures::line_figure(&fig, p, target.format)
        })?;
        write_csv_rows(&target.out.join(&csv), &HEADER, &rows)?;
        let mut table = String::new();
        for m in metrics.iter().filter(|m| **m != primary) {
            let _ = writeln!(table, "**{}**\n", metric_title(m));
            table.push_str(&by_k_table(runs, labels, m));
            table.push('\n');
        }
        sections.push(Section {
            title: "Every metric vs k".into(),
            figure: Some(png),
            csv: Some(csv),
            table,
            caption: "Exact match is all or nothing; digit accuracy and Levenshtein distance show \
                      how close the wrong answers are, which binary accuracy hides."
                .into(),
        });
    }
    Ok(sections)
}

fn cell(r: &ResultRow) -> String {
    format!("{:.3} [{:.3}, {:.3}]", r.mean, r.ci_low, r.ci_high)
}

/// Rows k (then `all`), one column per run.
fn by_k_table(runs: &[Run], labels: &[String], metric: &str) -> String {
    let mut groups: Vec<(u32, String)> = Vec::new();
    for r in runs {
        for row in r.metric(metric) {
            if let Some(k) = k_of(&row.group) {
                if !groups.iter().any(|(_, g)| *g == row.group) {
                    groups.push((k, row.group.clone()));
                }
            }
        }
    }
    groups.sort();
    let mut names: Vec<String> = groups.into_iter().map(|(_, g)| g).collect();
    names.push("all".into());
    markdown_table(runs, labels, metric, &names)
}

fn markdown_table(runs: &[Run], labels: &[String], metric: &str, groups: &[String]) -> String {
    let mut t = String::from("| group |");
    for l in labels {
        let _ = write!(t, " {} |", l.replace('|', "/"));
    }
    t.push_str("\n|---|");
    t.push_str(&"---|".repeat(labels.len()));
    t.push('\n');
    for g in groups {
        let name = match g.as_str() {
            "all" => "all (micro)".to_string(),
            other => other.to_string(),
        };
        let _ = write!(t, "| {name} |");
        for r in runs {
            let c = r
                .metric(metric)
                .find(|row| row.group == *g)
                .map(cell)
                .unwrap_or_else(|| "–".into());
            let _ = write!(t, " {c} |");
        }
        t.push('\n');
    }
    t
}

/// Grouped bars per metric over the groups (subjects), then `all` and `macro`.
fn group_sections(
    runs: &[Run],
    labels: &[String],
    target: &Target<'_>,
) -> Result<Vec<Section>, ReportError> {
    let mut sections = Vec::new();
    for metric in metrics(runs) {
        let mut groups: Vec<String> = Vec::new();
        for r in runs {
            for row in r.metric(&metric) {
                if row.group != "all" && row.group != "macro" && !groups.contains(&row.group) {
                    groups.push(row.group.clone());
                }
            }
        }
        let mut cats = groups.clone();
        cats.push("all".into());
        if runs
            .iter()
            .any(|r| r.metric(&metric).any(|row| row.group == "macro"))
        {
            cats.push("macro".into());
        }
        let mut rows = Vec::new();
        let series = runs
            .iter()
            .zip(labels)
            .enumerate()
            .map(|(i, (run, label))| {
                let values = cats
                    .iter()
                    .map(|g| {
                        run.metric(&metric).find(|row| row.group == *g).map(|row| {
                            rows.push(vec![
                                metric.clone(),
                                label.clone(),
                                row.group.clone(),
                                row.n.to_string(),
                                fixed(row.mean),
                                fixed(row.ci_low),
                                fixed(row.ci_high),
                            ]);
                            point(row, 0.0)
                        })
                    })
                    .collect();
                BarSeries {
                    label: label.clone(),
                    color: run.color.unwrap_or(i),
                    pale: false,
                    values,
                }
            })
            .collect();
        let (y_label, y_range) = metric_axis(&metric);
        let fig = BarFigure {
            title: format!("{} per group", metric_title(&metric)),
            y_label,
            y_range,
            categories: cats
                .iter()
                .map(|c| match c.as_str() {
                    "all" => "all (micro)".into(),
                    "macro" => "macro average".into(),
                    other => other.to_string(),
                })
                .collect(),
            series,
        };
        let name = format!("{metric}-by-group");
        let (png, csv) = target.paths(&name);
        draw_atomic(&target.out.join(&png), |p| {
            figures::bar_figure(&fig, p, target.format)
        })?;
        write_csv_rows(
            &target.out.join(&csv),
            &["metric", "run", "group", "n", "mean", "ci_low", "ci_high"],
            &rows,
        )?;
        sections.push(Section {
            title: format!("{} per group", metric_title(&metric)),
            figure: Some(png),
            csv: Some(csv),
            table: markdown_table(runs, labels, &metric, &cats),
            caption: "Bars are means with 95% intervals; `all` is the micro average over \
                      questions, `macro` the mean of the group means."
                .into(),
        });
    }
    Ok(sections)
}

/// The metric attribute splits are measured with: exact match when the runs have it.
fn split_metric(runs: &[Run]) -> Option<String> {
    let m = metrics(runs);
    m.iter()
        .find(|x| *x == "exact-match")
        .or_else(|| m.first())
        .cloned()
}

/// Attribute keys in the runs' samples (sorted), with their samples per run.
fn attribute_sections(
    runs: &[Run],
    labels: &[String],
    target: &Target<'_>,
) -> Result<Vec<Section>, ReportError> {
    let Some(metric) = split_metric(runs) else {
        return Ok(Vec::new());
    };
    let colors: Vec<usize> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| r.color.unwrap_or(i))
        .collect();
    let samples: Vec<Vec<Sample>> = runs
        .iter()
        .map(|r| {
            if r.dir.join("samples.jsonl").exists() {
                r.samples()
            } else {
                Ok(Vec::new())
            }
        })
        .collect::<Result<_, _>>()?;
    let mut keys: Vec<String> = samples
        .iter()
        .flatten()
        .flat_map(|s| s.attributes.keys().cloned())
        .collect();
    keys.sort();
    keys.dedup();
    // The range the metric declared, else (older runs) 0/1 when every score is.
    let scale = runs
        .iter()
        .find_map(|r| r.scales.get(&metric).copied())
        .unwrap_or_else(|| {
            let zero_one = samples
                .iter()
                .flatten()
                .all(|s| s.scores.get(&metric).is_none_or(|&x| x == 0.0 || x == 1.0));
            if zero_one {
                Scale::BINARY
            } else {
                Scale::UNBOUNDED
            }
        });
    let mut sections = Vec::new();
    for key in keys {
        let numeric = samples
            .iter()
            .flatten()
            .filter_map(|s| s.attributes.get(&key))
            .all(|v| v.parse::<i64>().is_ok());
        let mut values: Vec<&String> = samples
            .iter()
            .flatten()
            .filter_map(|s| s.attributes.get(&key))
            .collect();
        values.sort();
        values.dedup();
        if values.len() < 2 {
            // Every instance alike (no problem was seen in training): nothing to split.
            continue;
        }
        if numeric {
            sections.push(numeric_split(
                &colors, labels, &samples, &key, &metric, scale, target,
            )?);
        } else {
            sections.push(category_split(
                &colors, labels, &samples, &key, &metric, scale, target,
            )?);
        }
    }
    Ok(sections)
}

fn summary_point(xs: &[f64], scale: Scale, x: f64) -> Point {
    let (mean, _, low, high) = stats::summarize(xs, scale);
    Point { x, mean, low, high }
}

/// Accuracy as a line over the values of a numeric attribute (carries).
#[allow(clippy::too_many_arguments)]
fn numeric_split(
    colors: &[usize],
    labels: &[String],
    samples: &[Vec<Sample>],
    key: &str,
    metric: &str,
    scale: Scale,
    target: &Target<'_>,
) -> Result<Section, ReportError> {
    let mut rows = Vec::new();
    let mut table = format!("| {key} |");
    for l in labels {
        let _ = write!(table, " {} |", l.replace('|', "/"));
    }
    table.push_str("\n|---|");
    table.push_str(&"---|".repeat(labels.len()));
    table.push('\n');
    let mut per_run: Vec<BTreeMap<i64, Vec<f64>>> = Vec::new();
    for s in samples {
        let mut m: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
        for x in s {
            if let (Some(v), Some(score)) = (
                x.attributes.get(key).and_then(|v| v.parse().ok()),
                x.scores.get(metric),
            ) {
                m.entry(v).or_default().push(*score);
            }
        }
        per_run.push(m);
    }
    let mut values: Vec<i64> = per_run.iter().flat_map(|m| m.keys().copied()).collect();
    values.sort();
    values.dedup();
    let mut series = Vec::new();
    for (i, (m, label)) in per_run.iter().zip(labels).enumerate() {
        let mut points = Vec::new();
        for (v, xs) in m {
            let p = summary_point(xs, scale, *v as f64);
            rows.push(vec![
                metric.to_string(),
                label.clone(),
                v.to_string(),
                xs.len().to_string(),
                fixed(p.mean),
                fixed(p.low),
                fixed(p.high),
            ]);
            points.push(p);
        }
        if !points.is_empty() {
            series.push(Series {
                label: label.clone(),
                points,
                band: true,
                color: colors[i],
                faint: false,
            });
        }
    }
    for v in &values {
        let _ = write!(table, "| {v} |");
        for m in &per_run {
            let c = m
                .get(v)
                .map(|xs| {
                    let p = summary_point(xs, scale, 0.0);
                    format!(
                        "{:.3} [{:.3}, {:.3}] (n={})",
                        p.mean,
                        p.low,
                        p.high,
                        xs.len()
                    )
                })
                .unwrap_or_else(|| "–".into());
            let _ = write!(table, " {c} |");
        }
        table.push('\n');
    }
    let (y_label, y_range) = metric_axis(metric);
    let fig = LineFigure {
        title: format!("{} by {key}", metric_title(metric)),
        x_label: match key {
            "carries" => "carries in the sum (every k pooled)".to_string(),
            other => other.replace('_', " "),
        },
        integer_x: true,
        panels: vec![Panel {
            title: String::new(),
            y_label,
            y_range,
            series,
        }],
        shade: None,
    };
    let (png, csv) = target.paths(&format!("by-{key}"));
    draw_atomic(&target.out.join(&png), |p| {
        figures::line_figure(&fig, p, target.format)
    })?;
    write_csv_rows(
        &target.out.join(&csv),
        &["metric", "run", key, "n", "mean", "ci_low", "ci_high"],
        &rows,
    )?;
    Ok(Section {
        title: format!("{} by {key}", metric_title(metric)),
        figure: Some(png),
        csv: Some(csv),
        table,
        caption: format!(
            "Every instance of each run, split by its `{key}` attribute, all groups pooled (so \
             where the attribute grows with the group, as carries do with k, the two mix); 95% \
             intervals recomputed from the samples, wide where a value has few instances."
        ),
    })
}

/// Accuracy per group, split by the values of a categorical attribute (seen / unseen).
#[allow(clippy::too_many_arguments)]
fn category_split(
    colors: &[usize],
    labels: &[String],
    samples: &[Vec<Sample>],
    key: &str,
    metric: &str,
    scale: Scale,
    target: &Target<'_>,
) -> Result<Section, ReportError> {
    // Groups that have the attribute, in order of appearance (then `all`).
    let mut groups: Vec<String> = Vec::new();
    let mut values: Vec<String> = Vec::new();
    for s in samples.iter().flatten() {
        if let Some(v) = s.attributes.get(key) {
            if !groups.contains(&s.group) {
                groups.push(s.group.clone());
            }
            if !values.contains(v) {
                values.push(v.clone());
            }
        }
    }
    values.sort();
    values.reverse(); // `yes` before `no`
                      // Groups where the split splits (both values occur); only when there is none, every group.
    let mixed: Vec<String> = groups
        .iter()
        .filter(|g| {
            let mut seen: Vec<&String> = samples
                .iter()
                .flatten()
                .filter(|x| x.group == **g)
                .filter_map(|x| x.attributes.get(key))
                .collect();
            seen.sort();
            seen.dedup();
            seen.len() > 1
        })
        .cloned()
        .collect();
    if !mixed.is_empty() {
        groups = mixed;
    }
    groups.push("all".into());
    let mut rows = Vec::new();
    let mut series = Vec::new();
    let mut table = String::from("| group |");
    for l in labels {
        for v in &values {
            let _ = write!(table, " {} ({key} = {v}) |", l.replace('|', "/"));
        }
    }
    table.push_str("\n|---|");
    table.push_str(&"---|".repeat(labels.len() * values.len()));
    table.push('\n');
    let mut cells: Vec<Vec<String>> = vec![Vec::new(); groups.len()];
    for (ri, (s, label)) in samples.iter().zip(labels).enumerate() {
        for (vi, v) in values.iter().enumerate() {
            let mut points = Vec::new();
            for (gi, g) in groups.iter().enumerate() {
                let xs: Vec<f64> = s
                    .iter()
                    .filter(|x| (g == "all" || x.group == *g) && x.attributes.get(key) == Some(v))
                    .filter_map(|x| x.scores.get(metric).copied())
                    .collect();
                if xs.is_empty() {
                    points.push(None);
                    cells[gi].push("–".into());
                    continue;
                }
                let p = summary_point(&xs, scale, 0.0);
                rows.push(vec![
                    metric.to_string(),
                    label.clone(),
                    g.clone(),
                    v.clone(),
                    xs.len().to_string(),
                    fixed(p.mean),
                    fixed(p.low),
                    fixed(p.high),
                ]);
                cells[gi].push(format!(
                    "{:.3} [{:.3}, {:.3}] (n={})",
                    p.mean,
                    p.low,
                    p.high,
                    xs.len()
                ));
                points.push(Some(p));
            }
            series.push(BarSeries {
                label: format!("{label}, {key} = {v}"),
                color: colors[ri],
                pale: vi > 0,
                values: points,
            });
        }
    }
    for (g, c) in groups.iter().zip(&cells) {
        let _ = writeln!(table, "| {g} | {} |", c.join(" | "));
    }
    let (y_label, y_range) = metric_axis(metric);
    let fig = BarFigure {
        title: format!("{} by group, split by {key}", metric_title(metric)),
        y_label,
        y_range,
        categories: groups.clone(),
        series,
    };
    let (png, csv) = target.paths(&format!("by-{key}"));
    draw_atomic(&target.out.join(&png), |p| {
        figures::bar_figure(&fig, p, target.format)
    })?;
    write_csv_rows(
        &target.out.join(&csv),
        &[
            "metric", "run", "group", key, "n", "mean", "ci_low", "ci_high",
        ],
        &rows,
    )?;
    Ok(Section {
        title: format!("{} split by {key}", metric_title(metric)),
        figure: Some(png),
        csv: Some(csv),
        table,
        caption: format!(
            "Each run's instances split by their `{key}` attribute, in the groups where both \
             kinds occur and over all groups; 95% intervals recomputed from the samples."
        ),
    })
}

/// A loss curve per distinct adapter that has a train.csv.
fn loss_sections(runs: &[Run], target: &Target<'_>) -> Result<Vec<Section>, ReportError> {
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for run in runs {
        let Some(adapter) = &run.adapter else {
            continue;
        };
        if seen.contains(adapter) || !adapter.join("train.csv").is_file() {
            continue;
        }
        seen.push(adapter.clone());
        let base = adapter
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "adapter".into());
        // Two adapters in folders of the same name get distinct figures.
        let mut name = base.clone();
        let mut i = 2;
        while names.contains(&name) {
            name = format!("{base}-{i}");
            i += 1;
        }
        names.push(name.clone());
        out.push(loss_section(adapter, &name, target)?);
    }
    Ok(out)
}

/// The steps and losses of a train.csv.
pub fn read_curve(path: &Path) -> Result<Vec<(u64, f64)>, ReportError> {
    let mut r = csv::Reader::from_path(path)
        .map_err(|e| ReportError::Run(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| ReportError::Run(format!("{}: {e}", path.display())))?;
        let (Some(step), Some(loss)) = (
            rec.get(0).and_then(|s| s.parse().ok()),
            rec.get(2).and_then(|s| s.parse().ok()),
        ) else {
            continue;
        };
        out.push((step, loss));
    }
    Ok(out)
}

/// Trailing moving average over `window` steps.
pub fn smooth(curve: &[(u64, f64)], window: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(curve.len());
    let mut sum = 0.0;
    for i in 0..curve.len() {
        sum += curve[i].1;
        if i >= window {
            sum -= curve[i - window].1;
        }
        out.push(sum / (i + 1).min(window) as f64);
    }
    out
}

/// The training loss of one adapter, raw and smoothed.
pub fn loss_section(
    adapter: &Path,
    name: &str,
    target: &Target<'_>,
) -> Result<Section, ReportError> {
    let curve = read_curve(&adapter.join("train.csv"))?;
    let window = (curve.len() / 20).clamp(1, 100);
    let smoothed = smooth(&curve, window);
    let raw = Series {
        label: "loss per step".into(),
        points: curve
            .iter()
            .map(|&(s, l)| Point {
                x: s as f64,
                mean: l,
                low: l,
                high: l,
            })
            .collect(),
        band: false,
        color: 0,
        faint: true,
    };
    let avg = Series {
        label: format!("moving average over {window} steps"),
        points: curve
            .iter()
            .zip(&smoothed)
            .map(|(&(s, _), &m)| Point {
                x: s as f64,
                mean: m,
                low: m,
                high: m,
            })
            .collect(),
        band: false,
        color: 1,
        faint: false,
    };
    let fig = LineFigure {
        title: format!("Training loss of {name}"),
        x_label: "optimiser step".into(),
        integer_x: false,
        panels: vec![Panel {
            title: String::new(),
            y_label: "cross-entropy on completion tokens (nats)".into(),
            y_range: None,
            series: vec![raw, avg],
        }],
        shade: None,
    };
    let (png, csv) = target.paths(&format!("loss-{name}"));
    draw_atomic(&target.out.join(&png), |p| {
        figures::line_figure(&fig, p, target.format)
    })?;
    let rows: Vec<Vec<String>> = curve
        .iter()
        .zip(&smoothed)
        .map(|(&(s, l), &m)| vec![s.to_string(), fixed(l), fixed(m)])
        .collect();
    write_csv_rows(
        &target.out.join(&csv),
        &["step", "loss", &format!("moving_average_{window}")],
        &rows,
    )?;
    let (first, last) = (
        curve.first().map(|c| c.1).unwrap_or(f64::NAN),
        smoothed.last().copied().unwrap_or(f64::NAN),
    );
    Ok(Section {
        title: format!("Training loss: {name}"),
        figure: Some(png),
        csv: Some(csv),
        table: String::new(),
        caption: format!(
            "{} steps; loss {first:.3} at the first step, {last:.3} averaged over the last {window}.",
            curve.len()
        ),
    })
}

/// Markdown for sections: a heading, the figure, its caption, its table, and the CSV link.
pub fn markdown(sections: &[Section], heading: &str) -> String {
    let mut md = String::new();
    for s in sections {
        let _ = writeln!(md, "{heading} {}\n", s.title);
        if let Some(f) = &s.figure {
            let _ = writeln!(md, "![{}]({})\n", s.title, f.display());
        }
        if !s.caption.is_empty() {
            let _ = writeln!(md, "{}\n", s.caption);
        }
        if !s.table.is_empty() {
            let _ = writeln!(md, "{}", s.table);
        }
        if let Some(c) = &s.csv {
            let _ = writeln!(md, "Numbers plotted: [{}]({})\n", c.display(), c.display());
        }
    }
    md
}

/// A list of the runs: label, folder, task and what was evaluated.
pub fn runs_markdown(runs: &[Run]) -> String {
    let labels = labels(runs);
    let mut md = String::from("| run | folder | task | adapter |\n|---|---|---|---|\n");
    for (r, l) in runs.iter().zip(&labels) {
        let _ = writeln!(
            md,
            "| {} | `{}` | {} | {} |",
            l.replace('|', "/"),
            r.dir.display(),
            r.task,
            r.adapter
                .as_ref()
                .map(|a| format!("`{}`", a.display()))
                .unwrap_or_else(|| "none".into())
        );
    }
    md
}

/// `harness report`: every section for the runs (grouped by task) into `out`, and
/// `out/report.md`. Returns the sections written.
pub fn write_report(runs: &[Run], out: &Path, format: Format) -> Result<Vec<Section>, ReportError> {
    std::fs::create_dir_all(out)?;
    let mut tasks: Vec<String> = Vec::new();
    for r in runs {
        if !tasks.contains(&r.task) {
            tasks.push(r.task.clone());
        }
    }
    let mut md = String::from("# Report\n\n");
    md.push_str(&runs_markdown(runs));
    md.push('\n');
    let mut all = Vec::new();
    for task in &tasks {
        let group: Vec<Run> = runs.iter().filter(|r| r.task == *task).cloned().collect();
        let secs = sections(
            &group,
            &Target {
                out,
                prefix: task,
                format,
                loss: true,
            },
        )?;
        if tasks.len() > 1 {
            let _ = writeln!(md, "## {task}\n");
        }
        md.push_str(&markdown(&secs, if tasks.len() > 1 { "###" } else { "##" }));
        all.extend(secs);
    }
    write_atomic(&out.join("report.md"), md.as_bytes())?;
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::figures::color;

    /// Two hand-made run folders over k = 1..3 with three metrics, attributes, and an adapter
    /// with a loss curve; returns (root, runs).
    fn fixture(name: &str) -> (PathBuf, Vec<Run>) {
        let root = std::env::temp_dir().join(format!("reports-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let adapter = root.join("adapter");
        std::fs::create_dir_all(&adapter).unwrap();
        std::fs::write(
            adapter.join("train.toml"),
            "[plan]\ntask = \"addition\"\nexamples = 10\n[plan.task_options]\ndigits = \"1-2\"\n",
        )
        .unwrap();
        let mut curve = String::from("step,epoch,loss,lr,grad_norm,tokens\n");
        for s in 1..=60 {
            curve.push_str(&format!("{s},0,{:.6},0.0002,1.0,100\n", 2.0 / f64::from(s)));
        }
        std::fs::write(adapter.join("train.csv"), curve).unwrap();
        let mut runs = Vec::new();
        for (i, (label, adapter_line)) in [
            ("vanilla", String::new()),
            ("tuned", format!("adapter = \"{}\"\n", adapter.display())),
        ]
        .iter()
        .enumerate()
        {
            let dir = root.join(label);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("run.toml"),
                format!(
                    "label = \"{label}\"\n[task]\nname = \"addition\"\n[model]\nname = \"m\"\n[backend]\noptions = \"\"\"\nbase = \"nf4\"\n{adapter_line}\"\"\"\n"
                ),
            )
            .unwrap();
            let mut samples = String::new();
            let mut results = String::from("task,group,metric,n,mean,stderr,ci_low,ci_high\n");
            for k in 1..=3u32 {
                let correct = 4 - k as usize + i;
                for j in 0..4usize {
                    let em = if j < correct { 1.0 } else { 0.0 };
                    samples.push_str(&format!(
                        "{{\"id\":\"k{k}-{j}\",\"group\":\"k={k}\",\"scores\":{{\"exact-match\":{em},\"levenshtein\":{}}},\"attributes\":{{\"carries\":\"{}\",\"seen\":\"{}\"}}}}\n",
                        1.0 - em,
                        j % 2,
                        if j == 0 { "yes" } else { "no" }
                    ));
                }
                let p = correct.min(4) as f64 / 4.0;
                let (lo, hi) = stats::wilson(p, 4.0);
                results.push_str(&format!(
                    "addition,k={k},exact-match,4,{p:.6},0.100000,{lo:.6},{hi:.6}\n"
                ));
                results.push_str(&format!(
                    "addition,k={k},levenshtein,4,{:.6},0.100000,{:.6},{:.6}\n",
                    1.0 - p,
                    (1.0 - p - 0.2).max(0.0),
                    1.0 - p + 0.2
                ));
            }
            std::fs::write(dir.join("samples.jsonl"), samples).unwrap();
            std::fs::write(dir.join("results.csv"), results).unwrap();
            runs.push(Run::read(&dir).unwrap());
        }
        (root, runs)
    }

    /// (width, height, RGB pixels) of a PNG.
    fn decode(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
        let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
        let px = buf[..info.buffer_size()]
            .chunks(3)
            .map(|c| [c[0], c[1], c[2]])
            .collect();
        (info.width, info.height, px)
    }

    #[test]
    fn every_figure_renders_with_its_series_and_text() {
        let (root, runs) = fixture("figures");
        let out = root.join("report");
        let sections = write_report(&runs, &out, Format::Png).unwrap();
        let names: Vec<String> = sections
            .iter()
            .filter_map(|s| s.figure.as_ref())
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "addition-accuracy-vs-k.png",
                "addition-metrics-vs-k.png",
                "addition-by-carries.png",
                "addition-by-seen.png",
                "addition-loss-adapter.png"
            ]
        );
        for s in &sections {
            let path = out.join(s.figure.as_ref().unwrap());
            let (w, h, px) = decode(&path);
            // The size the figure module states: panels of 640 x 480 plus title and legend.
            let panels = if names[1] == path.file_name().unwrap().to_string_lossy() {
                2
            } else {
                1
            };
            if s.title.contains("vs k") || s.title.contains("metric") {
                assert_eq!(w, 640 * panels, "{}", path.display());
                assert_eq!(h, 44 + 480 + 26 + 16, "{}", path.display());
            }
            let distinct: std::collections::HashSet<[u8; 3]> = px.iter().copied().collect();
            assert!(distinct.len() > 8, "{}: nearly blank", path.display());
            let white = px.iter().filter(|p| **p == [255, 255, 255]).count();
            assert!(
                white < px.len() * 98 / 100,
                "{}: nearly blank",
                path.display()
            );
            // The first run's colour is drawn (lines, markers or bars); in a loss figure the
            // smoothed curve's.
            let c0 = if s.title.starts_with("Training loss") {
                color(1)
            } else {
                color(0)
            };
            let has = |c: RGBColor| {
                px.iter().any(|p| {
                    (p[0] as i32 - c.0 as i32).abs() <= 2
                        && (p[1] as i32 - c.1 as i32).abs() <= 2
                        && (p[2] as i32 - c.2 as i32).abs() <= 2
                })
            };
            assert!(has(c0), "{}: first series missing", path.display());
            // Text from the embedded font: dark pixels in the title band.
            let dark_in_title = px[..(w * 40) as usize]
                .iter()
                .filter(|p| p[0] < 100 && p[1] < 100 && p[2] < 100)
                .count();
            assert!(dark_in_title > 50, "{}: no title text", path.display());
        }
        // The second run (tuned) is drawn in the k figures too.
        let (_, _, px) = decode(&out.join("figures/addition-accuracy-vs-k.png"));
        let c1 = color(1);
        assert!(px.contains(&[c1.0, c1.1, c1.2]));
        std::fs::remove_dir_all(root).unwrap();
    }

    use plotters::style::RGBColor;

    #[test]
    fn figure_csvs_hold_exactly_the_results_plotted() {
        let (root, runs) = fixture("csv");
        let out = root.join("report");
        write_report(&runs, &out, Format::Png).unwrap();
        let csv = std::fs::read_to_string(out.join("figures/addition-metrics-vs-k.csv")).unwrap();
        let mut rows = 0;
        for line in csv.lines().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            let (metric, label, group) = (f[0], f[1], f[2]);
            let results = std::fs::read_to_string(root.join(label).join("results.csv")).unwrap();
            let want = format!("addition,{group},{metric},{},{},", f[4], f[5]);
            let row = results
                .lines()
                .find(|l| l.starts_with(&want))
                .unwrap_or_else(|| panic!("{line} not in {label}'s results.csv"));
            assert!(
                row.ends_with(&format!(",{},{}", f[6], f[7])),
                "{line} vs {row}"
            );
            rows += 1;
        }
        assert_eq!(rows, 2 * 3 * 2, "every (run, k, metric) plotted once");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn figures_are_the_same_bytes_every_time_and_svg_works() {
        let (root, runs) = fixture("determinism");
        write_report(&runs, &root.join("a"), Format::Png).unwrap();
        write_report(&runs, &root.join("b"), Format::Png).unwrap();
        for f in ["addition-accuracy-vs-k.png", "addition-by-seen.png"] {
            assert_eq!(
                std::fs::read(root.join("a/figures").join(f)).unwrap(),
                std::fs::read(root.join("b/figures").join(f)).unwrap(),
                "{f}"
            );
        }
        write_report(&runs, &root.join("svg"), Format::Svg).unwrap();
        let svg =
            std::fs::read_to_string(root.join("svg/figures/addition-metrics-vs-k.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<text") && svg.contains("tuned"));
        let md = std::fs::read_to_string(root.join("svg/report.md")).unwrap();
        assert!(md.contains("![Exact match vs k](figures/addition-accuracy-vs-k.svg)"));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn moving_average_is_trailing() {
        let c: Vec<(u64, f64)> = vec![(1, 1.0), (2, 3.0), (3, 5.0)];
        assert_eq!(smooth(&c, 2), vec![1.0, 2.0, 4.0]);
    }
}
