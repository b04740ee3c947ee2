"""EBNF grammars (GBNF, as SGLang and llama.cpp write them) -> one regex for outlines-core.

SGLang takes a grammar as ``ebnf`` and vLLM as ``grammar``
(``structured_outputs.grammar``, ``guided_grammar``), in the GBNF notation::

    root    ::= answer " because " reason
    answer  ::= "yes" | "no"
    reason  ::= [a-z]+ ( " " [a-z]+ )*   # comments run to the end of the line

outlines-core compiles regular expressions only, so a grammar is accepted
when it describes a regular language in the plain way: no rule reaches
itself, directly or through other rules. Then every rule reference can be
replaced by the rule's own expression, starting from ``root``, and the
result is a single regex. A recursive grammar (balanced brackets, nested
JSON) is refused with ``EbnfError("recursive rules are not supported ...")``.

Supported notation: rules ``name ::= expression`` (a rule ends where the next
``name ::=`` starts); alternatives ``|``; sequences; groups ``( ... )``;
postfix ``?``, ``*``, ``+`` and ``{m}``, ``{m,}``, ``{m,n}``; string literals in
double or single quotes with the escapes ``\\n \\r \\t \\\\ \\" \\' \\xHH \\uHHHH
\\UHHHHHHHH``; character classes ``[a-z0-9_]`` and ``[^"\\\\]``; ``.`` for any
character; rule references; ``#`` comments.

Pure functions only: this module imports nothing from the rest of the project.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

MAX_REGEX_CHARS = 100_000  # inlining can grow a grammar exponentially (a ::= b b; b ::= c c; ...)

# Characters with a meaning in the Rust regex syntax outlines-core parses.
REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~")
_CLASS_META = frozenset("\\[]^-&~")
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "'": "'", "]": "]", "[": "[", "-": "-",
            "^": "^", "/": "/", "0": "\0"}
_HEX_LENGTHS = {"x": 2, "u": 4, "U": 8}


class EbnfError(ValueError):
    """The grammar cannot be turned into a regex; ``str(error)`` says why (for an HTTP 400)."""


def escape_literal(text: str) -> str:
    """``text`` as a regex matching exactly itself (Rust regex syntax)."""
    return "".join("\\" + char if char in REGEX_META else char for char in text)


# --------------------------------------------------------------------------- syntax tree


@dataclass(frozen=True)
class Literal:
    text: str


@dataclass(frozen=True)
class CharClass:
    regex: str  # already in regex syntax, brackets included


@dataclass(frozen=True)
class Ref:
    name: str


@dataclass(frozen=True)
class Seq:
    items: tuple["Node", ...]


@dataclass(frozen=True)
class Alt:
    options: tuple["Node", ...]


@dataclass(frozen=True)
class Repeat:
    item: "Node"
    suffix: str  # "?", "*", "+" or "{m,n}"


Node = Union[Literal, CharClass, Ref, Seq, Alt, Repeat]


# --------------------------------------------------------------------------- tokens

_TOKEN = re.compile(r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<define>::=)
  | (?P<name>[A-Za-z_][A-Za-z0-9_.-]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<cls>\[(?:[^\]\\]|\\.)*\])
  | (?P<brace>\{\s*\d+\s*(?:,\s*\d*\s*)?\})
  | (?P<op>[|()?*+.])
""", re.VERBOSE | re.DOTALL)


def _tokens(grammar: str) -> list[tuple[str, str]]:
    out, position = [], 0
    while position < len(grammar):
        match = _TOKEN.match(grammar, position)
        if match is None:
            line = grammar.count("\n", 0, position) + 1
            raise EbnfError(f"cannot read the grammar at line {line}: {grammar[position:position + 20]!r}")
        position = match.end()
        if match.lastgroup != "space":
            out.append((match.lastgroup, match.group()))
    return out


