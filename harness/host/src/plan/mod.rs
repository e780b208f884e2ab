//! Plans: what a command will do, worked out from its arguments (and files) before any work
//! starts, so that everything a user can get wrong is reported before a model loads. An eval's
//! plan ([`eval`]) and a training run's ([`train`]) share how task options are given: the
//! shortcut flags of [`TaskFlags`](crate::cli::TaskFlags) and `--option KEY=VALUE`.

pub mod eval;
pub mod train;

use std::path::Path;

use anyhow::{bail, Result};
use toml::{Table, Value};

pub use eval::{from_args, EvalPlan};

/// The backend options the host's own flags set (`--model`, `--adapter`, `--base`, `--compute`,
/// `--device`, `--batch`): the one place their keys are written. Every backend is asked to accept these
/// names; `--backend-option KEY=VALUE` passes anything else through untouched.
#[derive(Debug, Default)]
pub struct BackendFlags<'a> {
    pub model: Option<&'a Path>,
    pub adapter: Option<&'a Path>,
    pub base: Option<&'a str>,
    pub compute: Option<&'a str>,
    pub device: Option<&'a str>,
    pub max_batch: Option<u64>,
}

/// The base a model is loaded with for training: projections packed to NF4 as they are read,
/// never all in f32 at once (the QLoRA base).
pub const TRAINING_BASE: &str = "nf4-packed";

/// The backend base to load for training with the training options `train`: the GGUF's own
/// blocks for `base = "gguf"` (no NF4 packing, no f32 copy), else [`TRAINING_BASE`].
pub fn training_base(train: &Table) -> &'static str {
    match train.get("base").and_then(Value::as_str) {
        Some("gguf") => "gguf",
        _ => TRAINING_BASE,
    }
}

impl BackendFlags<'_> {
    /// The options table of the flags given.
    pub fn table(&self) -> Table {
        let path = |p: &Path| Value::String(p.display().to_string());
        let text = |s: &str| Value::String(s.to_string());
        [
            ("model", self.model.map(path)),
            ("adapter", self.adapter.map(path)),
            ("base", self.base.map(text)),
            ("compute", self.compute.map(text)),
            ("device", self.device.map(text)),
            (
                "max_batch",
                self.max_batch.map(|n| Value::Integer(n as i64)),
            ),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect()
    }
}

/// `KEY=VALUE` into the table; VALUE is read as TOML (`3`, `true`, `"x"`), else kept as text.
pub(crate) fn insert_pair(table: &mut Table, pair: &str, flag: &str) -> Result<()> {
    let Some((key, value)) = pair.split_once('=') else {
        bail!("{flag} expects KEY=VALUE, got `{pair}`");
    };
    let key = key.trim();
    if key.is_empty() {
        bail!("{flag} expects KEY=VALUE, got `{pair}`");
    }
    let parsed = format!("v = {value}")
        .parse::<Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(value.to_string()));
    table.insert(key.to_string(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_read_as_toml_or_text() {
        let mut t = Table::new();
        insert_pair(&mut t, "n=3", "--option").unwrap();
        insert_pair(&mut t, "fewshot=shared", "--option").unwrap();
        insert_pair(&mut t, "flag=true", "--option").unwrap();
        assert_eq!(t["n"], Value::Integer(3));
        assert_eq!(t["fewshot"], Value::String("shared".into()));
        assert_eq!(t["flag"], Value::Boolean(true));
        assert!(insert_pair(&mut t, "novalue", "--option")
            .unwrap_err()
            .to_string()
            .contains("expects KEY=VALUE"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(crate::proptest_config(2000))]

            /// Any `--option` argument: a key and a value in the table, or one error line.
            #[test]
            fn any_option_argument(pair in any::<String>()) {
                let mut t = Table::new();
                match insert_pair(&mut t, &pair, "--option") {
                    Ok(()) => prop_assert_eq!(t.len(), 1),
                    Err(e) => prop_assert!(e.to_string().starts_with("--option expects KEY=VALUE")),
                }
                // What is inserted is passed on as TOML that reads back.
                prop_assert!(t.to_string().parse::<Table>().is_ok());
            }
        }
    }
}
