//! Run folders, the product's memory: `run.toml` (everything needed to rerun), `samples.jsonl`
//! (one line per finished instance, appended and flushed as work finishes) and `results.csv`.
//!
//! Invariant: a finished file is never rewritten in place. `run.toml` and `results.csv` are
//! written to a temporary name and renamed; `samples.jsonl` only grows, and a line torn by a
//! kill is cut off before a resumed run appends to it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const RUN_TOML: &str = "run.toml";
pub const SAMPLES: &str = "samples.jsonl";
pub const RESULTS: &str = "results.csv";

/// A plugin component as recorded in run.toml.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Component {
    pub name: String,
    pub version: String,
    pub library: String,
    pub library_sha256: String,
    /// The options after the plugin filled in defaults, as TOML.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub options: String,
    /// A metric's declared range, which its intervals respect (reports read it back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<reports::stats::Scale>,
}

/// The model as recorded in run.toml.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelRecord {
    pub name: String,
    pub path: String,
    pub sha256: String,
    pub architecture: String,
    pub parameters: u64,
    pub device: String,
    /// The `--adapter` folder (absolute) and its sha256, checked when the run is resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_sha256: Option<String>,
}

/// run.toml.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    pub harness_version: String,
    pub created_utc: String,
    pub command: String,
    /// What reports call the run (`--label`); absent in older run folders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub batch: u64,
    /// `I/N` when the run is one shard of an eval (`--shard`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    /// Whether prompts were wrapped in the model's chat template (`--chat-template`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub chat_template: bool,
    pub task: Component,
    pub backend: Component,
    pub model: ModelRecord,
    pub metrics: Vec<Component>,
}

impl RunRecord {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(RUN_TOML);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}; is {} a run folder?",
                path.display(),
                dir.display()
            )
        })?;
        toml::from_str(&text)
            .with_context(|| format!("{} is not a valid run record", path.display()))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        write_atomic(&dir.join(RUN_TOML), toml::to_string(self)?.as_bytes())
    }
}

/// A resumed run's input (`what`: model, adapter, training data) must be the file it started
/// with: still at `path`, with the `recorded` sha256.
pub fn check_unchanged(what: &str, path: &Path, recorded: &str) -> Result<()> {
    if !path.exists() {
        bail!(
            "the run's {what} {} is gone; a run resumes with the {what} it started with",
            path.display()
        );
    }
    let now = sha256_path(path)?;
    if now != recorded {
        let short = |s: &str| s.chars().take(12).collect::<String>();
        bail!(
            "the run's {what} {} changed since the run started (sha256 {} recorded, {} now); a run resumes with the {what} it started with, so start a new one",
            path.display(),
            short(recorded),
            short(&now)
        );
    }
    Ok(())
}

/// Writes a file so that it is either the old one or the whole new one (reports' one way).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(reports::write_atomic(path, bytes)?)
}

/// sha256 of a file, or of a folder's files (names and contents, in name order).
pub fn sha256_path(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files {
            h.update(
                f.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .as_bytes(),
            );
            hash_file_into(&f, &mut h)?;
        }
    } else {
        hash_file_into(path, &mut h)?;
    }
    Ok(hex(&h.finalize()))
}

fn hash_file_into(path: &Path, h: &mut Sha256) -> Result<()> {
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    std::io::copy(&mut f, h)?;
    Ok(())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The finished samples of a run folder, keyed by instance id, after cutting off a torn last
/// line. Lines are kept as parsed JSON.
pub fn read_samples(dir: &Path) -> Result<BTreeMap<String, serde_json::Value>> {
    let path = dir.join(SAMPLES);
    let mut out = BTreeMap::new();
    let Ok(file) = File::open(&path) else {
        return Ok(out);
    };
    let mut reader = BufReader::new(file);
    let mut good_len = 0u64;
    let mut line = String::new();
    let mut number = 0;
    loop {
        line.clear();
        let read = reader.read_line(&mut line)?;
        if read == 0 {
            break;
        }
        number += 1;
        if !line.ends_with('\n') {
            break; // torn by a kill: dropped below
        }
        let v: serde_json::Value = serde_json::from_str(&line).with_context(|| {
            format!(
                "{} line {number} is not valid JSON; fix or delete that line",
                path.display()
            )
        })?;
        let Some(id) = v.get("id").and_then(|i| i.as_str()) else {
            bail!("{} line {number} has no `id`", path.display());
        };
        out.insert(id.to_string(), v);
        good_len += read as u64;
    }
    let len = std::fs::metadata(&path)?.len();
    if len != good_len {
        OpenOptions::new()
            .write(true)
            .open(&path)?
            .set_len(good_len)
            .with_context(|| format!("cannot repair {}", path.display()))?;
    }
    Ok(out)
}

/// Appends sample lines and flushes them, so a killed run keeps every finished instance.
pub struct SampleWriter {
    file: File,
}

impl SampleWriter {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(SAMPLES);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(SampleWriter { file })
    }

    pub fn append(&mut self, lines: &[serde_json::Value]) -> Result<()> {
        let mut buf = String::new();
        for l in lines {
            buf.push_str(&serde_json::to_string(l)?);
            buf.push('\n');
        }
        self.file.write_all(buf.as_bytes())?;
        self.file.flush()?;
        Ok(())
    }
}