def _unescape(body: str, where: str) -> str:
    """The characters of a quoted literal's or a class's body, escapes resolved."""
    out, k = [], 0
    while k < len(body):
        char = body[k]
        if char != "\\":
            out.append(char)
            k += 1
            continue
        if k + 1 >= len(body):
            raise EbnfError(f"a backslash ends {where}")
        code = body[k + 1]
        if code in _HEX_LENGTHS:
            digits = body[k + 2:k + 2 + _HEX_LENGTHS[code]]
            if len(digits) != _HEX_LENGTHS[code] or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise EbnfError(f"bad \\{code} escape in {where}")
            out.append(chr(int(digits, 16)))
            k += 2 + len(digits)
        elif code in _ESCAPES:
            out.append(_ESCAPES[code])
            k += 2
        else:
            raise EbnfError(f"unknown escape \\{code} in {where}")
    return "".join(out)


def _char_class(token: str) -> CharClass:
    body = token[1:-1]
    negated = body.startswith("^")
    if negated:
        body = body[1:]
    chars = _class_chars(body, token)
    if not chars and not negated:
        raise EbnfError(f"empty character class {token}")
    parts = "".join("-" if is_range else ("\\" + c if c in _CLASS_META else c) for c, is_range in chars)
    return CharClass("[" + ("^" if negated else "") + parts + "]")


def _class_chars(body: str, token: str) -> list[tuple[str, bool]]:
    """(char, is_range_dash) pairs: an unescaped '-' between two chars is a range."""
    out: list[tuple[str, bool]] = []
    k = 0
    while k < len(body):
        if body[k] == "\\":
            length = 2 + _HEX_LENGTHS.get(body[k + 1:k + 2], 0)
            out.append((_unescape(body[k:k + length], token), False))
            k += length
        elif body[k] == "-" and out and k + 1 < len(body):
            out.append(("-", True))
            k += 1
        else:
            out.append((body[k], False))
            k += 1
    return out


# --------------------------------------------------------------------------- parser


class _Parser:
    """Recursive descent over one rule's tokens: alt := seq ('|' seq)*; seq := postfix*."""

    def __init__(self, tokens: list[tuple[str, str]], rule: str) -> None:
        self.tokens = tokens
        self.rule = rule
        self.k = 0

    def parse(self) -> Node:
        node = self.alt()
        if self.k != len(self.tokens):
            raise EbnfError(f"unexpected {self.tokens[self.k][1]!r} in rule {self.rule!r}")
        return node

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.k] if self.k < len(self.tokens) else None

    def alt(self) -> Node:
        options = [self.seq()]
        while self.peek() == ("op", "|"):
            self.k += 1
            options.append(self.seq())
        return options[0] if len(options) == 1 else Alt(tuple(options))

    def seq(self) -> Node:
        items = []
        while (token := self.peek()) is not None and token not in (("op", "|"), ("op", ")")):
            items.append(self.postfix())
        return items[0] if len(items) == 1 else Seq(tuple(items))

    def postfix(self) -> Node:
        node = self.atom()
        while (token := self.peek()) is not None and (token[0] == "brace" or token[1] in ("?", "*", "+")):
            self.k += 1
            node = Repeat(node, _brace(token[1], self.rule) if token[0] == "brace" else token[1])
        return node

    def atom(self) -> Node:
        kind, text = self.tokens[self.k]
        self.k += 1
        if kind == "string":
            return Literal(_unescape(text[1:-1], f"the literal {text}"))
        if kind == "cls":
            return _char_class(text)
        if kind == "name":
            return Ref(text)
        if (kind, text) == ("op", "."):
            return CharClass("(?s:.)")  # any character, newline included
        if (kind, text) == ("op", "("):
            node = self.alt()
            if self.peek() != ("op", ")"):
                raise EbnfError(f"a '(' is not closed in rule {self.rule!r}")
            self.k += 1
            return node
        raise EbnfError(f"unexpected {text!r} in rule {self.rule!r}")


def _brace(text: str, rule: str) -> str:
    numbers = [part.strip() for part in text[1:-1].split(",")]
    low = int(numbers[0])
    high = int(numbers[1]) if len(numbers) == 2 and numbers[1] else None
    if high is not None and high < low:
        raise EbnfError(f"repetition {text} in rule {rule!r} has max < min")
    return "{" + ",".join([str(low)] + ([] if len(numbers) == 1 else [str(high) if high is not None else ""])) + "}"


