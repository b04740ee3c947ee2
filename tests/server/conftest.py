"""A real ``stagewise serve`` process for the HTTP tests.

``ServerProcess`` starts ``python -m pipeline.serve`` on a free port with the
bundled demo model (or, while its weights are not in the tree, a tiny random
Llama written by ``tests/server/tiny_model.py``) on the CPU, waits for
``/health`` to answer 200, and stops it with SIGTERM. Fixtures are
module-scoped: one server per test module.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO / "models" / "demo"
START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health_status(url: str, timeout_s: float = 30.0) -> int:
    """The status code ``url``'s ``/health`` answers (200, or the error's code, e.g. 503)."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def demo_model_ready() -> bool:
    return (DEMO_DIR / "config.json").is_file() and any(DEMO_DIR.glob("*.safetensors"))


def wait_for_url(url: str, process: subprocess.Popen, what: str, log_text, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail early (with ``log_text()``) if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready at {url} within {timeout_s} s:\n{log_text()}")

class ServerProcess:
    """One server subprocess; ``url`` is its base address."""

    def __init__(self, model_dir: Path, log_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
        command = [sys.executable, "-m", "pipeline.serve", "--model-path", str(model_dir), "--port",
                   str(self.port), "--enable-metrics", "--max-total-tokens", "16384", "--log-level", "info",
                   *flags]
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        wait_for_url(self.url + "/health", self.process, "server", self.log_text, timeout_s)

    def post_json(self, path: str, body: dict, timeout_s: float = 120.0) -> tuple[int, dict]:
        """POST ``body`` as JSON to ``path``: (HTTP status, the JSON answer), an error status included."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-4000:]

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if demo_model_ready():
        return DEMO_DIR
    from tests.server.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):
    from stages.tokenizer import load_tokenizer

    return load_tokenizer(model_dir)


@contextmanager
def running_server(model_dir: Path, log_path: Path, *flags: str) -> Iterator[ServerProcess]:
    """A started, ready server for the duration of the block (stopped even if the block fails)."""
    process = ServerProcess(model_dir, log_path, *flags)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()
