"""The chat template sandbox alone: same text as the tokenizer, time, memory and size limits, lifetime."""
from __future__ import annotations

import os
import time

import pytest

from stages.template_sandbox import TemplateRenderError, TemplateSandbox
from tests.server.tiny_model import save_tiny_tokenizer

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if tools %}[{{ tools | tojson }}]{% endif %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
            "{{ extra | default('') }}")
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo {{ not code }}"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from stages.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(path)
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def sandbox(tokenizer):
    box = TemplateSandbox(tokenizer.special_tokens_map, timeout_s=2.0, max_chars=1 << 20, num_workers=2)
    yield box
    box.close()


def render(box: TemplateSandbox, template: str, **kwargs) -> str:
    return box.render(CHAT, template, tools=kwargs.pop("tools", None), add_generation_prompt=True,
                      continue_final_message=False, template_kwargs=kwargs)


@pytest.mark.parametrize("tools,kwargs", [(None, {}), ([{"type": "function", "function": {"name": "f"}}],
                                                        {"extra": "!"})])
def test_renders_what_the_tokenizer_renders(tokenizer, sandbox, tools, kwargs):
    expected = tokenizer.apply_chat_template(CHAT, tools=tools, tokenize=False, add_generation_prompt=True,
                                             chat_template=TEMPLATE, **kwargs)
    assert render(sandbox, TEMPLATE, tools=tools, **kwargs) == expected
    assert tokenizer.bos_token in expected and "<|assistant|>" in expected


def test_a_nested_loop_is_stopped_at_the_time_limit_and_the_other_worker_keeps_serving(sandbox):
    import threading

    slow: list[BaseException] = []

    def run_slow() -> None:
        try:
            render(sandbox, "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}")
        except TemplateRenderError as error:
            slow.append(error)

    thread = threading.Thread(target=run_slow)
    start = time.monotonic()
    thread.start()
    time.sleep(0.3)
    assert render(sandbox, "{{ messages[1]['content'] }}") == "héllo {{ not code }}"
    assert time.monotonic() - start < 1.5, "a good template waited for the slow one"
    thread.join(10)
    assert len(slow) == 1 and "time limit of 2 s" in str(slow[0])
    assert render(sandbox, "{{ 1 + 1 }}") == "2"  # the killed worker's slot starts a fresh one


def test_a_huge_string_is_refused_before_it_reaches_the_server(tokenizer):
    box = TemplateSandbox(tokenizer.special_tokens_map, timeout_s=60.0, max_chars=1 << 20, num_workers=1)
    try:  # a time limit a loaded CI machine cannot reach: the size and memory limits must answer
        with pytest.raises(TemplateRenderError, match="100000000 characters, more than the limit of 1048576"):
            render(box, "{{ 'ab' * 50000000 }}")
        with pytest.raises(TemplateRenderError, match="ran out of memory"):
            render(box, "{{ 'ab' * 5000000000 }}")  # 10 GB: past the worker's address-space cap
    finally:
        box.close()


@pytest.mark.parametrize("template,reason", [
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}", "recursion"),
    ("{% for %}", "chat template failed"),
])
def test_template_errors_are_reasons(sandbox, template, reason):
    with pytest.raises(TemplateRenderError, match=reason):
        render(sandbox, template)


def test_close_kills_the_workers(tokenizer):
    box = TemplateSandbox(tokenizer.special_tokens_map, num_workers=1)
    assert render(box, "{{ eos_token }}") == tokenizer.eos_token
    [pid] = box.worker_pids()
    box.close()
    assert box.worker_pids() == [None]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(TemplateRenderError, match="shutting down"):
        render(box, "x")