def parse_rules(grammar: str) -> dict[str, Node]:
    """Rule name -> expression tree. Raises EbnfError on a syntax error or a rule defined twice."""
    tokens = _tokens(grammar)
    starts = [k for k in range(len(tokens) - 1) if tokens[k][0] == "name" and tokens[k + 1][0] == "define"]
    if not starts or starts[0] != 0:
        raise EbnfError("a grammar is a list of rules 'name ::= expression'")
    rules: dict[str, Node] = {}
    for start, end in zip(starts, starts[1:] + [len(tokens)]):
        name = tokens[start][1]
        if name in rules:
            raise EbnfError(f"rule {name!r} is defined twice")
        body = tokens[start + 2:end]
        if any(kind == "define" for kind, _ in body):
            raise EbnfError(f"'::=' without a rule name in rule {name!r}")
        rules[name] = _Parser(body, name).parse()
    return rules


# --------------------------------------------------------------------------- regex


def _references(node: Node) -> list[str]:
    if isinstance(node, Ref):
        return [node.name]
    if isinstance(node, (Seq, Alt)):
        return [name for child in (node.items if isinstance(node, Seq) else node.options)
                for name in _references(child)]
    if isinstance(node, Repeat):
        return _references(node.item)
    return []


def check_not_recursive(rules: dict[str, Node], root: str) -> None:
    """Every rule reachable from ``root`` exists, and none reaches itself (depth-first, no recursion)."""
    done: set[str] = set()
    path: list[str] = []
    stack: list[tuple[str, list[str]]] = [(root, list(_references(rules[root])))]
    path.append(root)
    while stack:
        name, pending = stack[-1]
        if not pending:
            stack.pop()
            path.pop()
            done.add(name)
            continue
        child = pending.pop()
        if child not in rules:
            raise EbnfError(f"rule {name!r} refers to {child!r}, which is not defined")
        if child in path:
            cycle = " -> ".join(path[path.index(child):] + [child])
            raise EbnfError(f"recursive rules are not supported (the grammar must be regular): {cycle}")
        if child not in done:
            stack.append((child, list(_references(rules[child]))))
            path.append(child)


def _regex(node: Node, rules: dict[str, Node], memo: dict[str, str]) -> str:
    """The regex of one node; a result is grouped whenever a suffix or a sequence could split it."""
    if isinstance(node, Literal):
        return escape_literal(node.text)
    if isinstance(node, CharClass):
        return node.regex
    if isinstance(node, Ref):
        if node.name not in memo:
            memo[node.name] = _grouped(rules[node.name], rules, memo)
            if len(memo[node.name]) > MAX_REGEX_CHARS:
                raise EbnfError(f"the grammar expands to a regex of more than {MAX_REGEX_CHARS} characters")
        return memo[node.name]
    if isinstance(node, Seq):
        return "".join(_grouped(item, rules, memo) if isinstance(item, Alt) else _regex(item, rules, memo)
                       for item in node.items)
    if isinstance(node, Alt):
        return "(" + "|".join(_regex(option, rules, memo) for option in node.options) + ")"
    return _grouped(node.item, rules, memo) + node.suffix


def _grouped(node: Node, rules: dict[str, Node], memo: dict[str, str]) -> str:
    text = _regex(node, rules, memo)
    single = isinstance(node, CharClass) or (isinstance(node, Literal) and len(node.text) == 1)
    return text if single or isinstance(node, (Alt, Ref)) else "(" + text + ")"


def ebnf_to_regex(grammar: str, root: str = "root") -> str:
    """The regex matching exactly the strings of ``grammar`` (from rule ``root``); raises EbnfError."""
    if not grammar.strip():
        raise EbnfError("the grammar is empty")
    rules = parse_rules(grammar)
    if root not in rules:
        raise EbnfError(f"the grammar has no {root!r} rule")
    check_not_recursive(rules, root)
    regex = _regex(Ref(root), rules, {})
    if len(regex) > MAX_REGEX_CHARS:
        raise EbnfError(f"the grammar expands to a regex of more than {MAX_REGEX_CHARS} characters")
    return regex
