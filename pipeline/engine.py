"""Engine: the whole runtime in one process, behind a Python API.

::

    with Engine(model_path) as engine:          # None -> the bundled demo model
        out = engine.generate("To be, or not", {"max_new_tokens": 32, "temperature": 0})
        print(out["text"], out["meta_info"])

Assembly: the one pipeline description of ``pipeline/assembly.py``, started
under the ``single`` placement with the ingest stage played by the Engine
itself -- the seven other stages in this process, stepped in pipeline order
by one ``StageLoop`` on a background thread::

    Engine.submit -> [tokenize] -> multimodal -> schedule -> forward -> constrain -> sample -> schedule
                                                    |
    Engine.wait  <-- [ingest] <------ detokenize <--+      (TextOutput routed by rid)

The Engine puts into the channel ingest's ``out`` door would feed (tokenize)
and reads the channel ingest would read. A router thread hands every
TextOutput / ErrorOutput to the queue of its request and keeps the latest
EngineStats and ProcessCounters. When no stage has work, the loop sleeps on a
waker shared by every inbox.

The caller's thread only builds messages and waits on its queue; it never
touches a stage.

Where the time of one engine step goes (CPU side; the GPU runs the model):

* schedule: plan decodes/prefills over the running list (O(requests)), flatten
  the batch into int lists (O(new tokens)); radix-tree work only on
  admission, chunk ends, finish and retraction;
* forward: pack the ints into one list, one pinned host->device copy, one
  Triton launch to write req_to_token, then the model (a CUDA-graph replay for
  decode batches up to --cuda-graph-max-bs: one launch);
* sample: two small pinned uploads (per-row parameters), the sampling kernel,
  then the step's single device->host synchronization;
* schedule again: append tokens, finish checks, one TokenOutputBatch.

The step is synchronous: the CPU prepares step N+1 after the tokens of step N
are on the host (no overlap yet), so at small batch sizes that CPU time adds
to each step's latency.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from typing import Any, Iterator

import msgspec

from pipeline.assembly import pipeline_spec
from pipeline.channel import ChannelClosed
from pipeline.config import ServerArgs, resolve
from pipeline.engine_media import MediaArgumentError, engine_media
from pipeline.launch import Pipeline
from pipeline.messages import (Abort, EngineStats, ErrorOutput, FlushCache, GenerateRequest, ProcessCounters,
                               SamplingParams, SamplingParamsError, TextOutput)
from pipeline.placement import played_by_caller, single

logger = logging.getLogger(__name__)

ROUTER_WAIT_S = 0.1


class GenerateError(ValueError):
    """The engine refused or failed a request; ``status_code`` as an HTTP server would send it."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.param = param


def sampling_params_from(params: dict[str, Any] | SamplingParams | None) -> SamplingParams:
    """A validated SamplingParams from a dict (SGLang names); SamplingParamsError on bad input."""
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    fields = set(SamplingParams.__struct_fields__)
    for key in params:
        if key not in fields:
            raise SamplingParamsError(key, "unknown sampling parameter", params[key])
    try:
        return msgspec.convert(params, SamplingParams)
    except msgspec.ValidationError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, SamplingParamsError):
            raise cause from None
        raise SamplingParamsError("sampling_params", str(exc), params) from None


