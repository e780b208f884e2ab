//! Finding and loading plugin libraries.
//!
//! Search order: every `--plugin-dir`, then the folders of `HARNESS_PLUGIN_PATH`, then the
//! folder beside the `harness` binary. Each file with the platform's library extension is
//! loaded with abi_stable, which checks that it was built against a compatible `harness-abi`.
//! A bad file (not a library, another ABI version, no root module) costs one warning line, never
//! the run; two components of the same kind and name are an error that names both files.
//!
//! abi_stable's `RootModule::load_from_*` caches the first module of a type in a static, so every
//! file goes through `lib_header_from_path(..).init_root_module()` instead. Libraries are never
//! unloaded (the trait objects they create may live until exit).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::anyhow;
use harness_abi::abi_stable::library::{lib_header_from_path, LibraryError};
use harness_abi::abi_stable::std_types::{RResult, RStr, RString};
use harness_abi::{BackendBox, MetricBox, PluginInfo, PluginKind, PluginLibRef, TaskBox};

use crate::run_dir::{self, Component};

/// One component found in a library.
#[derive(Clone)]
pub struct Entry {
    pub info: PluginInfo,
    pub library: PathBuf,
    pub lib: PluginLibRef,
}

/// Everything found in the plugin folders.
pub struct Registry {
    pub entries: BTreeMap<(PluginKind, String), Entry>,
    /// One line per file that could not be loaded.
    pub warnings: Vec<String>,
    /// The folders searched, in order.
    pub searched: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("two plugins provide the {kind} `{name}`: {first} and {second}; remove one of them from the plugin folders")]
    Duplicate {
        kind: &'static str,
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("unknown {kind} `{name}`{suggestion}; known {kind}s: {known} (see `harness list`)")]
    Unknown {
        kind: &'static str,
        name: String,
        suggestion: String,
        known: String,
    },
}

/// The folders to search, in order, without repeats.
pub fn search_path(plugin_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = plugin_dirs.to_vec();
    if let Some(paths) = std::env::var_os("HARNESS_PLUGIN_PATH") {
        dirs.extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        dirs.push(dir);
    }
    let mut seen = Vec::new();
    dirs.retain(|d| {
        let key = d.canonicalize().unwrap_or_else(|_| d.clone());
        if seen.contains(&key) {
            false
        } else {
            seen.push(key);
            true
        }
    });
    dirs
}

/// Loads every plugin library in `dirs`.
pub fn load(dirs: &[PathBuf]) -> Result<Registry, RegistryError> {
    let mut reg = Registry {
        entries: BTreeMap::new(),
        warnings: Vec::new(),
        searched: dirs.to_vec(),
    };
    let mut files_seen: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        let Ok(read) = std::fs::read_dir(dir) else {
            if !dir.exists() {
                reg.warnings
                    .push(format!("plugin folder {} does not exist", dir.display()));
            }
            continue;
        };
        let mut files: Vec<PathBuf> = read
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .is_some_and(|e| e == std::env::consts::DLL_EXTENSION)
            })
            .collect();
        files.sort();
        for file in files {
            let canonical = file.canonicalize().unwrap_or_else(|_| file.clone());
            if files_seen.contains(&canonical) {
                continue;
            }
            files_seen.push(canonical);
            match open(&file).and_then(|lib| {
                let manifest = (lib.manifest())()
                    .into_result()
                    .map_err(|e| format!("its manifest failed: {e}"))?;
                Ok((lib, manifest))
            }) {
                Ok((lib, manifest)) => reg.add(lib, manifest.into_vec(), &file)?,
                Err(why) => reg
                    .warnings
                    .push(format!("skipped {}: {why}", file.display())),
            }
        }
    }
    Ok(reg)
}

/// Loads one library and checks its ABI.
fn open(file: &Path) -> Result<PluginLibRef, String> {
    let header = lib_header_from_path(file).map_err(|e| describe(&e))?;
    header
        .init_root_module::<PluginLibRef>()
        .map_err(|e| describe(&e))
}

/// One line for a load error (abi_stable's own messages span many lines).
fn describe(e: &LibraryError) -> String {
    match e {
        LibraryError::OpenError { err, .. } => {
            format!("not a loadable library ({})", first_line(&err.to_string()))
        }
        LibraryError::GetSymbolError { .. } => {
            "not a harness plugin (it exports no harness root module)".into()
        }
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => version_mismatch(&actual_version.to_string(), &expected_version.to_string()),
        LibraryError::AbiInstability(e) => match other_abi_version(&e.to_string()) {
            Some(theirs) => version_mismatch(&theirs, harness_abi::VERSION),
            None => "its types do not match this harness's ABI (built against another harness-abi or abi_stable); rebuild the plugin".into(),
        },
        LibraryError::InvalidAbiHeader(_) | LibraryError::InvalidCAbi { .. } => {
            "its ABI does not match this harness (built against another harness-abi or abi_stable); rebuild the plugin".into()
        }
        LibraryError::RootModule { err, .. } => {
            format!("its root module failed to load: {}", first_line(&err.to_string()))
        }
        other => first_line(&other.to_string()),
    }
}

fn version_mismatch(theirs: &str, ours: &str) -> String {
    format!("built against harness-abi {theirs}, but this harness uses {ours}; rebuild the plugin against harness-abi {ours}")
}

/// abi_stable reports a version mismatch of our crate as a layout difference whose (long) text
/// names `package:'harness-abi' version:'X'` for both sides: the version that is not ours.
fn other_abi_version(report: &str) -> Option<String> {
    const MARK: &str = "package:'harness-abi' version:'";
    report
        .match_indices(MARK)
        .filter_map(|(at, _)| report[at + MARK.len()..].split('\'').next())
        .find(|v| *v != harness_abi::VERSION)
        .map(str::to_string)
}

