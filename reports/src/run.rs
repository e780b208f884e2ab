//! Reading run folders back for reports and comparisons: `run.toml` (loosely, so folders written
//! by older versions still read), `results.csv`, `samples.jsonl`, and the record of the adapter a
//! run used (its `train.toml` and `train.csv`).
//!
//! Key decision: nothing here needs the plugins; a report is made from files alone, so it works
//! on run folders copied from another machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{ReportError, ResultRow};

/// One evaluated instance as read from `samples.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub id: String,
    pub group: String,
    /// Metric name -> score.
    pub scores: BTreeMap<String, f64>,
    /// What the task said about the instance beyond its group (`carries`, `seen`), if anything.
    pub attributes: BTreeMap<String, String>,
}

/// A run folder, read for reporting.
#[derive(Debug, Clone)]
pub struct Run {
    pub dir: PathBuf,
    /// What a figure's legend calls the run: the label given at eval time, else model + adapter
    /// + base.
    pub label: String,
    pub task: String,
    pub results: Vec<ResultRow>,
    /// The adapter folder the run evaluated, if any, as run.toml records it (absolute since
    /// this version; an older relative one is read against the current folder).
    pub adapter: Option<PathBuf>,
    /// The digit counts k the adapter was trained on, when its train.toml records them.
    pub trained_digits: Option<Vec<u32>>,
    /// The palette index figures draw the run in (default: its position among the runs
    /// reported together); a study gives each variant one colour across all its figures.
    pub color: Option<usize>,
    /// The range each metric declared (run.toml's `[[metrics]] scale`; absent in runs of
    /// harness before 0.2 of the plugin ABI).
    pub scales: std::collections::BTreeMap<String, crate::stats::Scale>,
}

fn err(path: &Path, what: impl std::fmt::Display) -> ReportError {
    ReportError::Run(format!("{}: {what}", path.display()))
}

impl Run {
    /// Reads `dir/run.toml` and `dir/results.csv`.
    pub fn read(dir: &Path) -> Result<Run, ReportError> {
        let record_path = dir.join("run.toml");
        let text = std::fs::read_to_string(&record_path).map_err(|e| {
            err(
                dir,
                format!("not a finished run folder (cannot read run.toml: {e})"),
            )
        })?;
        let record: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| err(&record_path, e.message().to_string()))?;
        let results_path = dir.join("results.csv");
        let results = read_results(&results_path).map_err(|e| match e {
            ReportError::Io(io) if io.kind() == std::io::ErrorKind::NotFound => err(
                dir,
                "has no results.csv; the run is unfinished (finish it with `harness eval --resume`)",
            ),
            other => other,
        })?;
        let task = record
            .get("task")
            .and_then(|t| t.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("task")
            .to_string();
        let backend_options: toml::Table = record
            .get("backend")
            .and_then(|b| b.get("options"))
            .and_then(|o| o.as_str())
            .and_then(|o| o.parse().ok())
            .unwrap_or_default();
        let adapter = backend_options
            .get("adapter")
            .and_then(|a| a.as_str())
            .map(PathBuf::from);
        let base = backend_options
            .get("base")
            .and_then(|b| b.as_str())
            .map(str::to_string);
        // Only a precision other than the default f32 is named.
        let compute = backend_options
            .get("compute")
            .and_then(|c| c.as_str())
            .filter(|c| *c != "f32");
        let model = record
            .get("model")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("model");
        let label = match record.get("label").and_then(|l| l.as_str()) {
            Some(l) if !l.is_empty() => l.to_string(),
            _ => default_label(model, adapter.as_deref(), base.as_deref(), compute),
        };
        let trained_digits = adapter
            .as_deref()
            .and_then(|a| read_train_toml(a).ok())
            .and_then(|t| trained_digits(&t));
        let scales = record
            .get("metrics")
            .and_then(|m| m.as_array())
            .into_iter()
            .flatten()
            .filter_map(|m| {
                let name = m.get("name")?.as_str()?.to_string();
                let scale = m.get("scale")?.clone().try_into().ok()?;
                Some((name, scale))
            })
            .collect();
        Ok(Run {
            dir: dir.to_path_buf(),
            label,
            task,
            results,
            adapter,
            trained_digits,
            color: None,
            scales,
        })
    }

    /// The run's samples, in file order.
    pub fn samples(&self) -> Result<Vec<Sample>, ReportError> {
        read_samples(&self.dir.join("samples.jsonl"))
    }

    /// The result rows of one metric.
    pub fn metric(&self, metric: &str) -> impl Iterator<Item = &ResultRow> {
        let metric = metric.to_string();
        self.results.iter().filter(move |r| r.metric == metric)
    }
}