class _Collector:
    """What the caller's thread waits on: every TextOutput of one request (all n sequences)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.queue: queue.Queue = queue.Queue()
        self.submitted_s = time.perf_counter()


class Engine:
    """Tokenize, schedule, forward, constrain, sample and detokenize, in this process."""

    def __init__(self, model_path: str | None = None, **server_args: Any) -> None:
        self.args = resolve(ServerArgs(model_path=model_path or "", **server_args))
        self._collectors: dict[str, _Collector] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.failure: str | None = None
        self.last_stats: EngineStats | None = None
        self.stats_by_engine: dict[int, EngineStats] = {}  # dp_rank (engine index) -> its latest snapshot
        self.stage_counters: dict[str, dict[str, float]] = {}  # stage -> counters, from the runner
        self.spec = pipeline_spec(self.args)
        placement = played_by_caller(single(self.spec), "ingest")
        self.pipeline = Pipeline(self.spec, placement, record_path=self.args.record_path,
                                 on_failure=self._on_failure).start()
        self.stages = {stage.name: stage for stage in self.pipeline.stages}
        self.schedule = self.stages.get("schedule")  # None with --dp-size > 1: replicas run in their processes
        self.requests = self.pipeline.entry("tokenize")  # what ingest's out door would feed
        self.outputs = self.pipeline.exit("ingest")  # what ingest would read
        self._router = threading.Thread(target=self._route_outputs, name="stagewise-engine-router", daemon=True)
        self._router.start()

    # ---------------------------------------------------------------- router
    def _route_outputs(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.outputs.get(timeout=ROUTER_WAIT_S)
            except TimeoutError:
                continue
            except ChannelClosed:
                return
            if isinstance(message, EngineStats):
                self.last_stats = message
                self.stats_by_engine[message.dp_rank] = message
                continue
            if isinstance(message, ProcessCounters):
                self.stage_counters.update(message.stages)
                continue
            key = message.parent_rid if isinstance(message, TextOutput) else message.rid
            with self._lock:
                collector = self._collectors.get(key) or self._collectors.get(message.rid.rsplit(".", 1)[0])
            if collector is not None:
                collector.queue.put(message)

    def _on_failure(self, reason: str) -> None:
        """The stage loop died: every waiting caller gets an error instead of waiting forever."""
        self.failure = reason
        self._fail_waiting(f"engine failed: {reason}", 500)

    def _fail_waiting(self, message: str, status_code: int) -> None:
        with self._lock:
            collectors = list(self._collectors.items())
        for rid, collector in collectors:
            collector.queue.put(ErrorOutput(rid=rid, status_code=status_code, message=message,
                                            error_type="internal_error"))

    # ------------------------------------------------------------------- API
    def submit(self, prompt: str | None = None, sampling_params: dict | SamplingParams | None = None,
               input_ids: list[int] | None = None, rid: str | None = None, stream: bool = False,
               image_data: Any = None, video_data: Any = None) -> str:
        """Queue one request; returns its rid (wait with ``wait`` / ``stream``).

        ``image_data`` / ``video_data`` (vision models): one image/video or a list, in
        the order of the prompt's placeholders (``pipeline/engine_media.py`` says what
        each may be).
        """
        if self.failure is not None:
            raise GenerateError(f"engine failed: {self.failure}", 500)
        if self._stop.is_set():
            raise GenerateError("the engine is shut down", 503)
        params = sampling_params_from(sampling_params)
        if (prompt is None) == (input_ids is None):
            raise GenerateError("give exactly one of prompt and input_ids", param="prompt")
        try:
            media = engine_media(image_data, video_data)
        except MediaArgumentError as error:
            raise GenerateError(str(error), param=error.param) from None
        rid = rid or uuid.uuid4().hex
        with self._lock:
            self._collectors[rid] = _Collector(params.n)
        self.requests.put(GenerateRequest(rid=rid, text=prompt, input_ids=input_ids, sampling=params,
                                          stream=stream, arrival_time_s=time.time(), media=media))
        return rid

    def abort(self, rid: str) -> None:
        """Stop a request (all its sequences) now; its result ends with finish_reason abort."""
        self.requests.put(Abort(rid=rid))

    def flush_cache(self) -> None:
        """Drop every radix-cache entry no running request holds (asynchronous, like abort)."""
        self.requests.put(FlushCache(request_id=uuid.uuid4().hex))

    def stream(self, rid: str, timeout: float | None = None) -> Iterator[TextOutput]:
        """TextOutputs of a submitted request as they come, until every sequence finished.

        A caller that stops early (closes the iterator, or its wait times out)
        aborts the request, so its KV is freed instead of generating for nobody.
        """
        with self._lock:
            collector = self._collectors[rid]
        remaining = collector.n
        failed = False
        try:
            while remaining:
                message = collector.queue.get(timeout=timeout)
                if isinstance(message, ErrorOutput):
                    failed = True
                    raise GenerateError(message.message, message.status_code, message.param)
                yield message
                if message.finish_reason is not None:
                    remaining -= 1
        finally:
            with self._lock:
                self._collectors.pop(rid, None)
            if remaining and not failed and not self._stop.is_set():
                try:
                    self.requests.put(Abort(rid=rid))
                except ChannelClosed:
                    pass

    def wait(self, rid: str, timeout: float | None = None) -> list[dict[str, Any]]:
        """Block until a submitted request ends; one result dict per sequence (index order)."""
        with self._lock:
            submitted_s = self._collectors[rid].submitted_s
        results: dict[int, dict[str, Any]] = {}
        for message in self.stream(rid, timeout):
            result = results.setdefault(message.index, _empty_result())
            _accumulate(result, message)
        latency_s = time.perf_counter() - submitted_s
        for result in results.values():
            result["meta_info"]["e2e_latency"] = latency_s
        return [results[i] for i in sorted(results)]

    def generate(self, prompt: str | list[str] | None = None,
                 sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None,
                 image_data: Any = None, video_data: Any = None) -> dict | list[dict]:
        """Generate for one prompt (a dict) or a batch (a list of dicts, one per sequence).

        Media of a batch: ``image_data`` / ``video_data`` as one entry per prompt
        (each what ``submit`` takes); of a single prompt: what ``submit`` takes.
        """
        prompts, ids, single = _normalize_inputs(prompt, input_ids)
        count = len(prompts) if prompts is not None else len(ids)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * count
        if len(params) != count:
            raise GenerateError(f"{len(params)} sampling_params for {count} prompts", param="sampling_params")
        checked = [sampling_params_from(p) for p in params]
        images = _per_prompt(image_data, count, single, "image_data")
        videos = _per_prompt(video_data, count, single, "video_data")
        rids = [self.submit(prompts[i] if prompts is not None else None, checked[i],
                            ids[i] if ids is not None else None, image_data=images[i], video_data=videos[i])
                for i in range(count)]
        results = list(itertools.chain.from_iterable(self.wait(rid) for rid in rids))
        return results[0] if single and len(results) == 1 else results

    def generate_stream(self, prompt: str | None = None, sampling_params: dict | None = None,
                        input_ids: list[int] | None = None) -> Iterator[dict[str, Any]]:
        """Chunks of one request: {"text", "output_ids", "finish_reason", "index", "meta_info"}."""
        rid = self.submit(prompt, sampling_params, input_ids, stream=True)
        for message in self.stream(rid):
            yield {"text": message.text_delta, "output_ids": list(message.token_ids_delta),
                   "index": message.index,
                   "finish_reason": _finish_dict(message.finish_reason),
                   "meta_info": {"prompt_tokens": message.prompt_tokens,
                                 "completion_tokens": message.completion_tokens,
                                 "cached_tokens": message.cached_tokens}}

    def check_integrity(self) -> None:
        """KV pool + radix cache bookkeeping adds up (call when idle)."""
        if self.schedule is None:
            raise RuntimeError("the schedule stages of --dp-size > 1 run in their own processes")
        self.schedule.check_integrity()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Finish what is in flight (up to ``timeout_s``), stop the loop, release the stages.

        After a failure (a stage loop or a process died) nothing will drain:
        stop at once, and report what stopping raised in the log, not to the
        caller, who already had the failure as the error of its requests.
        """
        if self._stop.is_set():
            return
        failed = self.failure is not None or self.pipeline.failure is not None
        try:
            self.pipeline.stop(2.0 if failed else timeout_s)
        except Exception as error:
            if not failed:
                raise
            logger.warning("stopping the failed engine: %s", error)
        finally:
            self._stop.set()
            self._router.join(timeout=5)
            self._fail_waiting("the engine shut down before the request finished", 503)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()


