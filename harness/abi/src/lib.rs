//! The stable ABI between the `harness` host and its plugins.
//!
//! This is the **only** crate a plugin depends on. Every plugin library (a `cdylib`) exports one
//! root module, [`PluginLib`], built with abi_stable's prefix-type pattern: the host loads it with
//! `lib_header_from_path(..).init_root_module::<PluginLibRef>()`, and abi_stable checks at load
//! time that the plugin was built against a layout-compatible version of this crate (the crate
//! version travels in [`PluginLibRef::VERSION_STRINGS`]; a 0.x crate must match major and minor).
//!
//! Behaviour crosses the boundary as `#[sabi_trait]` objects ([`TaskBox`], [`MetricBox`],
//! [`BackendBox`]); data as `#[repr(C)]` structs of `RString`/`RVec`. Plugin-specific options
//! cross as a TOML string that the plugin parses and validates itself, so the host never needs to
//! know a task's options to pass them on.
//!
//! Invariant: **no panic crosses the boundary.** abi_stable aborts the process when an
//! `extern "C"` function or a sabi_trait method unwinds, so every plugin entry point runs its body
//! inside [`guard`], which turns a panic into an error that names the plugin.

// abi_stable's derive macros emit impls inside generated modules and `_Ref`/`_TO` type names.
#![allow(non_local_definitions, non_camel_case_types)]

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

pub use abi_stable;
use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, RResult, RStr, RString, RVec},
    StableAbi,
};

pub mod options;
pub mod paths;

/// The version of this crate; plugins built against an incompatible one are refused at load.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What kind of component a plugin library provides under a name.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PluginKind {
    Task,
    Metric,
    Backend,
}

impl PluginKind {
    /// The lower-case word used on the command line and in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Task => "task",
            PluginKind::Metric => "metric",
            PluginKind::Backend => "backend",
        }
    }
}

/// One component exported by a plugin library.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct PluginInfo {
    pub kind: PluginKind,
    /// The name users type (`addition`, `exact-match`, `candle`).
    pub name: RString,
    /// The component's own version (semver), recorded in every run folder.
    pub version: RString,
    /// One line for `harness list`.
    pub description: RString,
}

/// The root module every plugin library exports (with `#[export_root_module]`).
///
/// A library that does not provide a kind returns an error from its constructor for that kind;
/// the host only calls constructors for names the library listed in its manifest.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginLibRef)))]
#[sabi(missing_field(panic))]
pub struct PluginLib {
    /// Every component this library provides.
    pub manifest: extern "C" fn() -> RVec<PluginInfo>,
    /// `(name, toml options)` -> a task.
    pub new_task: extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<TaskBox, RString>,
    /// `(name, toml options)` -> a metric.
    pub new_metric: extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<MetricBox, RString>,
    /// `(name, toml options)` -> a model backend.
    #[sabi(last_prefix_field)]
    pub new_backend: extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<BackendBox, RString>,
}

impl RootModule for PluginLibRef {
    declare_root_module_statics! {PluginLibRef}
    const BASE_NAME: &'static str = "harness_plugin";
    const NAME: &'static str = "harness_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// A request for free-form generation: greedy decoding until a stop string or the token limit.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: RString,
    /// Generation ends at the first occurrence of any of these; the stop string is not returned.
    pub stop: RVec<RString>,
    pub max_new_tokens: u32,
}

/// A multiple-choice request: the log-likelihood of each option given the context.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct ChoiceRequest {
    pub context: RString,
    /// Continuations scored after `context` (e.g. `" A"` or `" the option's text"`).
    pub options: RVec<RString>,
    /// What the prediction is when the option of the same index wins (e.g. `"A"`).
    pub labels: RVec<RString>,
    /// Rank by log-likelihood per byte of the option rather than the sum (cloze scoring).
    pub length_normalize: bool,
}

/// What an instance asks the backend.
#[repr(C, u8)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub enum Request {
    Generate(GenerateRequest),
    Choice(ChoiceRequest),
}

/// One evaluation item produced by a task.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct Instance {
    /// Unique and stable for a given task configuration (used to resume runs).
    pub id: RString,
    /// What results are aggregated by (`k=7`, `machine_learning`).
    pub group: RString,
    pub request: Request,
    /// The reference answer metrics compare the prediction with.
    pub target: RString,
    /// Properties of the instance beyond its group, for reports that split results by them
    /// (`carries = "2"`, `seen = "yes"`); written to its line of samples.jsonl. Empty for most
    /// tasks. See [`Attribute`] for the conventions.
    pub attributes: RVec<Attribute>,
}

