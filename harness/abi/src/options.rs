//! Reading a plugin's TOML options, with the errors users need.
//!
//! Options cross the ABI as TOML text. Every plugin validates its own: an unknown key is an error
//! that names the key, the nearest valid key and all valid ones, so a typo never silently falls
//! back to a default.

use toml::{Table, Value};

/// A parsed option table that remembers which keys the plugin accepts.
#[derive(Debug, Clone)]
pub struct Options {
    plugin: String,
    table: Table,
}

impl Options {
    /// Parses `text` and rejects any key not in `known`.
    pub fn parse(plugin: &str, text: &str, known: &[&str]) -> Result<Self, String> {
        let table: Table = text
            .parse()
            .map_err(|e| format!("{plugin}: options are not valid TOML: {e}"))?;
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                let nearest = known
                    .iter()
                    .map(|k| (edit_distance(k, key), *k))
                    .min()
                    .filter(|(d, _)| *d <= 3)
                    .map(|(_, k)| format!(" (did you mean `{k}`?)"))
                    .unwrap_or_default();
                return Err(format!(
                    "{plugin}: unknown option `{key}`{nearest}; valid options are: {}",
                    known.join(", ")
                ));
            }
        }
        Ok(Options {
            plugin: plugin.to_string(),
            table,
        })
    }

    fn bad(&self, key: &str, want: &str, got: &Value) -> String {
        format!(
            "{}: option `{key}` must be {want}, got `{got}`",
            self.plugin
        )
    }

    /// A string option (numbers are accepted and turned into their text).
    pub fn string(&self, key: &str) -> Result<Option<String>, String> {
        match self.table.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Integer(i)) => Ok(Some(i.to_string())),
            Some(Value::Array(items)) => {
                let mut parts = Vec::new();
                for item in items {
                    match item {
                        Value::String(s) => parts.push(s.clone()),
                        Value::Integer(i) => parts.push(i.to_string()),
                        other => return Err(self.bad(key, "a string or a list of strings", other)),
                    }
                }
                Ok(Some(parts.join(",")))
            }
            Some(other) => Err(self.bad(key, "a string", other)),
        }
    }

    /// A non-negative integer option (a string of digits is accepted too).
    pub fn u64(&self, key: &str) -> Result<Option<u64>, String> {
        match self.table.get(key) {
            None => Ok(None),
            Some(Value::Integer(i)) if *i >= 0 => Ok(Some(*i as u64)),
            Some(v @ Value::String(s)) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| self.bad(key, "a non-negative integer", v)),
            Some(other) => Err(self.bad(key, "a non-negative integer", other)),
        }
    }

    /// A floating-point option (integers are accepted).
    pub fn f64(&self, key: &str) -> Result<Option<f64>, String> {
        match self.table.get(key) {
            None => Ok(None),
            Some(Value::Float(f)) => Ok(Some(*f)),
            Some(Value::Integer(i)) => Ok(Some(*i as f64)),
            Some(v @ Value::String(s)) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| self.bad(key, "a number", v)),
            Some(other) => Err(self.bad(key, "a number", other)),
        }
    }

    /// A boolean option (`"true"`/`"false"` strings are accepted).
    pub fn bool(&self, key: &str) -> Result<Option<bool>, String> {
        match self.table.get(key) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(*b)),
            Some(v @ Value::String(s)) => match s.trim() {
                "true" => Ok(Some(true)),
                "false" => Ok(Some(false)),
                _ => Err(self.bad(key, "true or false", v)),
            },
            Some(other) => Err(self.bad(key, "true or false", other)),
        }
    }
}

/// Plain Levenshtein distance, enough to suggest the nearest name (plugins use it for their own
/// names, such as MMLU subjects).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_key_suggestion_and_valid_keys() {
        let e = Options::parse("addition", "digts = \"1-7\"", &["digits", "n"]).unwrap_err();
        assert_eq!(
            e,
            "addition: unknown option `digts` (did you mean `digits`?); valid options are: digits, n"
        );
    }

    #[test]
    fn typed_getters_accept_strings_from_the_command_line() {
        let o = Options::parse(
            "t",
            "n = \"12\"\nx = 3\nb = \"true\"\nf = 2",
            &["n", "x", "b", "f"],
        )
        .unwrap();
        assert_eq!(o.u64("n").unwrap(), Some(12));
        assert_eq!(o.string("x").unwrap(), Some("3".into()));
        assert_eq!(o.bool("b").unwrap(), Some(true));
        assert_eq!(o.f64("f").unwrap(), Some(2.0));
        assert_eq!(o.u64("missing").unwrap(), None);
        assert!(o.bool("n").unwrap_err().contains("must be true or false"));
    }

    #[test]
    fn malformed_toml_is_an_error() {
        assert!(Options::parse("t", "a = ", &["a"])
            .unwrap_err()
            .starts_with("t: options are not valid TOML"));
    }
}