fn first_line(s: &str) -> String {
    let line = s
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let mut out: String = line.chars().take(200).collect();
    if line.chars().count() > 200 {
        out.push('…');
    }
    out
}

impl Registry {
    fn add(
        &mut self,
        lib: PluginLibRef,
        manifest: Vec<PluginInfo>,
        file: &Path,
    ) -> Result<(), RegistryError> {
        for info in manifest {
            let key = (info.kind, info.name.to_string());
            if let Some(prev) = self.entries.get(&key) {
                return Err(RegistryError::Duplicate {
                    kind: info.kind.as_str(),
                    name: info.name.to_string(),
                    first: prev.library.clone(),
                    second: file.to_path_buf(),
                });
            }
            self.entries.insert(
                key,
                Entry {
                    info,
                    library: file.to_path_buf(),
                    lib,
                },
            );
        }
        Ok(())
    }

    /// The names of every component of `kind`, sorted.
    pub fn names(&self, kind: PluginKind) -> Vec<String> {
        self.entries
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// The component `name` of `kind`, or an error suggesting the nearest known name.
    pub fn get(&self, kind: PluginKind, name: &str) -> Result<&Entry, RegistryError> {
        if let Some(e) = self.entries.get(&(kind, name.to_string())) {
            return Ok(e);
        }
        let known = self.names(kind);
        Err(RegistryError::Unknown {
            kind: kind.as_str(),
            name: name.to_string(),
            suggestion: suggest(name, &known)
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default(),
            known: if known.is_empty() {
                format!(
                    "none found in {}",
                    self.searched
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            } else {
                known.join(", ")
            },
        })
    }
}

impl Registry {
    /// The task `name` built with `options` (TOML), which the task checks.
    pub fn task(&self, name: &str, options: &str) -> anyhow::Result<(&Entry, TaskBox)> {
        let entry = self.get(PluginKind::Task, name)?;
        let made = (entry.lib.new_task())(RStr::from(name), RStr::from(options));
        Ok((entry, entry.outcome(made)?))
    }

    /// The metric `name` built with `options` (TOML).
    pub fn metric(&self, name: &str, options: &str) -> anyhow::Result<(&Entry, MetricBox)> {
        let entry = self.get(PluginKind::Metric, name)?;
        let made = (entry.lib.new_metric())(RStr::from(name), RStr::from(options));
        Ok((entry, entry.outcome(made)?))
    }

    /// The backend `name` with its model loaded, as `options` (TOML) say.
    pub fn backend(&self, name: &str, options: &str) -> anyhow::Result<(&Entry, BackendBox)> {
        let entry = self.get(PluginKind::Backend, name)?;
        let made = (entry.lib.new_backend())(RStr::from(name), RStr::from(options));
        Ok((entry, entry.outcome(made)?))
    }

    /// The training options of backend `name` checked, with defaults filled in, before any model
    /// is loaded.
    pub fn check_train_options(&self, name: &str, options: &str) -> anyhow::Result<String> {
        let entry = self.get(PluginKind::Backend, name)?;
        let checked = (entry.lib.check_train_options())(RStr::from(name), RStr::from(options));
        Ok(entry.outcome(checked)?.into())
    }
}

impl Entry {
    /// What a call into the plugin returned, its error as one line that names the plugin.
    pub fn outcome<T>(&self, r: RResult<T, RString>) -> anyhow::Result<T> {
        r.into_result().map_err(|e| {
            let msg = e.to_string();
            // Plugins usually prefix their own name; add it when they did not.
            if msg.starts_with(self.info.name.as_str()) || msg.starts_with("plugin `") {
                anyhow!(msg)
            } else {
                anyhow!("{}: {msg}", self.info.name)
            }
        })
    }

    /// The record of this component in a run folder, with the options it resolved.
    pub fn component(&self, options: String) -> anyhow::Result<Component> {
        Ok(Component {
            name: self.info.name.to_string(),
            version: self.info.version.to_string(),
            library: self.library.display().to_string(),
            library_sha256: run_dir::sha256_path(&self.library)?,
            options,
            scale: None,
        })
    }
}

/// The known name closest to `name`, if it is close enough to be a typo.
pub fn suggest(name: &str, known: &[String]) -> Option<String> {
    known
        .iter()
        .map(|k| (strsim::levenshtein(name, k), k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(2))
        .min()
        .map(|(_, k)| k.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_other_abi_version_is_read_from_the_layout_report() {
        let report = format!(
            "type:PluginLib package:'harness-abi' version:'{}' ... package:'harness-abi' version:'9.9.9'",
            harness_abi::VERSION
        );
        assert_eq!(other_abi_version(&report).as_deref(), Some("9.9.9"));
        assert_eq!(other_abi_version("no versions here"), None);
    }

    #[test]
    fn suggestions_only_for_near_names() {
        let known = vec!["addition".to_string(), "mmlu".to_string()];
        assert_eq!(suggest("additon", &known).as_deref(), Some("addition"));
        assert_eq!(suggest("mmmlu", &known).as_deref(), Some("mmlu"));
        assert_eq!(suggest("translation", &known), None);
    }

    #[test]
    fn junk_files_are_warnings_not_errors() {
        let dir = std::env::temp_dir().join(format!("harness-reg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join(format!("libjunk.{}", std::env::consts::DLL_EXTENSION));
        std::fs::write(&junk, b"not a library").unwrap();
        std::fs::write(dir.join("README.txt"), b"ignored").unwrap();
        let reg = load(std::slice::from_ref(&dir)).unwrap();
        assert!(reg.entries.is_empty());
        assert_eq!(reg.warnings.len(), 1);
        assert!(
            reg.warnings[0].contains("not a loadable library"),
            "{}",
            reg.warnings[0]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
