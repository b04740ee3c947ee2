"""Engine: the whole runtime in one process, behind a Python API.

::

    with Engine(model_path) as engine:          # None -> the bundled demo model
        out = engine.generate("To be, or not", {"max_new_tokens": 32, "temperature": 0})
        print(out["text"], out["meta_info"])

Assembly (the ``single`` placement): every stage in this process, joined by
in-thread channels and stepped in pipeline order by one loop on a background
thread::

    tokenize -> multimodal -> schedule -> forward -> constrain -> sample -> detokenize
       ^ requests (thread channel)                                           | TextOutput
       Engine.submit                                      Engine.wait <------+ (routed by rid)

A loop iteration steps each stage once; one engine step (schedule emits a
ForwardBatch, forward runs the model, sample picks tokens, schedule takes them)
therefore completes within one iteration. The loop then routes every
TextOutput / ErrorOutput to the queue of its request. When nothing moved and
no stage has work, the loop sleeps on the request channel.

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
from typing import Any, Iterator, Union

import msgspec

from pipeline.channel import in_thread_channel, thread_channel
from pipeline.config import ServerArgs, resolve
from pipeline.messages import (
    Abort, ConstrainInbox, DetokenizeInbox, EngineStats, ErrorOutput, ForwardInbox, GenerateRequest,
    IngestInbox, MultimodalInbox, SampleInbox, SamplingParams, SamplingParamsError, ScheduleInbox,
    TextOutput, TokenizedRequest, TokenizeInbox,
)

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.01
LOOP_CAPACITY = 1 << 16


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


class Engine:
    """Tokenize, schedule, forward, constrain, sample and detokenize, in this process."""

    def __init__(self, model_path: str | None = None, **server_args: Any) -> None:
        self.args = resolve(ServerArgs(model_path=model_path or "", **server_args))
        self._collectors: dict[str, _Collector] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.failure: BaseException | None = None
        self.last_stats: EngineStats | None = None
        self._build()
        self._thread = threading.Thread(target=self._loop, name="stagewise-engine", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- assembly
    def _build(self) -> None:
        from stages.forward import ForwardStage
        from stages.multimodal import MultimodalStage
        from stages.sample import SampleStage
        from stages.schedule import ScheduleStage
        from stages.tokenize import TokenizeStage, load_tokenizer
        from stages.detokenize import DetokenizeStage

        args = self.args
        self.tokenizer = load_tokenizer(args.tokenizer_path or args.model_path)
        self.requests = thread_channel("tokenize", TokenizeInbox, LOOP_CAPACITY)
        multimodal_in = in_thread_channel("multimodal", MultimodalInbox, LOOP_CAPACITY)
        schedule_in = in_thread_channel("schedule", ScheduleInbox, LOOP_CAPACITY)
        forward_in = in_thread_channel("forward", ForwardInbox, LOOP_CAPACITY)
        sample_in = in_thread_channel("sample", SampleInbox, LOOP_CAPACITY)
        constrain_in = in_thread_channel("constrain", ConstrainInbox, LOOP_CAPACITY)
        detokenize_in = in_thread_channel("detokenize", Union[DetokenizeInbox, TokenizedRequest], LOOP_CAPACITY)
        self.outputs = in_thread_channel("ingest", IngestInbox, LOOP_CAPACITY)

        forward = ForwardStage(args, forward_in, {"sample": sample_in})
        info = forward.model_info
        constrain = self._constrain_stage(constrain_in, sample_in, schedule_in, info)
        schedule_out = {"forward": forward_in, "detokenize": detokenize_in, "stats": self.outputs}
        if constrain is not None:
            schedule_out["constrain"] = constrain_in
        sample_out = {"schedule": schedule_in}
        if constrain is not None:
            sample_out["constrain"] = constrain_in
        self.schedule = ScheduleStage(args, info, schedule_in, schedule_out)
        self.forward = forward
        stages = [
            TokenizeStage(args, self.requests, {"out": multimodal_in, "errors": self.outputs,
                                                "detokenize": detokenize_in}, tokenizer=self.tokenizer),
            MultimodalStage(args, multimodal_in, {"out": schedule_in}),
            self.schedule, forward]
        if constrain is not None:
            stages.append(constrain)
        stages += [SampleStage(args, sample_in, sample_out),
                   DetokenizeStage(args, detokenize_in, {"out": self.outputs, "abort": schedule_in},
                                   tokenizer=self.tokenizer)]
        self.stages = stages

    def _constrain_stage(self, inbox, sample_in, schedule_in, info):
        try:
            from stages.constrain import ConstrainStage
        except ImportError as exc:  # outlines-core missing: structured output answers 400
            logger.warning("structured output disabled: %s", exc)
            return None
        return ConstrainStage(self.args, self.tokenizer, inbox, {"sample": sample_in, "schedule": schedule_in},
                              vocab_size=info.vocab_size, eos_token_ids=info.eos_token_ids)

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                moved = sum(stage.step() for stage in self.stages)
                moved += self._route_outputs()
                if moved == 0 and not any(stage.has_work() for stage in self.stages):
                    self.requests.wait_readable(IDLE_WAIT_S)
        except BaseException as exc:  # the engine is dead: every waiting caller must hear it
            logger.exception("engine loop failed")
            self.failure = exc
            self._fail_all(f"engine failed: {type(exc).__name__}: {exc}")

    def _route_outputs(self) -> int:
        messages = self.outputs.drain(LOOP_CAPACITY)
        for message in messages:
            if isinstance(message, EngineStats):
                self.last_stats = message
                continue
            key = message.parent_rid if isinstance(message, TextOutput) else message.rid
            with self._lock:
                collector = self._collectors.get(key) or self._collectors.get(message.rid.rsplit(".", 1)[0])
            if collector is not None:
                collector.queue.put(message)
        return len(messages)

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            collectors = list(self._collectors.items())
        for rid, collector in collectors:
            collector.queue.put(ErrorOutput(rid=rid, status_code=500, message=reason, error_type="internal_error"))

    # ------------------------------------------------------------------- API
    def submit(self, prompt: str | None = None, sampling_params: dict | SamplingParams | None = None,
               input_ids: list[int] | None = None, rid: str | None = None, stream: bool = False) -> str:
        """Queue one request; returns its rid (wait with ``wait`` / ``stream``)."""
        if self.failure is not None:
            raise GenerateError(f"engine failed: {self.failure}", 500)
        params = sampling_params_from(sampling_params)
        if (prompt is None) == (input_ids is None):
            raise GenerateError("give exactly one of prompt and input_ids", param="prompt")
        rid = rid or uuid.uuid4().hex
        with self._lock:
            self._collectors[rid] = _Collector(params.n)
        self.requests.put(GenerateRequest(rid=rid, text=prompt, input_ids=input_ids, sampling=params,
                                          stream=stream, arrival_time_s=time.time()))
        return rid

    def abort(self, rid: str) -> None:
        """Stop a request (all its sequences) now; its result ends with finish_reason abort."""
        self.requests.put(Abort(rid=rid))

    def stream(self, rid: str, timeout: float | None = None) -> Iterator[TextOutput]:
        """TextOutputs of a submitted request as they come, until every sequence finished."""
        with self._lock:
            collector = self._collectors[rid]
        remaining = collector.n
        try:
            while remaining:
                message = collector.queue.get(timeout=timeout)
                if isinstance(message, ErrorOutput):
                    raise GenerateError(message.message, message.status_code, message.param)
                yield message
                if message.finish_reason is not None:
                    remaining -= 1
        finally:
            with self._lock:
                self._collectors.pop(rid, None)

    def wait(self, rid: str, timeout: float | None = None) -> list[dict[str, Any]]:
        """Block until a submitted request ends; one result dict per sequence (index order)."""
        start_s = time.perf_counter()
        results: dict[int, dict[str, Any]] = {}
        for message in self.stream(rid, timeout):
            result = results.setdefault(message.index, _empty_result())
            _accumulate(result, message)
        latency_s = time.perf_counter() - start_s
        for result in results.values():
            result["meta_info"]["e2e_latency"] = latency_s
        return [results[i] for i in sorted(results)]

    def generate(self, prompt: str | list[str] | None = None,
                 sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None) -> dict | list[dict]:
        """Generate for one prompt (a dict) or a batch (a list of dicts, one per sequence)."""
        prompts, ids, single = _normalize_inputs(prompt, input_ids)
        count = len(prompts) if prompts is not None else len(ids)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * count
        if len(params) != count:
            raise GenerateError(f"{len(params)} sampling_params for {count} prompts", param="sampling_params")
        checked = [sampling_params_from(p) for p in params]
        rids = [self.submit(prompts[i] if prompts is not None else None, checked[i],
                            ids[i] if ids is not None else None) for i in range(count)]
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
        self.schedule.check_integrity()

    def shutdown(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=30)
        for stage in self.stages:
            try:
                stage.close()
            except Exception:  # closing is best effort; the engine is going away
                logger.exception("closing stage %s", stage.name)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()


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
    if message.token_logprobs:
        meta.setdefault("output_token_logprobs", []).extend(
            [lp, tid] for lp, tid in zip(message.token_logprobs, message.token_ids_delta))
    if message.top_logprobs:
        meta.setdefault("output_top_logprobs", []).extend(
            [list(zip(lps, ids)) for lps, ids in zip(message.top_logprobs, message.top_token_ids)])
    if message.finish_reason is not None:
        result["finish_reason"] = _finish_dict(message.finish_reason)
