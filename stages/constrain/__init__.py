"""The constrain stage: structured output (JSON schema, regex, choices) as token bitmasks.

``vocab`` maps a tokenizer to the bytes of each token, ``grammar`` compiles
grammars (cached, off the engine loop) and tracks each request's state,
``bitmask`` defines the packed mask layout, ``stage`` is ``ConstrainStage``.
The stage class is imported lazily so the pure helpers (``response_format_to_sampling``)
load without the engine fabric.
"""
from __future__ import annotations

from typing import Any

from stages.constrain.grammar import (CompiledGrammar, GrammarCompiler, GrammarError, GrammarState, grammar_of_sampling,
                                      grammar_regex, response_format_to_sampling)
from stages.constrain.vocab import TokenVocab, build_token_vocab, vocab_for_tokenizer

__all__ = ["CompiledGrammar", "ConstrainStage", "GrammarCompiler", "GrammarError", "GrammarState", "TokenVocab",
           "build_token_vocab", "grammar_of_sampling", "grammar_regex", "response_format_to_sampling",
           "vocab_for_tokenizer"]


def __getattr__(name: str) -> Any:
    if name == "ConstrainStage":
        from stages.constrain.stage import ConstrainStage

        return ConstrainStage
    raise AttributeError(name)
