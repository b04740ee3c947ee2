"""``instructor`` against a live server: a Pydantic object from a forced tool call, whole and streamed partially.

instructor's TOOLS mode sends the model's JSON schema as the one tool and
forces it with ``tool_choice``; ``create_partial`` streams the call's
``arguments`` and re-parses the growing JSON into ever fuller partial objects
after every chunk. It needs one ``delta.tool_calls`` entry per chunk for the
call. The tiny random model's output is whatever the grammar allows, so the
objects are valid but their values arbitrary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import instructor
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import running_server


class Booking(BaseModel):
    """A hotel booking."""

    city: Literal["Oslo", "Rome", "Lima"]
    nights: int = Field(ge=1, le=9)
    guest: str = Field(max_length=8)


MESSAGES = [{"role": "user", "content": "Book two nights in Oslo for Ann."}]


@pytest.fixture(scope="module")
def client(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with running_server(model_dir, tmp_path_factory.mktemp("logs") / "instructor.log") as server:
        raw = openai.OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0, timeout=120)
        yield instructor.from_openai(raw, mode=instructor.Mode.TOOLS)


def test_whole_object_from_forced_tool_call(client):
    booking = client.chat.completions.create(model="m", response_model=Booking, messages=MESSAGES,
                                             max_tokens=96, temperature=0, max_retries=0)
    assert isinstance(booking, Booking) and 1 <= booking.nights <= 9 and len(booking.guest) <= 8


def test_partial_objects_stream_from_forced_tool_call(client):
    whole = client.chat.completions.create(model="m", response_model=Booking, messages=MESSAGES,
                                           max_tokens=96, temperature=0, max_retries=0)
    partials = list(client.chat.completions.create_partial(model="m", response_model=Booking, messages=MESSAGES,
                                                           max_tokens=96, temperature=0, max_retries=0))
    assert len(partials) >= 3, partials  # the object grows chunk by chunk
    first, last = partials[0].model_dump(), partials[-1].model_dump()
    assert list(first.values()).count(None) > list(last.values()).count(None)
    assert Booking.model_validate(last).model_dump() == whole.model_dump()  # greedy: streamed == whole
    filled = [sum(value is not None for value in p.model_dump().values()) for p in partials]
    assert filled == sorted(filled), "fields, once there, stay there"
