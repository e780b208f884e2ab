#!/usr/bin/env python3
"""The harness against the tools users would pick instead, in one run on one machine.

Measures, on the same model (the GGUF `harness fetch` caches, which transformers dequantizes to
the same f32 weights) and the same shapes:

  * transformers fp32 and bf16: forward of B x T prompt tokens (prefill), greedy `generate` at
    batch 1 and B (new tokens forced with min_new_tokens, so no row stops early);
  * PEFT fp32 and bf16: LoRA training steps, micro-batch 8 x 64 tokens, r=32 on all seven
    projections, LoRA dropout --lora-dropout (0.1, the harness's default and QLoRA's for small
    models; both sides get the same), AdamW (tokens/s and the process's peak memory, each in its
    own process);
  * lm-evaluation-harness (transformers backend, fp32 and bf16) on the very prompts of a
    harness run: addition k=1..12 x 20 (3-shot, greedy, until a newline, k+6 tokens at most)
    and MMLU machine_learning (letter log-likelihoods), whole process wall time, each run right
    after a `harness eval` of the same workload (--workload-runs such pairs; the ratio is the
    median of the pairs', which holds up on a shared machine whose load drifts);
  * `harness bench eval`, `harness bench eval --compute bf16` (prefill and decoding) and
    `harness bench train` (release build),

and prints one table of ratios (harness / peer, higher is better for rates, lower for times).

It installs nothing. In a virtual environment:

    pip install torch transformers peft accelerate gguf "lm-eval==0.4.13"
    cargo build --release --workspace
    python scripts/peer-bench.py --out peer-bench.json

Each measurement is the median of --runs; the machine should be otherwise idle. Parts can be
left out (--skip lm-eval,peft, or one dtype: --skip peft-bfloat16) where time is short; where
torch emulates bf16 (no bf16 units), --peft-bf16-steps 1 still measures PEFT bf16's memory.
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("HARNESS_CACHE", pathlib.Path.home() / ".cache" / "harness"))
GGUF = CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_model(gguf, dtype):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf.name, torch_dtype=getattr(torch, dtype))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
    model.eval()
    return tok, model


def transformers_part(args, dtype):
    """Prefill and generate tokens/s for one dtype (runs in its own process)."""
    import torch

    torch.manual_seed(0)
    _, model = load_model(args.gguf, dtype)
    vocab = model.config.vocab_size
    b, t, new = args.batch, args.prompt_len, args.new_tokens
    out = {}
    with torch.inference_mode():
        ids = torch.randint(100, vocab - 1, (b, t))
        model(ids)  # warm-up
        rates = []
        for _ in range(args.runs):
            start = time.perf_counter()
            model(ids)
            rates.append(b * t / (time.perf_counter() - start))
        out["prefill"] = statistics.median(rates)
        for batch in (1, b):
            prompt = torch.randint(100, vocab - 1, (batch, 40))
            mask = torch.ones_like(prompt)
            gen = dict(
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
            model.generate(prompt, **gen)  # warm-up
            rates = []
            for _ in range(args.runs):
                # Decoding alone: the time of one new token (prefill + first step) taken off.
                start = time.perf_counter()
                model.generate(prompt, **{**gen, "max_new_tokens": 1, "min_new_tokens": 1})
                first = time.perf_counter() - start
                start = time.perf_counter()
                model.generate(prompt, **gen)
                total = time.perf_counter() - start
                rates.append(batch * (new - 1) / max(total - first, 1e-9))
            out[f"decode_batch_{batch}"] = statistics.median(rates)
    return out


def peft_part(args, dtype):
    """LoRA training tokens/s and peak memory for one dtype (runs in its own process)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    _, model = load_model(args.gguf, dtype)
    config = LoraConfig(
        r=32,
        lora_alpha=64,
        lora_dropout=args.lora_dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    rates = []
    for step in range(args.train_steps + 1):
        ids = torch.randint(100, vocab - 1, (8, 64))
        labels = ids.clone()
        labels[:, :48] = -100  # loss on the last quarter, as `harness bench train`
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step > 0:
            rates.append(8 * 64 / (time.perf_counter() - start))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"train": statistics.median(rates), "peak_gib": peak / 2**30}


