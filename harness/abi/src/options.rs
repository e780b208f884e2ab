//! A plugin's options: one serde struct, read from the TOML the host passes and recorded by
//! serializing the same struct, so what a plugin accepts and what a run records cannot drift.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Serialize, Deserialize)]
//! #[serde(default)]
//! struct CopyOptions {
//!     n: u64,
//!     words: Vec<String>,
//! }
//!
//! impl Default for CopyOptions {
//!     fn default() -> Self {
//!         CopyOptions { n: 8, words: vec!["apple".into()] }
//!     }
//! }
//!
//! // `--option n=3 --option words=pear,plum` reaches the plugin as this TOML:
//! let o: CopyOptions = harness_abi::options::read("copy", "n = 3\nwords = \"pear,plum\"").unwrap();
//! assert_eq!((o.n, o.words.len()), (3, 2));
//! assert_eq!(harness_abi::options::record(&o).unwrap(), "n = 3\nwords = [\"pear\", \"plum\"]\n");
//!
//! let e = harness_abi::options::read::<CopyOptions>("copy", "nn = 3").unwrap_err();
//! assert_eq!(e, "copy: unknown option `nn` (did you mean `n`?); valid options are: n, words");
//! ```
//!
//! Reading is lenient where the command line cannot be precise: `--option KEY=VALUE` reads VALUE
//! as TOML when it parses and as text otherwise, so a number field accepts `"12"`, a text field
//! accepts `12`, a boolean accepts `"true"`, and a list accepts `"a,b"` (split at commas) as well
//! as `["a", "b"]`. Every other mismatch is an error that names the option. Unknown keys are
//! rejected with the nearest valid key, so a typo never silently falls back to a default.
//!
//! Give the struct `#[serde(default)]` and a [`Default`] with the plugin's defaults: then every
//! key is optional and the recorded TOML holds every option with its default filled in. An
//! `Option<T>` field is left out of the record while it is `None`.

use std::fmt;

use serde::de::{
    self, value::StringDeserializer, DeserializeOwned, DeserializeSeed, IntoDeserializer,
    MapAccess, SeqAccess, Visitor,
};
use serde::Serialize;
use toml::{Table, Value};

/// Reads the options of `plugin` from `text` (TOML) into `T`, rejecting unknown keys.
///
/// Errors are one line starting with the plugin's name.
pub fn read<T: DeserializeOwned>(plugin: &str, text: &str) -> Result<T, String> {
    let table: Table = text.parse().map_err(|e: toml::de::Error| {
        let why = e.message().trim().replace('\n', "; ");
        format!("{plugin}: options are not valid TOML: {why}")
    })?;
    let known = field_names::<T>();
    for key in table.keys() {
        if !known.contains(&key.as_str()) {
            return Err(unknown_key(plugin, key, known));
        }
    }
    T::deserialize(Lenient(Value::Table(table))).map_err(|e| format!("{plugin}: {e}"))
}

/// The options as TOML, for run.toml: serialize the same struct [`read`] filled in.
pub fn record<T: Serialize>(options: &T) -> Result<String, String> {
    toml::to_string(options).map_err(|e| format!("cannot record the options as TOML: {e}"))
}