def _per_prompt(value: Any, count: int, single: bool, name: str) -> list[Any]:
    """A batch's media argument, one entry per prompt."""
    if value is None:
        return [None] * count
    if single:
        return [value]
    if not isinstance(value, list) or len(value) != count:
        raise GenerateError(f"a batch of {count} prompts needs a list of {count} entries", param=name)
    return value


def _normalize_inputs(prompt, input_ids) -> tuple[list[str] | None, list[list[int]] | None, bool]:
    if (prompt is None) == (input_ids is None):
        raise GenerateError("give exactly one of prompt and input_ids", param="prompt")
    if prompt is not None:
        return ([prompt], None, True) if isinstance(prompt, str) else (list(prompt), None, False)
    if input_ids and isinstance(input_ids[0], list):
        return None, [list(x) for x in input_ids], False
    return None, [list(input_ids)], True


def _empty_result() -> dict[str, Any]:
    return {"text": "", "output_ids": [], "finish_reason": None,
            "meta_info": {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}}


def _finish_dict(reason) -> dict[str, Any] | None:
    if reason is None:
        return None
    out: dict[str, Any] = {"type": reason.type, "matched": reason.matched}
    if reason.message:
        out["message"] = reason.message
    return out


def _accumulate(result: dict[str, Any], message: TextOutput) -> None:
    result["text"] += message.text_delta
    result["output_ids"].extend(message.token_ids_delta)
    meta = result["meta_info"]
    meta.update(prompt_tokens=message.prompt_tokens, completion_tokens=message.completion_tokens,
                cached_tokens=message.cached_tokens)
    if message.spec_verify_ct:  # speculative decoding: verify steps and accepted drafts so far
        meta.update(spec_verify_ct=message.spec_verify_ct, spec_accepted_tokens=message.spec_accepted_tokens)
    if message.token_logprobs:
        meta.setdefault("output_token_logprobs", []).extend(
            [lp, tid] for lp, tid in zip(message.token_logprobs, message.token_ids_delta))
    if message.top_logprobs:
        meta.setdefault("output_top_logprobs", []).extend(
            [list(zip(lps, ids)) for lps, ids in zip(message.top_logprobs, message.top_token_ids)])
    prompt = message.prompt_logprobs  # logprob_start_len >= 0: the prompt's, on the first output
    if prompt is not None:
        meta["input_token_logprobs"] = [[lp, tid] for lp, tid in zip(prompt.logprobs, prompt.token_ids)]
        meta["input_top_logprobs"] = [list(zip(lps, ids)) for lps, ids in zip(prompt.top_logprobs,
                                                                             prompt.top_token_ids)]
    if message.finish_reason is not None:
        result["finish_reason"] = _finish_dict(message.finish_reason)