def in_child(part, dtype, args):
    """Runs one part in a fresh Python process (its own peak memory) and returns its JSON."""
    steps = args.train_steps
    if part == "peft" and dtype == "bfloat16" and args.peft_bf16_steps is not None:
        steps = args.peft_bf16_steps
    cmd = [
        sys.executable, __file__, "--child", part, "--dtype", dtype,
        "--gguf", str(args.gguf), "--runs", str(args.runs), "--batch", str(args.batch),
        "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
        "--train-steps", str(steps), "--lora-dropout", str(args.lora_dropout),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def harness(args, *rest, capture=True):
    return subprocess.run([str(args.harness), *rest], check=True, capture_output=capture, text=True)


# The two workloads, as `harness eval` arguments (the same as `harness bench eval --workloads`).
WORKLOADS = {
    "addition": ["--task", "addition", "--digits", "1-12", "--n", "20", "--metric", "levenshtein"],
    "mmlu": ["--task", "mmlu", "--subject", "machine_learning", "--metric", "exact-match"],
}


def time_harness(args, workload, out):
    """Wall time of one whole `harness eval` process of a workload, into the fresh folder `out`."""
    start = time.perf_counter()
    harness(args, "eval", *WORKLOADS[workload], "--model", str(args.gguf), "--out", str(out))
    return time.perf_counter() - start


def export_runs(args, work):
    """The harness's own runs of the two workloads, whose prompts lm-eval then answers."""
    add, mmlu = work / "addition", work / "mmlu"
    time_harness(args, "addition", add)
    time_harness(args, "mmlu", mmlu)
    return add, mmlu


def lm_eval_tasks(add, mmlu, work):
    """lm-eval task files over the exported prompts: one generation task per k (its own token
    limit, k + 6, as the harness's), one multiple-choice task for MMLU."""
    samples = [json.loads(l) for l in open(add / "samples.jsonl")]
    names = []
    by_k = {}
    for s in samples:
        by_k.setdefault(s["group"], []).append(s)
    for group, rows in by_k.items():
        k = int(group.split("=")[1])
        name = f"harness_addition_k{k}"
        data = work / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"prompt": r["prompt"], "target": r["target"]}) + "\n" for r in rows))
        (work / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {k + 6}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
        names.append(name)
    rows = []
    for line in open(mmlu / "samples.jsonl"):
        s = json.loads(line)
        labels = [o.strip() for o in s["options"]]
        rows.append({"prompt": s["prompt"], "answer": labels.index(s["target"]), "choices": labels})
    (work / "harness_mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "harness_mmlu.yaml").write_text(f"""task: harness_mmlu
dataset_path: json
dataset_kwargs:
  data_files:
    test: {work / 'harness_mmlu.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return names, ["harness_mmlu"]


def time_lm_eval(args, work, tasks, dtype):
    """Wall time of one whole lm-eval process over `tasks`."""
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={args.gguf.parent},gguf_file={args.gguf.name},dtype={dtype}",
        "--tasks", ",".join(tasks), "--include_path", str(work),
        "--batch_size", str(args.lm_eval_batch), "--device", "cpu",
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return time.perf_counter() - start


def paired(args, work, workload, tasks, dtype):
    """--workload-runs pairs of a harness run and an lm-eval run of one workload, one right after
    the other, so that both sides of each pair meet the same load on a shared machine: the
    medians of each side and of the pairs' ratios."""
    pairs = []
    for r in range(args.workload_runs):
        ours = time_harness(args, workload, work / f"paired-{workload}-{dtype}-{r}")
        pairs.append((ours, time_lm_eval(args, work, tasks, dtype)))
    return {
        "harness_s": statistics.median(h for h, _ in pairs),
        "peer_s": statistics.median(p for _, p in pairs),
        "ratio": statistics.median(h / p for h, p in pairs),
        "pairs": pairs,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--harness", type=pathlib.Path, default=ROOT / "target" / "release" / "harness")
    p.add_argument("--gguf", type=pathlib.Path, default=GGUF)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--workload-runs", type=int, default=1, help="alternating pairs of harness and lm-eval runs of each workload (the ratio is the median of the pairs')")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout of both the harness's and PEFT's training steps (the harness's default and QLoRA's for small models)")
    p.add_argument("--peft-bf16-steps", type=int, help="timed steps of PEFT bf16 (default --train-steps): 1 where torch emulates bf16 and a step takes minutes, to measure its peak memory")
    p.add_argument("--lm-eval-batch", type=int, default=8)
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: transformers, peft, lm-eval, harness, harness-bf16 (its compute=bf16 pass), or one dtype of a part (peft-bfloat16: where the CPU has no bf16 units, torch's bf16 is emulated and takes minutes per step)")
    p.add_argument("--out", type=pathlib.Path, help="write every figure as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        part = {"transformers": transformers_part, "peft": peft_part}[args.child]
        print(json.dumps(part(args, args.dtype)))
        return
    if not args.gguf.is_file():
        sys.exit(f"{args.gguf} not found: run `harness fetch` first")
    if not args.harness.is_file():
        sys.exit(f"{args.harness} not found: run `cargo build --release --workspace` first")
    skip = set(filter(None, args.skip.split(",")))
    fig = {"machine": machine()}
    wanted = lambda part, dtype: part not in skip and f"{part}-{dtype}" not in skip
    for dtype in ("float32", "bfloat16"):
        for part in ("transformers", "peft"):
            if wanted(part, dtype):
                print(f"{part} {dtype} ...", file=sys.stderr)
                fig[f"{part}_{dtype}"] = in_child(part, dtype, args)
    if "harness" not in skip:
        print("harness bench eval ...", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            out = pathlib.Path(tmp) / "bench.json"
            harness(args, "bench", "eval", "--model", str(args.gguf), "--runs", str(args.runs),
                    "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
                    "--new-tokens", str(args.new_tokens), "--json", str(out))
            fig["harness_eval"] = json.loads(out.read_text())
            if "harness-bf16" not in skip:
                print("harness bench eval --compute bf16 ...", file=sys.stderr)
                harness(args, "bench", "eval", "--model", str(args.gguf), "--runs", str(args.runs),
                        "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
                        "--new-tokens", str(args.new_tokens), "--compute", "bf16", "--json", str(out))
                fig["harness_eval_bf16"] = json.loads(out.read_text())
        print("harness bench train ...", file=sys.stderr)
        text = harness(args, "bench", "train", "--model", str(args.gguf), "--steps", str(args.train_steps),
                       "--train-option", f"dropout={args.lora_dropout}").stdout
        fig["harness_train"] = {
            "train": float(text.split("median ")[1].split()[0]),
            "peak_gib": float(text.split("peak resident memory: ")[1].split()[0]),
        }
    if "lm-eval" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            work = pathlib.Path(tmp)
            print("exporting the harness's prompts ...", file=sys.stderr)
            add, mmlu = export_runs(args, work)
            add_tasks, mmlu_tasks = lm_eval_tasks(add, mmlu, work)
            for dtype in ("float32", "bfloat16"):
                if not wanted("lm-eval", dtype):
                    continue
                print(f"lm-eval {dtype}, alternating with the harness ...", file=sys.stderr)
                fig[f"lm_eval_{dtype}"] = {
                    "addition": paired(args, work, "addition", add_tasks, dtype),
                    "mmlu": paired(args, work, "mmlu", mmlu_tasks, dtype),
                }
    if args.out:
        args.out.write_text(json.dumps(fig, indent=2) + "\n")
    print_table(fig, args)


def machine():
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def print_table(fig, args):
    h = fig.get("harness_eval", {})
    ht = fig.get("harness_train", {})
    rows = []

    def rate(what, ours, peer_key, field, goal):
        peer = fig.get(peer_key, {}).get(field)
        if ours is None or peer is None:
            return
        rows.append((what, f"{ours:.1f}", f"{peer:.1f}", f"{ours / peer:.2f}x", goal))

    def wall(what, peer_key, field, goal):
        p = fig.get(peer_key, {}).get(field)
        if p is None:
            return
        n = len(p["pairs"])
        rows.append((f"{what} ({n} alternating pair{'s' if n > 1 else ''})", f"{p['harness_s']:.1f} s",
                     f"{p['peer_s']:.1f} s", f"{p['ratio']:.2f}x", goal))

    pre = h.get("prefill", {}).get("tokens_per_s")
    d1 = h.get("decode_batch_1", {}).get("tokens_per_s")
    dn = h.get("decode_batch_n", {}).get("tokens_per_s")
    b = args.batch
    rate(f"prefill {b}x{args.prompt_len} tok/s vs transformers fp32", pre, "transformers_float32", "prefill", ">= 1.0x")
    rate(f"prefill {b}x{args.prompt_len} tok/s vs transformers bf16", pre, "transformers_bfloat16", "prefill", "")
    pre_bf16 = fig.get("harness_eval_bf16", {}).get("prefill", {}).get("tokens_per_s")
    rate(f"prefill {b}x{args.prompt_len} tok/s, compute=bf16, vs transformers bf16", pre_bf16, "transformers_bfloat16", "prefill", ">= 1.0x")
    rate("decode batch 1 tok/s vs transformers fp32", d1, "transformers_float32", "decode_batch_1", "")
    rate(f"decode batch {b} tok/s vs transformers fp32", dn, "transformers_float32", f"decode_batch_{b}", "")
    rate(f"decode batch {b} tok/s vs transformers bf16", dn, "transformers_bfloat16", f"decode_batch_{b}", ">= 2.0x")
    wall("addition 1-12 x 20 wall vs lm-eval fp32", "lm_eval_float32", "addition", "<= 0.33x")
    wall("addition 1-12 x 20 wall vs lm-eval bf16", "lm_eval_bfloat16", "addition", "")
    wall("MMLU machine_learning wall vs lm-eval fp32", "lm_eval_float32", "mmlu", "")
    wall("MMLU machine_learning wall vs lm-eval bf16", "lm_eval_bfloat16", "mmlu", "")
    rate("QLoRA train tok/s vs PEFT fp32", ht.get("train"), "peft_float32", "train", "")
    rate("QLoRA train tok/s vs PEFT bf16", ht.get("train"), "peft_bfloat16", "train", ">= 2.0x")
    for dtype, name, goal in (("float32", "fp32", ""), ("bfloat16", "bf16", "<= 0.25x")):
        peer = fig.get(f"peft_{dtype}", {}).get("peak_gib")
        if ht.get("peak_gib") and peer:
            rows.append((f"QLoRA train peak memory vs PEFT {name}", f"{ht['peak_gib']:.2f} GiB", f"{peer:.2f} GiB",
                         f"{ht['peak_gib'] / peer:.2f}x", goal))
    print(f"\nmachine: {fig['machine']}; harness kernel path: {h.get('kernel_path', '?')}\n")
    head = ("measure", "harness", "peer", "ratio", "goal")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


if __name__ == "__main__":
    main()
