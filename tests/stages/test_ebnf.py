"""EBNF (GBNF) grammars -> one regex: the notation SGLang's and vLLM's grammar requests use.

Each grammar's regex is checked with Python's ``re`` on strings it must and
must not match (the syntax we emit is shared by Rust's regex crate), and a
few go through outlines-core as the constrain stage compiles them.
"""
from __future__ import annotations

import re

import pytest

from stages.constrain.ebnf import MAX_REGEX_CHARS, EbnfError, ebnf_to_regex
from stages.constrain.grammar import GrammarError, grammar_regex

CAPITALS = """
root ::= city | description
city ::= "London" | "Paris" | "Berlin" | "Rome"
description ::= city " is " status
status ::= "the capital of " country
country ::= "England" | "France" | "Germany" | "Italy"
"""


def matches(grammar: str, text: str) -> bool:
    return re.fullmatch(ebnf_to_regex(grammar), text) is not None


@pytest.mark.parametrize("grammar,good,bad", [
    (CAPITALS, ["Paris", "Rome is the capital of Italy"], ["Madrid", "Paris is", "Rome is the capital of Spain"]),
    ('root ::= "yes" | "no"', ["yes", "no"], ["yesno", "", "maybe"]),
    ('root ::= "a" ("b" | "c")* "d"?', ["a", "abcb", "acd", "ad"], ["abd d", "b", "add"]),
    ('root ::= [a-z]+ ("-" [a-z]+)*', ["well", "well-met"], ["Well", "well-", "-met"]),
    ('root ::= "x"{2,3} [0-9]{2} "y"{1,}', ["xx12y", "xxx00yyy"], ["x12y", "xxxx12y", "xx1y", "xx12"]),
    (r'root ::= "\"" [^"\\]* "\""', ['"plain text"', '""'], ['"a"b"', 'a']),
    (r'root ::= "tab\there" "\x41" "\u00e9"', ["tab\there" + "A\u00e9"], ["tab here" + "A\u00e9"]),
    ('root ::= "a" . "c"', ["abc", "a\nc", "a.c"], ["ac", "abbc"]),
    ("root ::= 'single' [.*+?]", ["single.", "single+"], ["single", "singlex"]),
    ('root   ::=   part   # a comment\npart ::= "p" # another\n   "q"', ["pq"], ["p", "q"]),
    ('root ::= ("+" | "(" ")" | "$")+', ["+", "()$+"], ["(", ")"]),
    ('root ::= "" | "e"', ["", "e"], ["ee"]),
])
def test_regular_grammars_become_an_equal_regex(grammar, good, bad):
    for text in good:
        assert matches(grammar, text), (grammar, text)
    for text in bad:
        assert not matches(grammar, text), (grammar, text)


@pytest.mark.parametrize("grammar,words", [
    ('root ::= "(" root ")" | "x"', "recursive rules are not supported"),
    ('root ::= list\nlist ::= item ("," list)?\nitem ::= "i"', "recursive rules are not supported"),
    ('root ::= a\na ::= b\nb ::= "x" a', "a -> b -> a"),
    ('root ::= missing', "not defined"),
    ('start ::= "x"', "no 'root' rule"),
    ('root ::= "x"\nroot ::= "y"', "defined twice"),
    ('root ::= ("x"', "not closed"),
    ('root ::= "x" )', "unexpected"),
    (r'root ::= "\q"', "unknown escape"),
    ('root ::= "x"{3,1}', "max < min"),
    ('"x" ::= root', "a grammar is a list of rules"),
    ("", "empty"),
    ('root ::= "unterminated', "cannot read"),
    ("root ::= []", "empty character class"),
])
def test_bad_and_recursive_grammars_are_refused_with_the_reason(grammar, words):
    with pytest.raises(EbnfError, match=re.escape(words)):
        ebnf_to_regex(grammar)


def test_unused_recursive_rule_does_not_matter():
    assert matches('root ::= "ok"\nunused ::= "(" unused ")"', "ok")


def test_exponential_inlining_is_bounded():
    rules = ['root ::= r0'] + [f'r{i} ::= r{i + 1} r{i + 1} | "a"' for i in range(30)] + ['r30 ::= "z"']
    with pytest.raises(EbnfError, match=str(MAX_REGEX_CHARS)):
        ebnf_to_regex("\n".join(rules))


def test_constrain_stage_kind_ebnf_goes_through_the_converter():
    assert re.fullmatch(grammar_regex("ebnf", 'root ::= "on" | "off"'), "off")
    with pytest.raises(GrammarError, match="recursive rules are not supported"):
        grammar_regex("ebnf", 'root ::= "(" root ")"')


def test_outlines_core_compiles_the_regexes():
    import outlines_core
    vocabulary = outlines_core.Vocabulary(99, {c: [i] for i, c in enumerate('abcdexyz0123456789"\\ ,-()+$\n')})
    for grammar in (CAPITALS.replace("London", "abc"), r'root ::= "\"" [^"\\]* "\""', 'root ::= "a" . "c"',
                    'root ::= ("+" | "(" ")" | "$")+ [0-9]{2,3}'):
        outlines_core.Index(ebnf_to_regex(grammar), vocabulary)
