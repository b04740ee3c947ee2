"""lm-eval (EleutherAI's harness, a real client) against a live server, offline.

Two tasks are written here, on a local JSONL file (no hub): a
loglikelihood task (``multiple_choice``: a Shakespeare line against the same
line with its words shuffled, after the speaker's name) through
``local-completions`` -- it scores the prompt with ``echo`` + ``logprobs``,
so it needs prompt logprobs -- and a ``generate_until`` task through
``local-completions`` and ``local-chat-completions``. The demo model was
trained on this text, so its loglikelihood must prefer the real lines.

lm-eval runs as a subprocess (its command line), with the hub switched off
(``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``) and its caches in a temporary
directory; it tokenizes with the served model's own tokenizer directory.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.conftest import DEMO_DIR, demo_model_ready, running_server

pytest.importorskip("lm_eval", reason="needs lm-eval (pip install lm-eval, in the test extra)")
if not demo_model_ready():
    pytest.skip("needs the bundled demo model's weights (models/demo)", allow_module_level=True)

NUM_LINES = 12

LOGLIKELIHOOD_TASK = """\
task: stagewise_shakespeare_order
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{speaker}}}}:\\n"
doc_to_choice: choices
doc_to_target: 0
target_delimiter: ""
metric_list:
  - metric: acc
"""

GENERATE_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{speaker}}}}:\\n"
doc_to_target: "{{{{line}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""


def shakespeare_docs(count: int) -> list[dict]:
    """Speaker + first line of a speech (6+ words), with a word-shuffled copy of the line."""
    lines = (DEMO_DIR / "tinyshakespeare.txt").read_text().splitlines()
    rng = random.Random(0)
    docs = []
    for speaker, line in zip(lines, lines[1:]):
        words = line.split()
        if not speaker.endswith(":") or len(words) < 6 or len(docs) >= count:
            continue
        shuffled = list(words)
        while shuffled == words:
            rng.shuffle(shuffled)
        docs.append({"speaker": speaker[:-1], "line": line, "choices": [line, " ".join(shuffled)]})
    return docs


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "lm_eval.log"
    with running_server(DEMO_DIR, log, "--placement", "single") as process:
        yield process


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("lm_eval_tasks")
    data = directory / "shakespeare.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in shakespeare_docs(NUM_LINES)))
    (directory / "order.yaml").write_text(LOGLIKELIHOOD_TASK.format(data=data))
    for name in ("stagewise_shakespeare_gen", "stagewise_shakespeare_chat"):
        (directory / f"{name}.yaml").write_text(GENERATE_TASK.format(name=name, data=data))
    return directory


def run_lm_eval(out: Path, tasks_dir: Path, model: str, model_args: str, tasks: list[str], *extra: str) -> dict:
    """Run lm-eval's command line; per task, its results and its logged samples."""
    home = out / "hf_home"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(home), HF_DATASETS_CACHE=str(home / "datasets"), TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
               "--tasks", ",".join(tasks), "--include_path", str(tasks_dir), "--output_path", str(out / "results"),
               "--log_samples", *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    [results_file] = list((out / "results").rglob("results_*.json"))
    results = json.loads(results_file.read_text())["results"]
    return {task: {"results": results[task],
                   "samples": [json.loads(line) for path in (out / "results").rglob(f"samples_{task}_*.jsonl")
                               for line in path.open()]}
            for task in tasks}


@pytest.fixture(scope="module")
def completions_run(server, tasks_dir, tmp_path_factory) -> dict:
    """Both tasks through local-completions, in one lm-eval run."""
    args = (f"model=demo,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={DEMO_DIR},num_concurrent=2,max_retries=1,max_length=1024")
    return run_lm_eval(tmp_path_factory.mktemp("lm_eval_completions"), tasks_dir, "local-completions", args,
                       ["stagewise_shakespeare_order", "stagewise_shakespeare_gen"])


def test_loglikelihood_prefers_real_lines(completions_run):
    run = completions_run["stagewise_shakespeare_order"]
    assert len(run["samples"]) == NUM_LINES
    for sample in run["samples"]:
        (real, _), (shuffled, _) = [(float(ll), greedy) for ll, greedy in sample["filtered_resps"]]
        assert real < 0.0 and shuffled < 0.0, sample
    accuracy = run["results"]["acc,none"]
    assert accuracy >= 0.9, run["samples"]


def test_generate_until_through_completions(completions_run):
    run = completions_run["stagewise_shakespeare_gen"]
    responses = [sample["resps"][0][0] for sample in run["samples"]]
    assert len(responses) == NUM_LINES and any(text.strip() for text in responses)
    assert all("\n" not in text for text in responses)  # "until" reached the server as a stop string
    assert "exact_match,none" in run["results"]


def test_generate_until_through_chat_completions(server, tasks_dir, tmp_path):
    args = f"model=demo,base_url={server.url}/v1/chat/completions,num_concurrent=2,max_retries=1"
    run = run_lm_eval(tmp_path, tasks_dir, "local-chat-completions", args, ["stagewise_shakespeare_chat"],
                      "--limit", "4", "--apply_chat_template")["stagewise_shakespeare_chat"]
    responses = [sample["resps"][0][0] for sample in run["samples"]]
    assert len(responses) == 4 and any(text.strip() for text in responses)
    assert all("\n" not in text for text in responses)
