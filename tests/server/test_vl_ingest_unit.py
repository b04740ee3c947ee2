"""Vision inputs at the edges, without a server: /generate's per-prompt media shapes, Ollama's base64
images, the multimodal metrics series and summary, and the --mm-cache-size range check."""
from __future__ import annotations

import asyncio
import base64

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from pipeline.config import ConfigError, ServerArgs, resolve
from pipeline.messages import ProcessCounters
from pipeline.metrics import PipelineCollector, multimodal_summary
from stages.forward.multimodal import MultimodalStats
from stages.ingest.errors import ApiError
from stages.ingest.media import base64_media, native_prompt_media

PNG = b"\x89PNG\r\n\x1a\n not really"
B64 = base64.b64encode(PNG).decode()


def media(image_data, video_data=None, num_prompts=1, batched=False):
    return asyncio.run(native_prompt_media(image_data, video_data, num_prompts, batched, ""))


def test_one_prompt_takes_a_reference_or_a_list():
    [[one]] = media(B64)
    assert (one.modality, one.data, one.param) == ("image", PNG, "image_data[0]")
    [items] = media([B64, "data:image/png;base64," + B64], [[B64, B64]])
    assert [(m.modality, m.param) for m in items] == [("image", "image_data[0]"), ("image", "image_data[1]"),
                                                      ("video", "video_data[0]")]
    assert items[2].frames == [PNG, PNG] and items[2].data == b""


def test_a_batch_takes_one_entry_per_prompt():
    first, second, third = media([B64, None, [B64, B64]], num_prompts=3, batched=True)
    assert [m.param for m in first] == ["image_data[0][0]"] and second == []
    assert [m.param for m in third] == ["image_data[2][0]", "image_data[2][1]"]
    with pytest.raises(ApiError) as caught:
        media([B64], num_prompts=2, batched=True)
    assert caught.value.status == 400 and caught.value.param == "image_data"
    with pytest.raises(ApiError) as caught:
        media([B64, "@@not base64"], num_prompts=2, batched=True)
    assert caught.value.param == "image_data[1][0]"
    with pytest.raises(ApiError) as caught:  # local files need --allowed-local-media-path
        media("/etc/hostname")
    assert "--allowed-local-media-path" in caught.value.message


def test_ollama_images_are_base64_only():
    assert base64_media(B64, "images[0]").data == PNG
    for bad in ("/etc/hostname", "", "not base64!", 7):
        with pytest.raises(ApiError) as caught:
            base64_media(bad, "messages[1].images[0]")
        assert caught.value.status == 400 and caught.value.param == "messages[1].images[0]"


def test_multimodal_counters_reach_metrics_and_the_summary():
    stats = MultimodalStats(images_encoded=3, videos_encoded=1, encode_s=0.5, cache_lookups=4, cache_hits=1)
    forward = {"steps": 9.0, **stats.as_counters()}
    collector = PipelineCollector()
    collector.update(ProcessCounters(process="engine_dp0", time_s=0.0, stages={"forward@dp0": forward}))
    collector.update(ProcessCounters(process="engine_dp1", time_s=0.0, stages={"forward@dp1": forward}))
    registry = CollectorRegistry()
    registry.register(collector)
    page = generate_latest(registry).decode()
    assert 'stagewise:mm_images_encoded_total{process="engine_dp0",stage="forward@dp0"} 3.0' in page
    assert 'stagewise:mm_cache_hit_rate{process="engine_dp1",stage="forward@dp1"} 0.25' in page
    assert 'stagewise:mm_encode_seconds_total{process="engine_dp0",stage="forward@dp0"} 0.5' in page
    summary = multimodal_summary({"forward@dp0": forward, "forward@dp1": forward, "schedule": {"steps": 1.0}})
    assert summary == {"mm_images_encoded": 6.0, "mm_videos_encoded": 2.0, "mm_encode_s": 1.0,
                       "mm_cache_lookups": 8.0, "mm_cache_hits": 2.0, "mm_cache_hit_rate": 0.25}


def test_a_text_model_has_no_multimodal_series():
    collector = PipelineCollector()
    collector.update(ProcessCounters(process="engine", time_s=0.0, stages={"forward": {"steps": 2.0}}))
    registry = CollectorRegistry()
    registry.register(collector)
    assert "mm_" not in generate_latest(registry).decode()
    assert multimodal_summary({"forward": {"steps": 2.0}}) is None


def test_negative_mm_cache_size_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--mm-cache-size"):
        resolve(ServerArgs(model_path=str(tmp_path), mm_cache_size=-1))