/// One property of an [`Instance`]: a key and its value, both text.
///
/// Groups aggregate results one way; attributes let a report cut the same samples another way
/// (by number of carries, by whether the model saw the problem in training) without a task per
/// cut. Conventions: keys are unique within an instance; `seen` is `yes` or `no`, whether the
/// instance is in the training set of the adapter being probed (a memorisation check).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct Attribute {
    pub key: RString,
    pub value: RString,
}

/// One supervised training example: the loss is taken on the completion only.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct TrainExample {
    pub prompt: RString,
    pub completion: RString,
    pub group: RString,
}

/// A task: turns its options into evaluation instances (and training examples).
#[sabi_trait]
pub trait Task {
    /// The evaluation instances, in a deterministic order.
    fn eval_instances(&self) -> RResult<RVec<Instance>, RString>;

    /// The metrics used when the user names none.
    fn default_metrics(&self) -> RVec<RString>;

    /// The options after defaults were filled in, as TOML (recorded in run.toml).
    fn resolved_options(&self) -> RString;

    /// `count` training examples that never coincide with this task's evaluation instances.
    #[sabi(last_prefix_field)]
    fn train_examples(&self, count: u64) -> RResult<RVec<TrainExample>, RString>;
}

/// A metric: scores one prediction against its target.
#[sabi_trait]
pub trait Metric {
    /// Whether a larger score is better (false for distances).
    fn higher_is_better(&self) -> bool;

    /// Whether every score is 0 or 1 (the host then uses a Wilson interval).
    fn is_binary(&self) -> bool;

    #[sabi(last_prefix_field)]
    fn score(&self, prediction: RStr<'_>, target: RStr<'_>) -> f64;
}

/// Log-likelihood of one option of a [`ChoiceRequest`].
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq)]
pub struct ChoiceScore {
    /// Sum of log p(token) over the option's tokens.
    pub logprob: f64,
    pub n_tokens: u32,
    /// Whether every token of the option was the greedy choice.
    pub is_greedy: bool,
}

/// The output of one [`GenerateRequest`].
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: RString,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
}

/// What a backend says about the model it serves (recorded in run.toml).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: RString,
    /// The file or folder the weights came from.
    pub path: RString,
    pub architecture: RString,
    pub parameters: u64,
    pub device: RString,
    /// The options after defaults were filled in, as TOML.
    pub resolved_options: RString,
}

/// Cumulative work counters, for throughput figures.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, Default, PartialEq)]
pub struct BackendStats {
    /// Tokens run through the model as prompt (after prefix reuse).
    pub prompt_tokens: u64,
    pub prompt_seconds: f64,
    pub generated_tokens: u64,
    pub generate_seconds: f64,
    /// Prompt tokens that were not recomputed because a cached prefix covered them.
    pub reused_prefix_tokens: u64,
}

/// A model backend: answers requests with a loaded model.
#[sabi_trait]
pub trait Backend {
    fn info(&self) -> ModelInfo;

    /// Token ids of `text` as the model sees it (no special tokens added).
    fn tokenize(&self, text: RStr<'_>) -> RResult<RVec<u32>, RString>;

    /// Greedy generation for each request, results in request order.
    fn generate(&mut self, requests: RVec<GenerateRequest>) -> RResult<RVec<Generation>, RString>;

    /// Log-likelihood of every option of every request, results in request order.
    fn score_choices(
        &mut self,
        requests: RVec<ChoiceRequest>,
    ) -> RResult<RVec<RVec<ChoiceScore>>, RString>;

    /// Log-probabilities of the next token after `text`, the `top` most likely, best first.
    fn next_token_logprobs(
        &mut self,
        text: RStr<'_>,
        top: u32,
    ) -> RResult<RVec<TokenLogprob>, RString>;

    fn stats(&self) -> BackendStats;

    /// Trains LoRA adapters on `examples` (loss on completions only), reporting every optimiser
    /// step to `progress`, which may stop the run by returning false. `options` is TOML.
    fn train(
        &mut self,
        examples: RVec<TrainExample>,
        options: RStr<'_>,
        progress: ProgressSinkBox,
    ) -> RResult<TrainSummary, RString>;

    /// Writes the trained adapter (PEFT layout) into the folder `dir`.
    #[sabi(last_prefix_field)]
    fn save_adapter(&self, dir: RStr<'_>) -> RResult<(), RString>;
}

/// One optimiser step of a training run.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq)]
pub struct TrainStep {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens run through the model in this step.
    pub tokens: u64,
}

/// Receives training progress from a backend (implemented by the host).
#[sabi_trait]
pub trait ProgressSink {
    /// Returns false to stop training after this step.
    #[sabi(last_prefix_field)]
    fn report(&mut self, step: TrainStep) -> bool;
}

pub type ProgressSinkBox = ProgressSink_TO<'static, RBox<()>>;

/// What a training run did.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub steps: u64,
    pub examples: u64,
    pub tokens: u64,
    pub seconds: f64,
    pub final_loss: f64,
    pub trainable_parameters: u64,
    /// Whether `progress` asked to stop before the end.
    pub stopped_early: bool,
    /// The training options after defaults were filled in, as TOML.
    pub resolved_options: RString,
}

/// One entry of [`Backend::next_token_logprobs`].
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub text: RString,
    pub logprob: f64,
}

