//! The plugin SDK: write a task, metric or backend as a plain Rust type with std types, and
//! export it with one [`plugin!`](crate::plugin) line.
//!
//! ```ignore
//! use harness_abi::sdk::{MetricInfo, MetricPlugin, NoOptions};
//!
//! struct CharF1;
//!
//! impl MetricPlugin for CharF1 {
//!     type Options = NoOptions;
//!     const DESCRIPTION: &'static str = "F1 of the characters shared by prediction and target";
//!     fn new(_: &mut NoOptions) -> Result<Self, String> {
//!         Ok(CharF1)
//!     }
//!     fn info(&self) -> MetricInfo {
//!         MetricInfo::bounded(0.0, 1.0)
//!     }
//!     fn score(&self, prediction: &str, target: &str) -> Result<f64, String> {
//!         /* ... */
//!     }
//! }
//!
//! harness_abi::plugin! { metric "char-f1" => CharF1 }
//! ```
//!
//! [`plugin!`](crate::plugin) generates what the ABI needs: the manifest (names, the crate's
//! version, descriptions), the constructors that dispatch by name, the root module and its
//! export. Every call from the host into the type runs inside [`guard`](crate::guard), so an
//! `Err` or a panic reaches the user as one line naming the component, never as an abort.
//!
//! Options are a serde struct per component (see [`crate::options`]): the SDK reads it from the
//! TOML the host passes, rejecting unknown keys, hands it to `new` (which may fill in what it
//! resolves) and records it, serialized, in run.toml; a resumed run builds the component from
//! that record again.

use std::path::Path;

use abi_stable::std_types::{RResult, RStr, RString, RVec};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{
    guard, options, Backend, BackendBox, Backend_TO, Metric, MetricBox, Metric_TO, PluginInfo,
    PluginKind, ProgressSinkBox, TD_Opaque, Task, TaskBox, Task_TO,
};
pub use crate::{
    Attribute, BackendStats, ChatMessage, ChoiceRequest, ChoiceScore, GenerateRequest, Generation,
    Instance, MetricInfo, ModelInfo, Prompt, PromptToken, Request, TokenLogprob, TokenizerInfo,
    TrainExample, TrainStep, TrainSummary,
};

/// The options of a component that takes none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoOptions {}

/// A task: turns its options into evaluation instances (and, optionally, training examples).
///
/// How the command line reaches a task: `harness eval --task NAME` passes `--option KEY=VALUE`
/// pairs, and the shortcut flags `--n`, `--seed`, `--shots`, `--digits`, `--subject`, `--data`,
/// `--scoring` and `--limit` as the keys of the same names, only when the user gives them. The
/// task chooses its own defaults (in its options' `Default`); a key its options struct lacks is
/// refused with the nearest valid one.
pub trait TaskPlugin: Sized + 'static {
    /// The task's options (a serde struct; see [`crate::options`]).
    type Options: Serialize + DeserializeOwned;
    /// One line for `harness list`.
    const DESCRIPTION: &'static str;

    /// Builds the task. Check the values here (an `Err` is shown to the user as is, prefixed
    /// with the task's name); anything resolved may be written back into `options`, which are
    /// then recorded.
    fn new(options: &mut Self::Options) -> Result<Self, String>;

    /// The evaluation instances, in a deterministic order, with unique ids.
    fn eval_instances(&self) -> Result<Vec<Instance>, String>;

    /// The metrics used when the user names none.
    fn default_metrics(&self) -> Vec<String> {
        vec!["exact-match".to_string()]
    }

    /// `count` training examples that never coincide with the evaluation instances.
    fn train_examples(&self, count: u64) -> Result<Vec<TrainExample>, String> {
        let _ = count;
        Err("this task makes no training examples; give `harness train --data FILE.jsonl`".into())
    }
}

/// A metric: scores one prediction against its target.
pub trait MetricPlugin: Sized + 'static {
    /// The metric's options ([`NoOptions`] for most).
    type Options: Serialize + DeserializeOwned;
    /// One line for `harness list`.
    const DESCRIPTION: &'static str;

    fn new(options: &mut Self::Options) -> Result<Self, String>;

    /// The direction and range of the scores ([`MetricInfo::binary`], [`MetricInfo::bounded`],
    /// [`MetricInfo::distance`]); the host refuses a score outside it.
    fn info(&self) -> MetricInfo;

    fn score(&self, prediction: &str, target: &str) -> Result<f64, String>;
}

