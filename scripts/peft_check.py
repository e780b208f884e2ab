"""Checks that an adapter trained by harness loads in Python PEFT and does what it does here.

Make the case with the backend's ignored test, then run this where torch, transformers and
peft are installed:

    HARNESS_PEFT_CHECK=/tmp/peft-case cargo test --release -p backend-candle --lib \
        export_peft_compatibility_case -- --ignored
    python3 scripts/peft_check.py /tmp/peft-case

The case is a tiny random LLaMA in HF layout (model/), a LoRA adapter on all seven projections
trained on it by harness (adapter/), and harness's next-token logits with and without the
adapter (cases.json). PEFT loads the adapter onto the same model; the logits must agree. (The
other direction, a PEFT-made adapter loaded by harness, is tested against
tests/fixtures/smollm2/peft-adapter in the backend's reference tests.)
"""

import json
import sys

import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

TOLERANCE = 1e-4


def main(case_dir: str) -> int:
    cases = json.load(open(f"{case_dir}/cases.json"))
    base = LlamaForCausalLM.from_pretrained(f"{case_dir}/model", torch_dtype=torch.float32)
    base.eval()
    worst_base = 0.0
    with torch.no_grad():
        for c in cases:
            got = base(torch.tensor([c["ids"]])).logits[0, -1]
            worst_base = max(worst_base, (got - torch.tensor(c["base"])).abs().max().item())
    model = PeftModel.from_pretrained(base, f"{case_dir}/adapter")
    model.eval()
    worst, moved = 0.0, 0.0
    with torch.no_grad():
        for c in cases:
            got = model(torch.tensor([c["ids"]])).logits[0, -1]
            want = torch.tensor(c["with_adapter"])
            worst = max(worst, (got - want).abs().max().item())
            moved = max(moved, (want - torch.tensor(c["base"])).abs().max().item())
    print(f"base model: max |harness - transformers| = {worst_base:.2e}")
    print(f"with adapter: max |harness - PEFT| = {worst:.2e} (the adapter moves logits by up to {moved:.3f})")
    ok = worst_base < TOLERANCE and worst < TOLERANCE and moved > 100 * TOLERANCE
    print("PEFT compatibility:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