/// Seconds since the epoch as `YYYYMMDD-HHMMSS` and RFC 3339, in UTC.
pub fn utc_now() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    (
        format!("{y:04}{mo:02}{d:02}-{h:02}{m:02}{s:02}"),
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z"),
    )
}

/// A new run folder `runs/<task>-<time>` (with a suffix if that exists already).
pub fn new_run_dir(task: &str) -> PathBuf {
    let (stamp, _) = utc_now();
    let base = PathBuf::from("runs").join(format!("{task}-{stamp}"));
    let mut dir = base.clone();
    let mut i = 2;
    while dir.exists() {
        dir = PathBuf::from(format!("{}-{i}", base.display()));
        i += 1;
    }
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_last_line_is_cut_off() {
        let dir = std::env::temp_dir().join(format!("harness-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(SAMPLES),
            "{\"id\":\"a\"}\n{\"id\":\"b\"}\n{\"id\":\"c\",\"pre",
        )
        .unwrap();
        let s = read_samples(&dir).unwrap();
        assert_eq!(s.keys().cloned().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(
            std::fs::read_to_string(dir.join(SAMPLES)).unwrap(),
            "{\"id\":\"a\"}\n{\"id\":\"b\"}\n"
        );
        let mut w = SampleWriter::open(&dir).unwrap();
        w.append(&[serde_json::json!({"id": "c"})]).unwrap();
        assert_eq!(read_samples(&dir).unwrap().len(), 3);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn utc_format_shape() {
        let (stamp, rfc) = utc_now();
        assert_eq!(stamp.len(), 15);
        assert!(rfc.ends_with('Z') && rfc.len() == 20);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn case_dir() -> PathBuf {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let d = std::env::temp_dir().join(format!(
                "run-dir-prop-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&d).unwrap();
            d
        }

        const RUN_TOML_TEXT: &str = "harness_version = \"0.1.0\"\ncreated_utc = \"2026-01-01T00:00:00Z\"\ncommand = \"harness eval\"\nbatch = 8\n\n[task]\nname = \"addition\"\nversion = \"0.1.0\"\nlibrary = \"/l.so\"\nlibrary_sha256 = \"ab\"\noptions = \"n = 3\"\n\n[backend]\nname = \"candle\"\nversion = \"0.1.0\"\nlibrary = \"/b.so\"\nlibrary_sha256 = \"cd\"\n\n[model]\nname = \"m\"\npath = \"/m.gguf\"\nsha256 = \"ef\"\narchitecture = \"llama\"\nparameters = 1\ndevice = \"cpu\"\n\n[[metrics]]\nname = \"exact-match\"\nversion = \"0.1.0\"\nlibrary = \"/x.so\"\nlibrary_sha256 = \"01\"\n";

        const SAMPLE: &str = r#"{"id":"k1-0","group":"k=1","prompt":"Q","prediction":"2","target":"2","scores":{"exact-match":1.0}}"#;

        proptest! {
            #![proptest_config(crate::proptest_config(1000))]

            /// run.toml with bytes overwritten: read, or one error line.
            #[test]
            fn mutated_run_toml(edits in prop::collection::vec((0..RUN_TOML_TEXT.len(), any::<u8>()), 1..5)) {
                let mut bytes = RUN_TOML_TEXT.as_bytes().to_vec();
                for (at, b) in edits {
                    bytes[at] = b;
                }
                let dir = case_dir();
                std::fs::write(dir.join(RUN_TOML), bytes).unwrap();
                if let Err(e) = RunRecord::read(&dir) {
                    let line = crate::error_line(&e);
                    prop_assert!(!line.contains('\n') && line.contains("run.toml"), "{line}");
                }
                let _ = std::fs::remove_dir_all(dir);
            }

            /// samples.jsonl with bytes overwritten in a line: read, or one error line.
            #[test]
            fn mutated_samples(edits in prop::collection::vec((0..SAMPLE.len(), any::<u8>()), 1..5), cut in any::<bool>()) {
                let mut line = SAMPLE.as_bytes().to_vec();
                for (at, b) in edits {
                    line[at] = b;
                }
                let mut text = format!("{SAMPLE}\n").into_bytes();
                text.extend(line);
                if !cut {
                    text.push(b'\n');
                }
                let dir = case_dir();
                std::fs::write(dir.join(SAMPLES), text).unwrap();
                if let Err(e) = read_samples(&dir) {
                    let line = crate::error_line(&e);
                    prop_assert!(!line.contains('\n'), "{line}");
                }
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}
