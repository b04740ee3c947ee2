"""Output parsers the front end applies to generated text.

``tool_calls``: model-specific tool-call syntax -> OpenAI ``tool_calls``
(``--tool-call-parser``), plus ``tool_choice`` -> JSON schema for forced calls.
``reasoning``: ``<think>…</think>`` -> ``reasoning_content`` (``--reasoning-parser``).
Both parse whole outputs and text deltas with the same state machine.
"""