/// A model backend: answers requests with a loaded model, and may train adapters.
pub trait BackendPlugin: Sized + 'static {
    /// The backend's options (model, device, ...).
    type Options: Serialize + DeserializeOwned;
    /// Its training options ([`NoOptions`] for a backend that does not train).
    type TrainOptions: Serialize + DeserializeOwned;
    /// One line for `harness list`.
    const DESCRIPTION: &'static str;

    /// Loads the model.
    fn new(options: &mut Self::Options) -> Result<Self, String>;

    /// What the model is; `resolved_options` is filled in by the SDK with the recorded options.
    fn info(&self) -> ModelInfo;

    /// Token ids of `text` as the model sees it (no special tokens added).
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, String>;

    /// Greedy generation for each request, results in request order.
    fn generate(&mut self, requests: Vec<GenerateRequest>) -> Result<Vec<Generation>, String>;

    /// Log-likelihood of every option of every request, results in request order.
    fn score_choices(
        &mut self,
        requests: Vec<ChoiceRequest>,
    ) -> Result<Vec<Vec<ChoiceScore>>, String>;

    /// Log-probabilities of the next token after `text`, the `top` most likely, best first.
    fn next_token_logprobs(&mut self, text: &str, top: u32) -> Result<Vec<TokenLogprob>, String>;

    /// Cumulative work counters.
    fn stats(&self) -> BackendStats {
        BackendStats::default()
    }

    /// Checks training options beyond their types, before any model is loaded.
    fn check_train_options(options: &Self::TrainOptions) -> Result<(), String> {
        let _ = options;
        Err("this backend does not train".into())
    }

    /// Trains adapters on `examples`; `progress` is told every optimiser step and returns
    /// false to stop.
    fn train(
        &mut self,
        examples: Vec<TrainExample>,
        options: Self::TrainOptions,
        progress: &mut dyn FnMut(TrainStep) -> bool,
    ) -> Result<TrainSummary, String> {
        let _ = (examples, options, progress);
        Err("this backend does not train".into())
    }

    /// Writes the trained adapter into the folder `dir`.
    fn save_adapter(&self, dir: &Path) -> Result<(), String> {
        let _ = dir;
        Err("this backend does not train".into())
    }

    /// Each text's tokens with their log-probabilities given the tokens before, and the `top`
    /// most likely at each position (an OpenAI `echo` + `logprobs` request).
    fn prompt_logprobs(
        &mut self,
        prompts: Vec<Prompt>,
        top: u32,
    ) -> Result<Vec<Vec<PromptToken>>, String> {
        let _ = (prompts, top);
        Err("this backend does not give the log-probabilities of a prompt".into())
    }

    /// The model's chat template applied to `messages`, ending where the reply starts.
    fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<String, String> {
        let _ = messages;
        Err("this backend has no chat template".into())
    }

    /// The text of token ids.
    fn detokenize(&self, ids: &[u32]) -> Result<String, String> {
        let _ = ids;
        Err("this backend cannot turn token ids into text".into())
    }

    /// Special tokens and the chat template, where the backend knows them.
    fn tokenizer_info(&self) -> TokenizerInfo {
        TokenizerInfo::default()
    }
}

/// Reads a component's options and builds it: the options recorded are the struct `new` left.
fn build<O: Serialize + DeserializeOwned, T>(
    name: &str,
    text: &str,
    new: impl FnOnce(&mut O) -> Result<T, String>,
) -> Result<(T, String), String> {
    let mut options: O = options::read(name, text)?;
    let value = new(&mut options).map_err(|e| prefixed(name, e))?;
    let record = options::record(&options).map_err(|e| prefixed(name, e))?;
    Ok((value, record))
}

/// `name: message`, unless the message already starts with the name.
fn prefixed(name: &str, message: String) -> String {
    if message.starts_with(name) {
        message
    } else {
        format!("{name}: {message}")
    }
}

/// A [`TaskPlugin`] behind the ABI's [`Task`].
struct TaskAdapter<T> {
    name: &'static str,
    inner: T,
    record: String,
}

