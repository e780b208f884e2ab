//! Property tests of the parsers the backend owns: a GGUF model (header, metadata, tensor table),
//! a PEFT adapter folder (adapter_config.json and the safetensors header). Each case mutates a
//! valid file at random and loads it: the load must return (a model or an error), never panic,
//! and never ask for one allocation larger than the file could justify (32 times its size, the
//! f32 form of its contents, plus 1 MiB), which catches a size field trusted before it is
//! checked. The declared context length, whose rotary tables are sized by it, is checked on
//! its own by `architecture::check` (at most 2^21 positions) and left alone here.
//!
//! Cases: 1000 GGUF byte mutations, 1000 GGUF metadata values, 500 adapter mutations, from a
//! fixed seed (PROPTEST_RNG_SEED and PROPTEST_CASES explore others).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use backend_candle::model::checkpoint;
use backend_candle::model::weights::Packing;
use backend_candle::train::adapter::LoraAdapter;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};

/// proptest's settings: a fixed seed unless PROPTEST_RNG_SEED is set (every run checks the same
/// cases and a failure reproduces; set it to explore others), PROPTEST_CASES overrides the count,
/// and no regression files are written into the source tree.
fn config(cases: u32) -> Config {
    let mut c = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        c.rng_seed = RngSeed::Fixed(0x5eed_1234);
    }
    c.failure_persistence = None;
    c
}

/// The system allocator, remembering the largest single request.
struct Largest;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Largest = Largest;

const HIDDEN: usize = 16;
const INTER: usize = 32;
const LAYERS: usize = 2;
const VOCAB: usize = 24;

fn work_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("candle-fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny LLaMA as a GGUF file: 2 layers, hidden 16, 2 heads (1 KV head), byte-ish vocabulary.
fn tiny_gguf(fields: &[(&str, u32)]) -> Vec<u8> {
    let dev = Device::Cpu;
    let t = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        QTensor::quantize(&Tensor::from_vec(v, shape, &dev).unwrap(), GgmlDType::F32).unwrap()
    };
    let mut tensors = vec![
        ("token_embd.weight".to_string(), t(&[VOCAB, HIDDEN])),
        ("output_norm.weight".to_string(), t(&[HIDDEN])),
    ];
    for l in 0..LAYERS {
        for (name, shape) in [
            ("attn_norm.weight", vec![HIDDEN]),
            ("ffn_norm.weight", vec![HIDDEN]),
            ("attn_q.weight", vec![HIDDEN, HIDDEN]),
            ("attn_k.weight", vec![HIDDEN / 2, HIDDEN]),
            ("attn_v.weight", vec![HIDDEN / 2, HIDDEN]),
            ("attn_output.weight", vec![HIDDEN, HIDDEN]),
            ("ffn_gate.weight", vec![INTER, HIDDEN]),
            ("ffn_up.weight", vec![INTER, HIDDEN]),
            ("ffn_down.weight", vec![HIDDEN, INTER]),
        ] {
            tensors.push((format!("blk.{l}.{name}"), t(&shape)));
        }
    }
    use gguf_file::Value;
    // Single letters, and "ab" for the one merge.
    let tokens: Vec<Value> = (0..VOCAB - 1)
        .map(|i| Value::String(char::from(b'a' + i as u8).to_string()))
        .chain([Value::String("ab".into())])
        .collect();
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![Value::String("a b".into())]),
        ),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
    ];
    for (k, v) in fields {
        metadata.push((format!("llama.{k}"), Value::U32(*v)));
    }
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md, &ts).unwrap();
    out.into_inner()
}

const GOOD: [(&str, u32); 6] = [
    ("embedding_length", HIDDEN as u32),
    ("feed_forward_length", INTER as u32),
    ("block_count", LAYERS as u32),
    ("attention.head_count", 2),
    ("attention.head_count_kv", 1),
    ("context_length", 64),
];

/// Loads `bytes` as a model file; returns whether it loaded, after checking the allocations.
fn load_model(path: &Path, bytes: &[u8]) -> Result<bool, TestCaseError> {
    std::fs::write(path, bytes).unwrap();
    LARGEST.store(0, Ordering::Relaxed);
    let loaded = checkpoint::load(path, &Device::Cpu, Packing::F32).is_ok();
    let largest = LARGEST.load(Ordering::Relaxed);
    prop_assert!(
        largest <= 32 * bytes.len() + (1 << 20),
        "one allocation of {largest} bytes for a file of {}",
        bytes.len()
    );
    Ok(loaded)
}

