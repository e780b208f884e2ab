"""Checks on the real model that an adapter trained by harness answers the same in Python PEFT.

harness evaluates with the adapter on the f32 base (the GGUF checkpoint dequantized); this script
reads the model and the adapter from that run's run.toml, loads the same GGUF in transformers
(every tensor dequantized to f32), puts the adapter on it with PEFT, decodes every prompt of the
run greedily and compares the answers (the text up to the first newline, as the addition task
reads it):

    harness eval --task addition --adapter adapters/addition-1-7 --base f32 --n 4 --out runs/peft-xcheck
    python3 scripts/peft_generate_check.py runs/peft-xcheck

Run it from the folder harness ran in (run.toml keeps the adapter path as it was given). Needs
torch, transformers, peft and gguf. Two fp32 implementations may still part ways where two
candidate tokens' logits are nearly equal, so the script prints every disagreement with the
smallest gap between the two top logits, and fails only when more than MAX_DISAGREE of the
answers differ.
"""

import argparse
import json
import os
import sys
import tomllib

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

MAX_DISAGREE = 0.02


def answer(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def load_base(path: str):
    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return tokenizer, base


def read_run(run_dir: str) -> tuple[str, str, list]:
    """The model, the adapter and the samples of a harness eval run, or a sentence saying why
    the run cannot be checked."""
    try:
        with open(os.path.join(run_dir, "run.toml"), "rb") as f:
            run = tomllib.load(f)
        with open(os.path.join(run_dir, "samples.jsonl")) as f:
            samples = [json.loads(line) for line in f]
    except (OSError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        sys.exit(f"{run_dir} is not a finished harness eval run ({e}); run `harness eval` first")
    backend = tomllib.loads(run.get("backend", {}).get("options", ""))
    adapter, base = backend.get("adapter"), backend.get("base")
    if adapter is None or base != "f32":
        how = "without an adapter" if adapter is None else f"on the {base} base"
        sys.exit(
            f"{run_dir} was evaluated {how}; evaluate again with `--adapter DIR --base f32`, "
            "the base PEFT loads the adapter onto here"
        )
    if not os.path.isdir(adapter):
        sys.exit(f"adapter {adapter} (from {run_dir}/run.toml) not found; run this where harness ran")
    if any("generated_tokens" not in s for s in samples):
        sys.exit(f"{run_dir} holds multiple-choice answers; this check compares generated ones")
    return run["model"]["path"], adapter, samples


def main(run_dir: str) -> int:
    model_path, adapter, samples = read_run(run_dir)
    tokenizer, base = load_base(model_path)
    model = PeftModel.from_pretrained(base, adapter)
    model.eval()
    differ = []
    with torch.no_grad():
        for s in samples:
            ids = tokenizer(s["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
            out = model.generate(
                ids,
                max_new_tokens=max(s["generated_tokens"], 1),
                do_sample=False,
                return_dict_in_generate=True,
                output_scores=True,
                pad_token_id=tokenizer.eos_token_id,
            )
            new = out.sequences[0, ids.shape[1]:]
            text = tokenizer.decode(new, skip_special_tokens=True)
            if answer(text) != answer(s["prediction"]):
                top = [torch.topk(step[0], 2).values for step in out.scores]
                gaps = [float(t[0] - t[1]) for t in top]
                differ.append((s["id"], s["prediction"], text, min(gaps)))
    for id_, ours, theirs, gap in differ:
        print(f"{id_}: harness {ours!r}, PEFT {theirs!r} (smallest top-2 logit gap {gap:.3g})")
    share = len(differ) / max(len(samples), 1)
    print(f"{len(samples) - len(differ)} of {len(samples)} answers equal")
    ok = share <= MAX_DISAGREE
    print("PEFT generation check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="harness's run folder of `eval --adapter DIR --base f32`")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a background job)")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    sys.exit(main(a.run))
