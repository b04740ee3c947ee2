"""Compile every kernel the kernel tests launch, for an H100, on a machine without a GPU.

Why: the CPU tests run the Triton kernels under ``TRITON_INTERPRET=1``, where a
``@triton.jit`` function is plain Python. The interpreter accepts code the compiler
refuses (an early ``return`` from a constexpr ``if`` followed by a return of another
dtype: "Inconsistent return types"; a ``tl.dot`` dimension under 16; ...), so such a
kernel passes every CPU test and fails on the GPU machine, where time is scarce. The GPU
machines run triton 3.6; this check compiles with the triton of the Python running it,
so run it from a triton 3.6 environment (see "Setup").

What: two phases, each in its own process.

1. Record. The given kernel test files run under pytest with ``TRITON_INTERPRET=1``.
   Every launch of an interpreted kernel (``kernel[grid](...)``) first goes through the
   binder a compiled ``JITFunction`` would use, for the target ``GPUTarget("cuda", 90,
   32)``: it gives the signature (``*fp16``, ``i32``, ``constexpr``...), the constexpr
   values (``1`` for an int argument equal to one), the attributes (16-byte divisibility
   of pointers and ints) and the options (``num_warps``, ``num_stages``, ``launch_pdl``...).
   Launches that give the same kernel variant count once. The launch then runs in the
   interpreter as before, so the tests behave as usual.
2. Compile. Without the interpreter, each recorded kernel is imported again (a real
   ``JITFunction``) and compiled with ``triton.compile(ASTSource(...), target=...)``
   through TTIR, TTGIR, LLIR and PTX to a cubin (``ptxas`` ships in the triton wheel), and
   its shared memory is checked against the H100's 227 KiB. Nothing is launched and no
   driver is needed.

One line per kernel variant: ``ok`` or ``FAIL`` with the compiler's message, then a
summary. The exit status is 1 when any variant fails (or a launch could not be recorded),
2 when the tests did not run (a file or test id not found, a collection error).
A kernel test that fails under the interpreter stops at its failing launch, so the
launches after it are not seen; the summary counts those tests.

Setup (once; the GPU machines have torch 2.11 + triton 3.6, and the triton 3.6
interpreter needs numpy < 2.4)::

    python3 -m venv /tmp/t36
    /tmp/t36/bin/pip install torch==2.13.0 triton==3.6.0 "numpy<2.4" pytest pytest-timeout \
        "transformers==5.17.*"

(torch only runs the tests on CPU here, from the local CPU wheel; its version does not
change what triton compiles. transformers: the references of test_norm and test_rotary.)

Not covered: kernels that only tests skipped on CPU launch (the Gluon GEMM of
``gemm_ws.py``, tests marked "needs CUDA") and kernels no given test file launches.

Usage::

    /tmp/t36/bin/python perf/compile_check.py                      # all of tests/kernels/
    /tmp/t36/bin/python perf/compile_check.py tests/kernels/test_quant_w8a8.py [...]
    /tmp/t36/bin/python perf/compile_check.py tests/kernels/test_gemm.py -- -k decode
    options: -v (whole compiler messages), -j N (compile N variants at once),
             --sass (what the machine code says: registers, spills, shared memory, loops)
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H100_SHARED_MEM = 232448  # bytes a block may opt in to on sm90 (227 KiB)


def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", 90, 32)


# ----------------------------------------------------------------------------------------
# Records: one per distinct kernel variant, written by phase 1 and read by phase 2.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FnRef:
    """A jit function passed as a constexpr, named so that phase 2 can import it."""
    module: str
    qualname: str


@dataclasses.dataclass
class Variant:
    module: str
    qualname: str
    signature: dict        # parameter name -> "*fp16", "i32", "constexpr", ...
    constexprs: dict       # path (a tuple) -> value
    attrs: dict            # path -> [["tt.divisibility", 16]]
    options: dict          # the backend's options (CUDAOptions fields)
    first_test: str        # the test that launched it first
    launches: int = 1
    record_error: str = ""  # set when the launch could not be turned into a variant

    @property
    def name(self) -> str:
        return f"{self.module}.{self.qualname}"

    def describe(self) -> str:
        """The kernel and what distinguishes this variant: pointer dtypes, constexprs, options."""
        parts = []
        for i, (arg, ty) in enumerate(self.signature.items()):
            if ty == "constexpr":
                continue
            divisible = ["tt.divisibility", 16] in self.attrs.get((i,), [])
            if isinstance(ty, str) and ty.startswith("*"):
                parts.append(f"{arg}:{ty}" + ("" if divisible else "(not 16B-aligned)"))
            else:
                parts.append(f"{arg}:{ty}" + ("%16" if divisible else ""))
        for path, value in self.constexprs.items():
            arg = list(self.signature)[path[0]] if path and path[0] < len(self.signature) else path
            parts.append(f"{arg}={_short(value)}")
        defaults = {"num_warps": 4, "num_stages": 3, "num_ctas": 1, "launch_pdl": False, "maxnreg": None}
        for key, default in defaults.items():
            if self.options.get(key, default) != default:
                parts.append(f"{key}={self.options[key]}")
        return f"{self.name}({', '.join(parts)})"


def _short(value) -> str:
    if isinstance(value, FnRef):
        return value.qualname
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."


# ----------------------------------------------------------------------------------------
# Phase 1: record the launches of the interpreted kernels (a pytest plugin).
# ----------------------------------------------------------------------------------------

class Recorder:
    """Pytest plugin: wraps ``InterpretedFunction.run`` to note each launch's variant."""

    def __init__(self, out: Path):
        self.out = out
        self.variants: dict[tuple, Variant] = {}
        self.current_test = "?"
        self.failed_tests: list[str] = []
        self._jit: dict = {}  # python function -> (JITFunction, binder)

    # -- pytest hooks --
    def pytest_configure(self, config):
        from triton.runtime.interpreter import InterpretedFunction
        original = InterpretedFunction.run
        recorder = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            if not warmup:
                recorder.record(fn_self, args, kwargs)
            return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run

    def pytest_runtest_setup(self, item):
        self.current_test = item.nodeid

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed_tests.append(report.nodeid)

    def pytest_sessionfinish(self, session, exitstatus):
        with open(self.out, "wb") as f:
            pickle.dump({"variants": list(self.variants.values()),
                         "failed_tests": sorted(set(self.failed_tests))}, f)

    # -- recording --
    def _binder(self, interpreted):
        """A real JITFunction for the interpreted one's Python function, and its binder for sm90."""
        fn = interpreted.fn
        if fn not in self._jit:
            from triton.compiler.compiler import make_backend
            from triton.runtime.jit import JITFunction, create_function_from_signature
            jit = JITFunction(fn, **interpreted.kwargs)
            backend = make_backend(_target())
            self._jit[fn] = (jit, backend, create_function_from_signature(jit.signature, jit.params, backend))
        return self._jit[fn]

    def record(self, interpreted, args, kwargs):
        """What ``JITFunction.run`` computes before it compiles, stored under its cache key."""
        from triton import knobs
        fn = interpreted.fn
        try:
            jit, backend, binder = self._binder(interpreted)
            kwargs = dict(kwargs)
            kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
            bound_args, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = jit._pack_args(
                backend, kwargs, bound_args, specialization, options)
            variant = Variant(fn.__module__, fn.__qualname__, signature,
                              {path: _portable(v) for path, v in constexprs.items()},
                              attrs, dict(options.__dict__), self.current_test)
            key = (variant.name, repr(signature), repr(variant.constexprs), repr(attrs),
                   repr(sorted(variant.options.items())))
        except Exception as e:  # a launch the compiled binder refuses is a finding too
            variant = Variant(fn.__module__, fn.__qualname__, {}, {}, {}, {}, self.current_test,
                              record_error=f"{type(e).__name__}: {e}")
            key = (variant.name, "record_error", variant.record_error)
        if key in self.variants:
            self.variants[key].launches += 1
        else:
            self.variants[key] = variant


