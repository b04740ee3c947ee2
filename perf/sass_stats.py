"""What a compiled kernel's machine code says about its speed, read without a GPU.

``compile_check.py --sass`` compiles each kernel variant for an H100 (sm90) and hands
the cubin here. From the SASS (``cuobjdump``, shipped in the triton wheel) this module
reads what decides a memory-bound kernel's speed before any timing exists:

* registers per thread and stack/local memory (spills), from ``cuobjdump -res-usage``;
* shared memory per program (the compiler's metadata): with 227 KiB per SM, a
  program that takes 128 KiB runs alone on its SM, one or two warps groups to hide
  all of HBM's latency;
* each loop (a backward branch): its instruction count, its ``BAR.SYNC`` barriers
  (a layout conversion through shared memory, or a reduction, on every trip) and
  its most frequent opcodes (conversions such as ``F2F`` and ``PRMT`` are where
  dequantising kernels lose their time).

The count is of static instructions in the loop body: per trip, not per element.
Dividing by the elements a thread handles per trip gives instructions per weight
or per KV element, which ``perf/notes/quant.md`` compares with the issue rate an
H100 needs to keep up with HBM (~8.8 instructions per byte at 3.35 TB/s).
"""
from __future__ import annotations

import collections
import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path

_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z0-9_]+)(\.[A-Z0-9_.]+)?\s*(.*?);")
_BRANCH_TARGET = re.compile(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")


@dataclasses.dataclass
class Loop:
    instructions: int
    barriers: int
    top: list[tuple[str, int]]

    def describe(self) -> str:
        ops = " ".join(f"{op}:{n}" for op, n in self.top)
        return f"loop {self.instructions} instr, {self.barriers} BAR [{ops}]"


@dataclasses.dataclass
class SassStats:
    registers: int
    local_bytes: int
    shared_bytes: int
    loops: list[Loop]

    def describe(self) -> str:
        parts = [f"regs {self.registers}", f"smem {self.shared_bytes // 1024} KiB"]
        if self.local_bytes:
            parts.append(f"SPILLS {self.local_bytes} B stack/local")
        parts += [loop.describe() for loop in self.loops]
        return "; ".join(parts)


def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def _resources(text: str) -> tuple[int, int]:
    """(registers, bytes of per-thread stack and local memory: where spilled registers go)."""
    registers = re.search(r"REG:(\d+)", text)
    spilled = sum(int(m) for m in re.findall(r"(?:STACK|LOCAL):(\d+)", text))
    return int(registers.group(1)) if registers else -1, spilled


def loops_of(sass: str, top: int = 10) -> list[Loop]:
    """Every loop of the listing: a branch to an earlier address closes one, whose body is
    the instructions from the target to the branch. Nested loops are listed on their own."""
    rows = []   # (address, opcode)
    for line in sass.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            rows.append((int(match.group(1), 16), match.group(2), line))
    loops = []
    for i, (address, opcode, line) in enumerate(rows):
        if opcode != "BRA":
            continue
        target = _BRANCH_TARGET.search(line)
        if not target or target.group(1) is None:
            continue
        start = int(target.group(1), 16)
        if start >= address:
            continue
        body = [op for a, op, _ in rows[:i + 1] if start <= a <= address]
        counts = collections.Counter(body)
        loops.append(Loop(len(body), counts.get("BAR", 0), counts.most_common(top)))
    return loops


def stats(cubin: bytes, shared_bytes: int) -> SassStats:
    registers, local = _resources(_cuobjdump(cubin, "-res-usage"))
    return SassStats(registers, local, shared_bytes, loops_of(_cuobjdump(cubin, "-sass")))