fn unknown_key(plugin: &str, key: &str, known: &[&str]) -> String {
    // The fewest edits away; among those, the one that starts most like the key (`rank` means
    // `r` rather than `base`, both three edits away).
    let common_prefix = |k: &str| {
        k.chars()
            .zip(key.chars())
            .take_while(|(a, b)| a == b)
            .count()
    };
    let nearest = known
        .iter()
        .map(|k| {
            (
                edit_distance(k, key),
                std::cmp::Reverse(common_prefix(k)),
                *k,
            )
        })
        .min()
        .filter(|(d, ..)| *d <= 3)
        .map(|(.., k)| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default();
    let valid = if known.is_empty() {
        "it takes no options".to_string()
    } else {
        format!("valid options are: {}", known.join(", "))
    };
    format!("{plugin}: unknown option `{key}`{nearest}; {valid}")
}

/// The field names of a struct, as serde's derive hands them to `deserialize_struct`: the keys
/// an options struct accepts (after any `rename`).
pub fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Capture<'a>(&'a mut &'static [&'static str]);
    impl<'de> de::Deserializer<'de> for Capture<'_> {
        type Error = OptionError;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, OptionError> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, OptionError> {
            *self.0 = fields;
            Err(de::Error::custom("captured"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Capture(&mut fields));
    fields
}

/// An error while reading options; its text names the option.
#[derive(Debug)]
pub struct OptionError(String);

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OptionError {}

impl de::Error for OptionError {
    fn custom<M: fmt::Display>(msg: M) -> Self {
        OptionError(msg.to_string())
    }
}

/// A TOML value read leniently (see the module documentation).
struct Lenient(Value);

impl Lenient {
    fn describe(&self) -> String {
        match &self.0 {
            Value::String(s) => format!("\"{s}\""),
            other => other.to_string(),
        }
    }

    fn expected(&self, what: &str) -> OptionError {
        OptionError(format!("must be {what}, got {}", self.describe()))
    }
}

impl<'de> IntoDeserializer<'de, OptionError> for Lenient {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

macro_rules! integer {
    ($($method:ident => $visit:ident $ty:ty),*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptionError> {
            let n: Option<$ty> = match &self.0 {
                Value::Integer(i) => (*i).try_into().ok(),
                Value::String(s) => s.trim().parse().ok(),
                _ => None,
            };
            match n {
                Some(n) => visitor.$visit(n),
                None if <$ty>::MIN == 0 => Err(self.expected("a non-negative integer")),
                None => Err(self.expected("an integer")),
            }
        }
    )*};
}

impl<'de> de::Deserializer<'de> for Lenient {
    type Error = OptionError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptionError> {
        match self.0 {
            Value::String(s) => visitor.visit_string(s),
            Value::Integer(i) => visitor.visit_i64(i),
            Value::Float(f) => visitor.visit_f64(f),
            Value::Boolean(b) => visitor.visit_bool(b),
            Value::Datetime(d) => visitor.visit_string(d.to_string()),
            Value::Array(items) => visitor.visit_seq(Items(items.into_iter())),
            Value::Table(t) => visitor.visit_map(Entries {
                iter: t.into_iter(),
                pending: None,
            }),
        }
    }

    integer! {
        deserialize_u8 => visit_u8 u8, deserialize_u16 => visit_u16 u16,
        deserialize_u32 => visit_u32 u32, deserialize_u64 => visit_u64 u64,
        deserialize_i8 => visit_i8 i8, deserialize_i16 => visit_i16 i16,
        deserialize_i32 => visit_i32 i32, deserialize_i64 => visit_i64 i64
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptionError> {
        let x = match &self.0 {
            Value::Float(f) => Some(*f),
            Value::Integer(i) => Some(*i as f64),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        match x {
            Some(x) => visitor.visit_f64(x),
            None => Err(self.expected("a number")),
        }
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptionError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptionError> {
        match &self.0 {
            Value::Boolean(b) => visitor.visit_bool(*b),
            Value::String(s) if s.trim() == "true" => visitor.visit_bool(true),
            Value::String(s) if s.trim() == "false" => visitor.visit_bool(false),
            _ => Err(self.expected("true or false")),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptionError> {
        match self.0 {
            Value::String(s) => visitor.visit_string(s),
            Value::Integer(i) => visitor.visit_string(i.to_string()),
            Value::Float(f) => visitor.visit_string(f.to_string()),
            Value::Array(items) => {
                let mut parts = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(s) => parts.push(s),
                        Value::Integer(i) => parts.push(i.to_string()),
                        other => {
                            return Err(Lenient(other).expected("a string or a list of strings"))
                        }
                    }
                }
                visitor.visit_string(parts.join(","))
            }
            other => Err(Lenient(other).expected("a string")),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptionError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptionError> {
        match self.0 {
            Value::Array(items) => visitor.visit_seq(Items(items.into_iter())),
            Value::String(s) => {
                let items: Vec<Value> = s
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(|p| Value::String(p.to_string()))
                    .collect();
                visitor.visit_seq(Items(items.into_iter()))
            }
            other => Err(Lenient(other).expected("a list")),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptionError> {
        // A key that is present has a value; an absent key never reaches here.
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, OptionError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, OptionError> {
        match self.0 {
            Value::String(s) => {
                if !variants.contains(&s.as_str()) {
                    let quoted: Vec<String> = variants.iter().map(|v| format!("`{v}`")).collect();
                    return Err(OptionError(format!(
                        "must be one of {}, got \"{s}\"",
                        quoted.join(", ")
                    )));
                }
                let d: StringDeserializer<OptionError> = s.into_deserializer();
                visitor.visit_enum(d)
            }
            other => Err(Lenient(other).expected("a name")),
        }
    }

    serde::forward_to_deserialize_any! {
        i128 u128 char bytes byte_buf unit unit_struct tuple tuple_struct map struct identifier
        ignored_any
    }
}

/// The items of a list.
struct Items(std::vec::IntoIter<Value>);

impl<'de> SeqAccess<'de> for Items {
    type Error = OptionError;
    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, OptionError> {
        self.0
            .next()
            .map(|v| seed.deserialize(Lenient(v)))
            .transpose()
    }
}

/// The entries of a table; an error in a value is prefixed with its key.
struct Entries {
    iter: toml::map::IntoIter,
    pending: Option<(String, Value)>,
}

impl<'de> MapAccess<'de> for Entries {
    type Error = OptionError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, OptionError> {
        let Some((key, value)) = self.iter.next() else {
            return Ok(None);
        };
        self.pending = Some((key.clone(), value));
        let d: StringDeserializer<OptionError> = key.into_deserializer();
        seed.deserialize(d).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, OptionError> {
        let (key, value) = self
            .pending
            .take()
            .ok_or_else(|| OptionError("a value without a key".into()))?;
        seed.deserialize(Lenient(value))
            .map_err(|e| OptionError(format!("option `{key}` {e}")))
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
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default, rename_all = "snake_case")]
    struct Demo {
        n: u64,
        name: String,
        flag: bool,
        rate: f64,
        list: Vec<String>,
        mode: Mode,
        path: Option<std::path::PathBuf>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq, Clone, Copy)]
    #[serde(rename_all = "kebab-case")]
    enum Mode {
        PerInstance,
        Shared,
    }

    impl Default for Demo {
        fn default() -> Self {
            Demo {
                n: 100,
                name: "x".into(),
                flag: false,
                rate: 0.5,
                list: vec!["a".into()],
                mode: Mode::PerInstance,
                path: None,
            }
        }
    }

    #[test]
    fn unknown_key_names_key_suggestion_and_valid_keys() {
        let e = read::<Demo>("demo", "nme = \"1-7\"").unwrap_err();
        assert_eq!(
            e,
            "demo: unknown option `nme` (did you mean `name`?); valid options are: n, name, flag, rate, list, mode, path"
        );
        // The fewest edits win, then the longest shared start (`rank`: `r` and `base` are
        // three edits away each).
        assert_eq!(
            unknown_key("d", "lst", &["rate", "list"]).split(';').next(),
            Some("d: unknown option `lst` (did you mean `list`?)")
        );
        assert!(unknown_key("d", "rank", &["base", "r"]).contains("did you mean `r`?"));
        #[derive(Debug, Deserialize, Default)]
        struct Nothing {}
        let e = read::<Nothing>("m", "x = 1").unwrap_err();
        assert_eq!(e, "m: unknown option `x`; it takes no options");
    }

    #[test]
    fn command_line_text_is_read_leniently() {
        let o: Demo = read(
            "d",
            "n = \"12\"\nname = 3\nflag = \"true\"\nrate = 2\nlist = \"p, q\"\nmode = \"shared\"\npath = \"a/b\"",
        )
        .unwrap();
        assert_eq!(o.n, 12);
        assert_eq!(o.name, "3");
        assert!(o.flag);
        assert_eq!(o.rate, 2.0);
        assert_eq!(o.list, ["p", "q"]);
        assert_eq!(o.mode, Mode::Shared);
        assert_eq!(o.path.as_deref(), Some(std::path::Path::new("a/b")));
        let o: Demo = read("d", "list = [\"p\", \"q\"]\nname = [\"a\", 1]").unwrap();
        assert_eq!((o.list.len(), o.name.as_str()), (2, "a,1"));
    }

    #[test]
    fn defaults_fill_in_and_the_record_reads_back_the_same() {
        let o: Demo = read("d", "").unwrap();
        assert_eq!(o, Demo::default());
        let text = record(&o).unwrap();
        assert!(text.contains("n = 100") && !text.contains("path"), "{text}");
        assert_eq!(read::<Demo>("d", &text).unwrap(), o);
    }

    #[test]
    fn a_wrong_value_names_the_option_and_what_it_must_be() {
        let e = read::<Demo>("d", "n = -3").unwrap_err();
        assert_eq!(e, "d: option `n` must be a non-negative integer, got -3");
        let e = read::<Demo>("d", "flag = \"yes\"").unwrap_err();
        assert_eq!(e, "d: option `flag` must be true or false, got \"yes\"");
        let e = read::<Demo>("d", "mode = \"all\"").unwrap_err();
        assert_eq!(
            e,
            "d: option `mode` must be one of `per-instance`, `shared`, got \"all\""
        );
        let e = read::<Demo>("d", "rate = true").unwrap_err();
        assert_eq!(e, "d: option `rate` must be a number, got true");
    }

    #[test]
    fn malformed_toml_is_an_error() {
        assert!(read::<Demo>("t", "a = ")
            .unwrap_err()
            .starts_with("t: options are not valid TOML"));
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

        proptest! {
            #![proptest_config(config(2000))]

            /// Any text at all: read or refused with one line that names the plugin.
            #[test]
            fn any_text_is_read_or_refused_in_one_line(text in "[a-z_=\"'\\[\\]{},.:0-9 \n#-]{0,80}") {
                if let Err(e) = read::<Demo>("d", &text) {
                    prop_assert!(e.starts_with("d: ") && !e.contains('\n'), "{e}");
                }
            }

            /// Any value under a known key, as the command line would give it.
            #[test]
            fn any_value_under_a_known_key(key in prop::sample::select(field_names::<Demo>()), value in any::<String>()) {
                let mut t = Table::new();
                t.insert(key.to_string(), Value::String(value));
                if let Err(e) = read::<Demo>("d", &t.to_string()) {
                    prop_assert!(e.starts_with("d: ") && !e.contains('\n'), "{e}");
                }
            }
        }
    }
}