/// One test, so that nothing else in this process runs while allocations are measured.
#[test]
fn model_and_adapter_files_mutated_at_random_load_or_fail_cleanly() {
    // A captured backtrace (candle attaches one to its errors when RUST_BACKTRACE is set) is
    // resolved with large buffers that are not the loader's; measure without them.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    gguf_files();
    adapter_folders();
}

fn gguf_files() {
    let dir = work_dir("gguf");
    let good = tiny_gguf(&GOOD);
    assert!(
        load_model(&dir.join("good.gguf"), &good).unwrap(),
        "the valid file loads"
    );
    // Found by a wider run: the vocabulary dimension overwritten to about 1.1e19, whose element
    // count wraps around in candle's arithmetic; it used to abort the dequantization.
    let mut wrapped = good.clone();
    wrapped[753] = 152;
    std::fs::write(dir.join("wrapped.gguf"), &wrapped).unwrap();
    let e = checkpoint::load(&dir.join("wrapped.gguf"), &Device::Cpu, Packing::F32)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tensor `token_embd.weight` has dimensions"),
        "{e}"
    );

    // Bytes overwritten anywhere, then perhaps the file cut short.
    let mut runner = TestRunner::new(config(1000));
    let len = good.len();
    let strategy = (
        prop::collection::vec((0..len, any::<u8>()), 1..8),
        prop::option::of(0..len),
    );
    runner
        .run(&strategy, |(edits, cut)| {
            let mut bytes = good.clone();
            for (at, b) in edits {
                bytes[at] = b;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut);
            }
            load_model(&dir.join("mutated.gguf"), &bytes).map(|_| ())
        })
        .unwrap();

    // Architecture fields of any size, 0 and 2^32-1 included.
    let mut runner = TestRunner::new(config(1000));
    let field = prop_oneof![Just(0u32), 1u32..70, Just(u32::MAX), any::<u32>()];
    let strategy = prop::collection::vec(field, 5);
    runner
        .run(&strategy, |values| {
            let mut fields = GOOD;
            for (f, v) in fields.iter_mut().zip(values) {
                f.1 = v;
            }
            load_model(&dir.join("fields.gguf"), &tiny_gguf(&fields)).map(|_| ())
        })
        .unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// A PEFT adapter for the tiny model: q_proj and v_proj of both layers, r = 2.
fn tiny_adapter(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}"#,
    )
    .unwrap();
    let mut tensors = std::collections::HashMap::new();
    for l in 0..LAYERS {
        for (m, out) in [("q_proj", HIDDEN), ("v_proj", HIDDEN / 2)] {
            let key = |ab: &str| {
                format!("base_model.model.model.layers.{l}.self_attn.{m}.lora_{ab}.weight")
            };
            let a = Tensor::ones((2, HIDDEN), candle_core::DType::F32, &Device::Cpu).unwrap();
            let b = Tensor::ones((out, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
            tensors.insert(key("A"), a);
            tensors.insert(key("B"), b);
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
}

fn adapter_folders() {
    let dir = work_dir("adapter");
    let good = dir.join("good");
    tiny_adapter(&good);
    LoraAdapter::load(&good, &Device::Cpu).expect("the valid adapter loads");
    let config_json = std::fs::read(good.join("adapter_config.json")).unwrap();
    let weights = std::fs::read(good.join("adapter_model.safetensors")).unwrap();

    let mut runner = TestRunner::new(config(500));
    let strategy = (
        any::<bool>(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        prop::option::of(any::<prop::sample::Index>()),
    );
    let case = dir.join("case");
    runner
        .run(&strategy, |(in_config, edits, cut)| {
            let mut bytes = if in_config {
                config_json.clone()
            } else {
                weights.clone()
            };
            for (at, b) in edits {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            if let Some(cut) = cut {
                let n = cut.index(bytes.len());
                bytes.truncate(n);
            }
            let _ = std::fs::remove_dir_all(&case);
            std::fs::create_dir_all(&case).unwrap();
            let (c, w) = if in_config {
                (&bytes, &weights)
            } else {
                (&config_json, &bytes)
            };
            std::fs::write(case.join("adapter_config.json"), c).unwrap();
            std::fs::write(case.join("adapter_model.safetensors"), w).unwrap();
            LARGEST.store(0, Ordering::Relaxed);
            let _ = LoraAdapter::load(&case, &Device::Cpu);
            let largest = LARGEST.load(Ordering::Relaxed);
            let size = c.len() + w.len();
            prop_assert!(
                largest <= 32 * size + (1 << 20),
                "one allocation of {largest} bytes for {size} bytes of adapter"
            );
            Ok(())
        })
        .unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