def _portable(value):
    """A constexpr value that pickles and means the same in a process without the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction
    if isinstance(value, InterpretedFunction):
        return FnRef(value.fn.__module__, value.fn.__qualname__)
    if isinstance(value, tuple):
        return tuple(_portable(v) for v in value)
    return value


def record(files: list[str], pytest_args: list[str], out: Path) -> int:
    """Phase 1 (in its own process): run the tests under the interpreter, write the variants."""
    os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit runs
    sys.path.insert(0, str(ROOT))
    import pytest
    return pytest.main(["-q", "--tb=line", "-p", "no:cacheprovider", *files, *pytest_args],
                       plugins=[Recorder(out)])


# ----------------------------------------------------------------------------------------
# Phase 2: compile each variant for sm90.
# ----------------------------------------------------------------------------------------

def _resolve(module: str, qualname: str):
    """The compiled JITFunction named module.qualname (unwrapping autotune/heuristics)."""
    from triton.runtime.jit import JITFunction
    if "<locals>" in qualname:
        raise LookupError(f"{module}.{qualname} is defined inside a function: cannot import it")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
        obj = obj.fn
    if not isinstance(obj, JITFunction):
        raise LookupError(f"{module}.{qualname} is a {type(obj).__name__}, not a JITFunction")
    return obj


def _resolved(value):
    if isinstance(value, FnRef):
        return _resolve(value.module, value.qualname)
    if isinstance(value, tuple):
        return tuple(_resolved(v) for v in value)
    return value


def compile_variant(variant: Variant, sass: bool = False) -> tuple[str, str]:
    """('', SASS summary or '') when the variant compiles to a cubin that fits an H100, else
    (the reason, ''). ``sass``: summarise the machine code (perf/sass_stats.py)."""
    from triton.compiler import ASTSource, compile
    if variant.record_error:
        return "the launch could not be bound as the compiled kernel would: " + variant.record_error, ""
    jit = _resolve(variant.module, variant.qualname)
    constexprs = {path: _resolved(v) for path, v in variant.constexprs.items()}
    src = ASTSource(jit, variant.signature, constexprs, variant.attrs)
    try:
        kernel = compile(src, target=_target(), options=variant.options)
    except Exception as e:
        return _explain(e), ""
    if "cubin" not in kernel.asm:
        return "no cubin produced", ""
    if kernel.metadata.shared > H100_SHARED_MEM:
        return f"out of resources: shared memory {kernel.metadata.shared} > {H100_SHARED_MEM} bytes", ""
    if not sass:
        return "", ""
    from sass_stats import stats
    return "", stats(kernel.asm["cubin"], kernel.metadata.shared).describe()


def _explain(error: BaseException) -> str:
    """The chain of a compile error: each code line it passed through, then the root error.

    Triton raises a CompilationError at each call site on the way down (``at 35:14:`` and
    the source above a caret, lines counted from the jit function's ``def``) with the
    error of the callee as its cause; the innermost cause is the compiler's own message.
    """
    import traceback
    from triton.compiler.errors import CompilationError
    lines, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, CompilationError):
            where, *source = error.message.split("\n")
            caret = next((i for i, line in enumerate(source) if line.strip() == "^"), None)
            code = source[caret - 1].strip() if caret else ""
            lines.append(f"{where} {code}")
            if error.error_message:
                lines.append(error.error_message)
        elif lines and str(error) and str(error) in lines[-1]:
            pass  # the cause that a CompilationError above has already quoted
        else:
            frame = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
            at = f"  ({Path(frame[0].filename).name}:{frame[0].lineno}: {frame[0].line})" if frame else ""
            lines.append(f"{type(error).__name__}: {error}{at}")
        error = error.__cause__ or error.__context__
    return "\n".join(lines)


def _compile_one(variant: Variant, sass: bool = False) -> tuple[str, str]:
    try:
        return compile_variant(variant, sass)
    except Exception as e:  # import errors and the like
        return f"{type(e).__name__}: {e}", ""


def _excerpt(message: str, verbose: bool) -> str:
    """A compiler message cut to its location and its last lines (the error itself)."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if not verbose and len(lines) > 6:
        lines = lines[:1] + ["..."] + lines[-4:]
    return "\n".join("      " + line for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", help="kernel test files (default: tests/kernels/)")
    parser.add_argument("-v", "--verbose", action="store_true", help="whole compiler messages")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="variants compiled at once")
    parser.add_argument("--sass", action="store_true",
                        help="per variant: registers, spills, shared memory, each loop's instructions "
                             "and barriers (perf/sass_stats.py)")
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)  # phase 1, internal
    argv = sys.argv[1:] if argv is None else argv
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.record:
        return record(args.files, pytest_args, args.record)

    import triton
    os.environ.pop("TRITON_INTERPRET", None)
    print(f"triton {triton.__version__}, target {_target()}")
    files = args.files or [str(ROOT / "tests" / "kernels")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "variants.pkl"
        started = time.time()
        proc = subprocess.run([sys.executable, __file__, "--record", str(out), *files, "--", *pytest_args],
                              cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"})
        if proc.returncode not in (0, 1):  # pytest: 1 = tests failed (listed below); else not run
            print(f"recording failed: pytest exit status {proc.returncode} (a test file or id not "
                  "found, a collection error, or no tests selected)")
            return 2
        if not out.exists():
            print("recording failed: the tests did not run to the end")
            return 2
        with open(out, "rb") as f:
            recorded = pickle.load(f)
    variants = sorted(recorded["variants"], key=lambda v: (v.name, v.describe()))
    print(f"\nrecorded {len(variants)} kernel variants of "
          f"{len({v.name for v in variants})} kernels in {time.time() - started:.0f}s; compiling for sm90")

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "perf"))
    started = time.time()
    compile_one = functools.partial(_compile_one, sass=args.sass)
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(compile_one, variants))
    else:
        results = [compile_one(v) for v in variants]

    failed = []
    for variant, (error, summary) in zip(variants, results):
        print(f"{'ok  ' if not error else 'FAIL'} {variant.describe()}")
        if summary:
            print(f"      {summary}")
        if error:
            print(f"      first launched by {variant.first_test}")
            print(_excerpt(error, args.verbose))
            failed.append(variant)
    failing_kernels = sorted({v.name for v in failed})
    print(f"\n{len(variants) - len(failed)} of {len(variants)} variants compiled for sm90 "
          f"in {time.time() - started:.0f}s; {len(failing_kernels)} kernels fail"
          + (": " + ", ".join(failing_kernels) if failing_kernels else ""))
    if recorded["failed_tests"]:
        print(f"{len(recorded['failed_tests'])} tests failed under the interpreter "
              "(launches after the failure were not recorded):")
        for nodeid in recorded["failed_tests"]:
            print(f"  {nodeid}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
