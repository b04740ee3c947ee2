"""The ``stagewise`` command: one subcommand per job, each in its own module.

A subcommand is listed here only once it works. Each entry maps the name to
``module:function``; the function takes the remaining argv and returns an exit
code. Modules are imported lazily so ``stagewise --help`` stays fast.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", one-line help)
    "generate": ("pipeline.generate:main", "generate text for one prompt with the in-process engine"),
    "serve": ("pipeline.serve:main", "serve a model over HTTP (OpenAI and SGLang-native APIs)"),
    "replay": ("pipeline.harness:replay_main", "replay one stage of a recorded run; exit 1 on a difference"),
    "router": ("pipeline.pd_router:router_main",
               "front end of prefill/decode engines started apart (--pd-disaggregation --prefill URL --decode URL)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        _print_usage()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    target, _ = SUBCOMMANDS[argv[0]]
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(argv[1:]) or 0)


def _print_usage() -> None:
    print("usage: stagewise <command> [flags]\n\ncommands:")
    for name, (_, summary) in SUBCOMMANDS.items():
        print(f"  {name:<10} {summary}")


if __name__ == "__main__":
    sys.exit(main())
