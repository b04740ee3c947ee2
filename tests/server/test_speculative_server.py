"""Speculative decoding (NGRAM) through the HTTP server: same greedy tokens, counts in meta_info and /metrics."""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from tests.server.conftest import running_server


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _generate(base: str, prompts: list[list[int]]) -> list[dict]:
    params = {"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True}
    return _post(base + "/generate", {"input_ids": prompts, "sampling_params": params})


def test_greedy_server_output_equals_plain_and_reports_acceptance(model_dir: Path, tmp_path: Path) -> None:
    prompts = [[3 + (11 * i + 7 * (j % 4)) % 200 for j in range(8 + 5 * i)] for i in range(3)]
    with running_server(model_dir, tmp_path / "plain.log") as server:
        plain = _generate(server.url, prompts)
    with running_server(model_dir, tmp_path / "spec.log", "--speculative-algorithm", "NGRAM",
                        "--speculative-num-draft-tokens", "5") as server:
        spec = _generate(server.url, prompts)
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
            metrics = response.read().decode()
    assert [r["output_ids"] for r in spec] == [r["output_ids"] for r in plain]
    assert [r["text"] for r in spec] == [r["text"] for r in plain]
    verify_steps = [r["meta_info"].get("spec_verify_ct", 0) for r in spec]
    assert all(steps > 0 for steps in verify_steps)
    assert sum(r["meta_info"]["spec_accepted_tokens"] for r in spec) > 0
    count_line = next(line for line in metrics.splitlines() if line.startswith("stagewise:spec_accept_length_count"))
    assert float(count_line.split()[-1]) == len(prompts)
