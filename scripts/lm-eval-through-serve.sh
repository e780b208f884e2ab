#!/usr/bin/env bash
# lm-evaluation-harness scoring a model that `harness serve` serves, on the very prompts a
# harness multiple-choice run used (exported from its samples.jsonl), so the two scores compare
# one to one.
#
#   harness eval --task mmlu --subject machine_learning --out runs/ml
#   harness serve --port 8080 &
#   scripts/lm-eval-through-serve.sh runs/ml http://127.0.0.1:8080
#
# Needs `pip install lm-eval` (0.4.13 tested); it installs nothing itself. lm-eval's
# `local-completions` model uses the server's /tokenize (tokenizer_backend=remote), so its
# context lengths count the served model's own tokens, and sends token ids with echo +
# logprobs, which `harness serve` scores as given.
set -euo pipefail
run=${1:?usage: lm-eval-through-serve.sh RUN_DIR [SERVER_URL]}
url=${2:-http://127.0.0.1:8080}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$run/samples.jsonl" "$work" <<'PY'
import json, sys, pathlib
samples, work = sys.argv[1], pathlib.Path(sys.argv[2])
rows = []
for line in open(samples):
    s = json.loads(line)
    if "options" not in s:
        sys.exit(f"{samples}: not a multiple-choice run (no options)")
    labels = [o.strip() for o in s["options"]]
    rows.append({"id": s["id"], "prompt": s["prompt"], "answer": labels.index(s["target"]), "choices": labels})
(work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
(work / "harness_run.yaml").write_text(f"""task: harness_run
dataset_path: json
dataset_kwargs:
  data_files:
    test: {work / 'data.jsonl'}
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
print(f"{len(rows)} questions exported")
PY
model=$(curl -s "$url/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
HF_DATASETS_OFFLINE=1 lm_eval --model local-completions \
    --model_args "model=$model,base_url=$url/v1/completions,tokenizer_backend=remote,num_concurrent=1,max_retries=1" \
    --tasks harness_run --include_path "$work" --batch_size 1