/// `model + adapter NAME (base, compute)`, e.g. `SmolLM2-135M-Instruct + addition-1-7 (nf4)` or
/// `SmolLM2-135M-Instruct (gguf, bf16)`.
fn default_label(
    model: &str,
    adapter: Option<&Path>,
    base: Option<&str>,
    compute: Option<&str>,
) -> String {
    let mut s = model.to_string();
    if let Some(a) = adapter {
        let name = a
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| a.display().to_string());
        s.push_str(&format!(" + {name}"));
    }
    let notes: Vec<&str> = base.into_iter().chain(compute).collect();
    if !notes.is_empty() {
        s.push_str(&format!(" ({})", notes.join(", ")));
    }
    s
}

/// An adapter folder's train.toml.
pub fn read_train_toml(adapter: &Path) -> Result<toml::Table, ReportError> {
    let path = adapter.join("train.toml");
    let text = std::fs::read_to_string(&path)?;
    text.parse()
        .map_err(|e: toml::de::Error| err(&path, e.message().to_string()))
}

/// The digit counts in `[plan.task_options] digits` of a train.toml, when present.
fn trained_digits(train: &toml::Table) -> Option<Vec<u32>> {
    let spec = train
        .get("plan")?
        .get("task_options")?
        .get("digits")?
        .as_str()?;
    parse_digit_spec(spec)
}

/// `5`, `1-7`, `1,3,12` -> the digit counts; None when malformed.
pub fn parse_digit_spec(spec: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b || b > 1000 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

/// Reads a results.csv.
pub fn read_results(path: &Path) -> Result<Vec<ResultRow>, ReportError> {
    let file = std::fs::File::open(path)?;
    let mut r = csv::Reader::from_reader(file);
    let mut rows = Vec::new();
    for row in r.deserialize() {
        rows.push(row.map_err(|e| err(path, e))?);
    }
    Ok(rows)
}

/// Reads samples.jsonl in file order. A torn last line (a run killed mid-write) is skipped; a
/// malformed line elsewhere is an error naming its line.
pub fn read_samples(path: &Path) -> Result<Vec<Sample>, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, e))?;
    let mut out = Vec::new();
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    for (i, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |what: &str| err(path, format!("line {}: {what}", i + 1));
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| at(&format!("not valid JSON ({e})")))?;
        let id = v
            .get("id")
            .and_then(|x| x.as_str())
            .ok_or_else(|| at("no `id`"))?
            .to_string();
        let group = v
            .get("group")
            .and_then(|x| x.as_str())
            .unwrap_or("all")
            .to_string();
        let mut scores = BTreeMap::new();
        if let Some(s) = v.get("scores").and_then(|s| s.as_object()) {
            for (k, x) in s {
                if let Some(x) = x.as_f64() {
                    scores.insert(k.clone(), x);
                }
            }
        }
        let mut attributes = BTreeMap::new();
        if let Some(a) = v.get("attributes").and_then(|s| s.as_object()) {
            for (k, x) in a {
                let value = match x {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                attributes.insert(k.clone(), value);
            }
        }
        out.push(Sample {
            id,
            group,
            scores,
            attributes,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digit_specs() {
        assert_eq!(parse_digit_spec("1-7"), Some((1..=7).collect()));
        assert_eq!(parse_digit_spec("1,3,12"), Some(vec![1, 3, 12]));
        assert_eq!(parse_digit_spec("5"), Some(vec![5]));
        assert_eq!(parse_digit_spec("x"), None);
        assert_eq!(parse_digit_spec("7-1"), None);
    }

    #[test]
    fn labels_name_model_adapter_base_and_a_precision_other_than_f32() {
        assert_eq!(
            default_label("M", Some(Path::new("adapters/a-1-7")), Some("nf4"), None),
            "M + a-1-7 (nf4)"
        );
        assert_eq!(default_label("M", None, Some("f32"), None), "M (f32)");
        assert_eq!(
            default_label("M", None, Some("gguf"), Some("bf16")),
            "M (gguf, bf16)"
        );
    }

    #[test]
    fn samples_skip_a_torn_line_and_read_attributes() {
        let dir = std::env::temp_dir().join(format!("reports-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("samples.jsonl");
        std::fs::write(
            &path,
            "{\"id\":\"a\",\"group\":\"k=1\",\"scores\":{\"exact-match\":1.0},\"attributes\":{\"carries\":\"0\"}}\n{\"id\":\"b\",\"gro",
        )
        .unwrap();
        let s = read_samples(&path).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].scores["exact-match"], 1.0);
        assert_eq!(s[0].attributes["carries"], "0");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
