"""The multimodal stage: images and videos -> pixel patches, pad tokens and M-RoPE positions.

``stage.py`` (the stage), ``prepare.py`` (one request's job), ``processor.py``
(decode, smart resize, normalise, patchify), ``mrope.py`` (position ids),
``video.py`` (video files through PyAV).
"""
from stages.multimodal.stage import MultimodalOutboxes, MultimodalStage

__all__ = ["MultimodalOutboxes", "MultimodalStage"]