pub type TaskBox = Task_TO<'static, RBox<()>>;
pub type MetricBox = Metric_TO<'static, RBox<()>>;
pub type BackendBox = Backend_TO<'static, RBox<()>>;

pub use abi_stable::sabi_trait::TD_Opaque;

thread_local! {
    /// How many [`guard`] calls are active on this thread.
    static GUARD_DEPTH: Cell<usize> = const { Cell::new(0) };
    /// The message and place of the last panic caught inside a guard.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs, once per library, a panic hook that stays quiet for panics inside [`guard`] (the
/// guard reports them as an error) and defers to the previous hook elsewhere.
///
/// Each plugin library links its own copy of std, so this hook only sees the plugin's panics.
fn install_quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARD_DEPTH.with(Cell::get) == 0 {
                previous(info);
                return;
            }
            let what = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown cause".to_string());
            let place = info
                .location()
                .map(|l| format!(" (at {}:{})", l.file(), l.line()))
                .unwrap_or_default();
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{what}{place}")));
        }));
    });
}

/// Runs `f`, turning an error or a panic into an `RErr` that names the plugin.
///
/// Every `extern "C"` function and trait method of a plugin that can fail must go through this:
/// a panic that reached abi_stable's boundary would abort the whole host.
pub fn guard<T>(plugin: &str, f: impl FnOnce() -> Result<T, String>) -> RResult<T, RString> {
    install_quiet_hook();
    GUARD_DEPTH.with(|d| d.set(d.get() + 1));
    let outcome = catch_unwind(AssertUnwindSafe(f));
    GUARD_DEPTH.with(|d| d.set(d.get() - 1));
    match outcome {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(RString::from(e)),
        Err(_) => {
            let what = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_else(|| "unknown cause".to_string());
            RResult::RErr(RString::from(format!(
                "plugin `{plugin}` panicked: {what}; this is a bug in the plugin, please report it"
            )))
        }
    }
}

/// The error a library returns from a constructor for a name it does not provide.
pub fn not_provided<T>(kind: PluginKind, name: RStr<'_>) -> RResult<T, RString> {
    RResult::RErr(RString::from(format!(
        "this library provides no {} named `{name}`",
        kind.as_str()
    )))
}

/// The symbol abi_stable looks up in a plugin library (its `ROOT_MODULE_LOADER_NAME`); a test
/// checks that this copy matches the abi_stable version this crate is built with.
#[doc(hidden)]
pub const ROOT_MODULE_SYMBOL: &str = "_1as_0lib_1header_0root_bmodule_bloader";

/// Exports a plugin's root module: `harness_abi::export_plugin!(plugin_lib);` where
/// `fn plugin_lib() -> PluginLibRef`.
///
/// This does what abi_stable's `#[export_root_module]` does, but through `$crate` paths, so a
/// plugin crate depends on `harness-abi` alone and never names abi_stable in its manifest.
#[macro_export]
macro_rules! export_plugin {
    ($constructor:path) => {
        #[doc(hidden)]
        #[unsafe(export_name = "_1as_0lib_1header_0root_bmodule_bloader")]
        pub static HARNESS_PLUGIN_LIB_HEADER: $crate::abi_stable::library::LibHeader = {
            extern "C" fn erased_root_module() -> $crate::abi_stable::library::RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader($constructor)
            }
            // SAFETY: the constructor returns the `PluginLibRef` the header is typed with,
            // exactly as abi_stable's own `#[export_root_module]` expands.
            unsafe {
                $crate::abi_stable::library::LibHeader::from_constructor::<$crate::PluginLibRef>(
                    erased_root_module,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_module_symbol_matches_abi_stable() {
        assert_eq!(
            super::ROOT_MODULE_SYMBOL,
            abi_stable::library::ROOT_MODULE_LOADER_NAME
        );
    }

    use super::*;

    #[test]
    fn guard_turns_panic_into_error_naming_plugin() {
        let r: RResult<(), RString> = guard("demo", || panic!("boom"));
        let e = r.unwrap_err();
        assert!(e.contains("plugin `demo` panicked: boom"), "{e}");
    }

    #[test]
    fn guard_passes_errors_and_values() {
        assert_eq!(guard("d", || Ok::<_, String>(3)).unwrap(), 3);
        assert_eq!(
            guard::<()>("d", || Err("bad".into())).unwrap_err().as_str(),
            "bad"
        );
    }
}