impl<T: TaskPlugin> Task for TaskAdapter<T> {
    fn eval_instances(&self) -> RResult<RVec<Instance>, RString> {
        guard(self.name, || self.inner.eval_instances().map(RVec::from))
    }

    fn default_metrics(&self) -> RResult<RVec<RString>, RString> {
        guard(self.name, || {
            Ok(self
                .inner
                .default_metrics()
                .into_iter()
                .map(RString::from)
                .collect())
        })
    }

    fn resolved_options(&self) -> RResult<RString, RString> {
        RResult::ROk(self.record.as_str().into())
    }

    fn train_examples(&self, count: u64) -> RResult<RVec<TrainExample>, RString> {
        guard(self.name, || {
            self.inner.train_examples(count).map(RVec::from)
        })
    }
}

/// A [`MetricPlugin`] behind the ABI's [`Metric`].
struct MetricAdapter<T> {
    name: &'static str,
    inner: T,
}

impl<T: MetricPlugin> Metric for MetricAdapter<T> {
    fn info(&self) -> RResult<MetricInfo, RString> {
        guard(self.name, || Ok(self.inner.info()))
    }

    fn score(&self, prediction: RStr<'_>, target: RStr<'_>) -> RResult<f64, RString> {
        guard(self.name, || {
            self.inner.score(prediction.as_str(), target.as_str())
        })
    }
}

/// A [`BackendPlugin`] behind the ABI's [`Backend`].
struct BackendAdapter<T> {
    name: &'static str,
    inner: T,
    record: String,
}

impl<T: BackendPlugin> Backend for BackendAdapter<T> {
    fn info(&self) -> RResult<ModelInfo, RString> {
        guard(self.name, || {
            let mut info = self.inner.info();
            info.resolved_options = self.record.as_str().into();
            Ok(info)
        })
    }

    fn tokenize(&self, text: RStr<'_>) -> RResult<RVec<u32>, RString> {
        guard(self.name, || {
            self.inner.tokenize(text.as_str()).map(RVec::from)
        })
    }

    fn generate(&mut self, requests: RVec<GenerateRequest>) -> RResult<RVec<Generation>, RString> {
        guard(self.name, || {
            self.inner.generate(requests.into_vec()).map(RVec::from)
        })
    }

    fn score_choices(
        &mut self,
        requests: RVec<ChoiceRequest>,
    ) -> RResult<RVec<RVec<ChoiceScore>>, RString> {
        guard(self.name, || {
            let scores = self.inner.score_choices(requests.into_vec())?;
            Ok(scores.into_iter().map(RVec::from).collect())
        })
    }

    fn next_token_logprobs(
        &mut self,
        text: RStr<'_>,
        top: u32,
    ) -> RResult<RVec<TokenLogprob>, RString> {
        guard(self.name, || {
            self.inner
                .next_token_logprobs(text.as_str(), top)
                .map(RVec::from)
        })
    }

    fn stats(&self) -> RResult<BackendStats, RString> {
        guard(self.name, || Ok(self.inner.stats()))
    }

    fn train(
        &mut self,
        examples: RVec<TrainExample>,
        options: RStr<'_>,
        mut progress: ProgressSinkBox,
    ) -> RResult<TrainSummary, RString> {
        let name = self.name;
        guard(name, || {
            let opts: T::TrainOptions = options::read(&format!("{name} train"), options.as_str())?;
            T::check_train_options(&opts)?;
            self.inner
                .train(examples.into_vec(), opts, &mut |step| progress.report(step))
        })
    }

    fn save_adapter(&self, dir: RStr<'_>) -> RResult<(), RString> {
        guard(self.name, || {
            self.inner.save_adapter(Path::new(dir.as_str()))
        })
    }

    fn prompt_logprobs(
        &mut self,
        prompts: RVec<Prompt>,
        top: u32,
    ) -> RResult<RVec<RVec<PromptToken>>, RString> {
        guard(self.name, || {
            let out = self.inner.prompt_logprobs(prompts.into_vec(), top)?;
            Ok(out.into_iter().map(RVec::from).collect())
        })
    }

    fn chat_prompt(&self, messages: RVec<ChatMessage>) -> RResult<RString, RString> {
        guard(self.name, || {
            self.inner.chat_prompt(&messages).map(RString::from)
        })
    }

    fn detokenize(&self, ids: RVec<u32>) -> RResult<RString, RString> {
        guard(self.name, || self.inner.detokenize(&ids).map(RString::from))
    }

    fn tokenizer_info(&self) -> RResult<TokenizerInfo, RString> {
        guard(self.name, || Ok(self.inner.tokenizer_info()))
    }
}

/// How to build one component; made by [`plugin!`](crate::plugin).
#[doc(hidden)]
pub struct Component {
    kind: PluginKind,
    name: &'static str,
    description: &'static str,
    make: Make,
}

enum Make {
    Task(fn(&'static str, &str) -> Result<TaskBox, String>),
    Metric(fn(&'static str, &str) -> Result<MetricBox, String>),
    Backend {
        new: fn(&'static str, &str) -> Result<BackendBox, String>,
        check_train: fn(&'static str, &str) -> Result<String, String>,
    },
}

impl Component {
    pub fn task<T: TaskPlugin>(name: &'static str) -> Self {
        Component {
            kind: PluginKind::Task,
            name,
            description: T::DESCRIPTION,
            make: Make::Task(|name, text| {
                let (inner, record) = build(name, text, T::new)?;
                let adapter = TaskAdapter {
                    name,
                    inner,
                    record,
                };
                Ok(Task_TO::from_value(adapter, TD_Opaque))
            }),
        }
    }

    pub fn metric<T: MetricPlugin>(name: &'static str) -> Self {
        Component {
            kind: PluginKind::Metric,
            name,
            description: T::DESCRIPTION,
            make: Make::Metric(|name, text| {
                let (inner, _) = build(name, text, T::new)?;
                Ok(Metric_TO::from_value(
                    MetricAdapter { name, inner },
                    TD_Opaque,
                ))
            }),
        }
    }

    pub fn backend<T: BackendPlugin>(name: &'static str) -> Self {
        Component {
            kind: PluginKind::Backend,
            name,
            description: T::DESCRIPTION,
            make: Make::Backend {
                new: |name, text| {
                    let (inner, record) = build(name, text, T::new)?;
                    let adapter = BackendAdapter {
                        name,
                        inner,
                        record,
                    };
                    Ok(Backend_TO::from_value(adapter, TD_Opaque))
                },
                check_train: |name, text| {
                    let what = format!("{name} train");
                    let opts: T::TrainOptions = options::read(&what, text)?;
                    T::check_train_options(&opts).map_err(|e| prefixed(&what, e))?;
                    options::record(&opts)
                },
            },
        }
    }
}

fn find<'a>(
    components: &'a [Component],
    kind: PluginKind,
    name: RStr<'_>,
) -> Result<&'a Component, String> {
    components
        .iter()
        .find(|c| c.kind == kind && c.name == name.as_str())
        .ok_or_else(|| format!("this library provides no {} named `{name}`", kind.as_str()))
}

#[doc(hidden)]
pub fn manifest(version: &str, components: &[Component]) -> RResult<RVec<PluginInfo>, RString> {
    guard("manifest", || {
        Ok(components
            .iter()
            .map(|c| PluginInfo {
                kind: c.kind,
                name: c.name.into(),
                version: version.into(),
                description: c.description.into(),
            })
            .collect())
    })
}

#[doc(hidden)]
pub fn new_task(
    components: &[Component],
    name: RStr<'_>,
    options: RStr<'_>,
) -> RResult<TaskBox, RString> {
    guard(name.as_str(), || {
        let c = find(components, PluginKind::Task, name)?;
        match c.make {
            Make::Task(make) => make(c.name, options.as_str()),
            _ => unreachable!("find returned a task"),
        }
    })
}

#[doc(hidden)]
pub fn new_metric(
    components: &[Component],
    name: RStr<'_>,
    options: RStr<'_>,
) -> RResult<MetricBox, RString> {
    guard(name.as_str(), || {
        let c = find(components, PluginKind::Metric, name)?;
        match c.make {
            Make::Metric(make) => make(c.name, options.as_str()),
            _ => unreachable!("find returned a metric"),
        }
    })
}

#[doc(hidden)]
pub fn new_backend(
    components: &[Component],
    name: RStr<'_>,
    options: RStr<'_>,
) -> RResult<BackendBox, RString> {
    guard(name.as_str(), || {
        let c = find(components, PluginKind::Backend, name)?;
        match c.make {
            Make::Backend { new, .. } => new(c.name, options.as_str()),
            _ => unreachable!("find returned a backend"),
        }
    })
}

#[doc(hidden)]
pub fn check_train_options(
    components: &[Component],
    name: RStr<'_>,
    options: RStr<'_>,
) -> RResult<RString, RString> {
    guard(name.as_str(), || {
        let c = find(components, PluginKind::Backend, name)?;
        match c.make {
            Make::Backend { check_train, .. } => {
                check_train(c.name, options.as_str()).map(RString::from)
            }
            _ => unreachable!("find returned a backend"),
        }
    })
}

/// Exports the components of a plugin library:
///
/// ```ignore
/// harness_abi::plugin! {
///     task "copy" => Copy,
///     metric "char-f1" => CharF1,
/// }
/// ```
///
/// Each line is a kind (`task`, `metric` or `backend`), the name users type, and a type that
/// implements [`TaskPlugin`](crate::sdk::TaskPlugin), [`MetricPlugin`](crate::sdk::MetricPlugin)
/// or [`BackendPlugin`](crate::sdk::BackendPlugin). Every component is listed with the version
/// of the crate that invokes the macro. Use it once per library, at the crate's root.
#[macro_export]
macro_rules! plugin {
    ($($kind:ident $name:literal => $ty:ty),+ $(,)?) => {
        fn __harness_components() -> ::std::vec::Vec<$crate::sdk::Component> {
            ::std::vec![$($crate::sdk::Component::$kind::<$ty>($name)),+]
        }

        extern "C" fn __harness_manifest() -> $crate::abi_stable::std_types::RResult<
            $crate::abi_stable::std_types::RVec<$crate::PluginInfo>,
            $crate::abi_stable::std_types::RString,
        > {
            $crate::sdk::manifest(env!("CARGO_PKG_VERSION"), &__harness_components())
        }

        extern "C" fn __harness_new_task(
            name: $crate::abi_stable::std_types::RStr<'_>,
            options: $crate::abi_stable::std_types::RStr<'_>,
        ) -> $crate::abi_stable::std_types::RResult<$crate::TaskBox, $crate::abi_stable::std_types::RString> {
            $crate::sdk::new_task(&__harness_components(), name, options)
        }

        extern "C" fn __harness_new_metric(
            name: $crate::abi_stable::std_types::RStr<'_>,
            options: $crate::abi_stable::std_types::RStr<'_>,
        ) -> $crate::abi_stable::std_types::RResult<$crate::MetricBox, $crate::abi_stable::std_types::RString> {
            $crate::sdk::new_metric(&__harness_components(), name, options)
        }

        extern "C" fn __harness_new_backend(
            name: $crate::abi_stable::std_types::RStr<'_>,
            options: $crate::abi_stable::std_types::RStr<'_>,
        ) -> $crate::abi_stable::std_types::RResult<$crate::BackendBox, $crate::abi_stable::std_types::RString> {
            $crate::sdk::new_backend(&__harness_components(), name, options)
        }

        extern "C" fn __harness_check_train_options(
            name: $crate::abi_stable::std_types::RStr<'_>,
            options: $crate::abi_stable::std_types::RStr<'_>,
        ) -> $crate::abi_stable::std_types::RResult<
            $crate::abi_stable::std_types::RString,
            $crate::abi_stable::std_types::RString,
        > {
            $crate::sdk::check_train_options(&__harness_components(), name, options)
        }

        /// The root module the host loads (generated by `harness_abi::plugin!`).
        #[doc(hidden)]
        pub fn __harness_plugin_lib() -> $crate::PluginLibRef {
            $crate::abi_stable::prefix_type::PrefixTypeTrait::leak_into_prefix($crate::PluginLib {
                manifest: __harness_manifest,
                new_task: __harness_new_task,
                new_metric: __harness_new_metric,
                new_backend: __harness_new_backend,
                check_train_options: __harness_check_train_options,
            })
        }

        $crate::export_plugin!(__harness_plugin_lib);
    };
}
