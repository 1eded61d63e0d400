"""The static GPU model: what every launch costs on an L4, A10, A100 or H100, read off the compiled code, no GPU.

Why: GPU time is rare here, and a kernel that does not fit a target (``OutOfResources``), spills, or spends more
instructions per element than the device can issue at its bandwidth is visible in the compiled code alone.
Triton compiles for any target on a CPU machine and its wheel ships ``ptxas`` and ``nvdisasm``.

How it works
------------
* **The real launchers, not a copy of their heuristics.** Each workload builds a seed model on the ``meta``
  device and runs the sampler's own step code (``_StepRunner.forward`` / ``.sample`` of the diffusion sampler,
  ``_Decode.prefill`` / ``.step`` of the AR one, or ``fused_step`` alone) under
  :func:`dinfill.target.static_target`, so every launcher picks its configuration for that target. A
  :class:`Recorder` intercepts each Triton launch (``JITFunction.run``), compiles it through Triton's own
  launch path for the target (a stand-in driver answers "which GPU"), and records the grid and the bound
  arguments; a ``TorchDispatchMode`` records the aten ops (cuBLAS GEMMs and small glue kernels).
* **Per compiled kernel and target** (:func:`analyse`): shared memory and the target's per-block limit,
  registers and spill bytes (``ptxas -v`` on the kernel's own PTX), resident blocks per SM, and every loop of
  the SASS: its source line (line info), the instructions of its body, the instructions on its shortest path
  (rare branches skipped), and the bytes its global loads bring per iteration. Loops whose load line carries
  a ``# static: <tag>`` comment are the kernel's streaming loops; for them ``per_elem`` = body instructions /
  elements one thread loads per iteration, the number the issue budget (:meth:`Target.issue_budget`) is for.
* **Predicted time of a launch** = ``max(bytes / bandwidth, issue time, FLOPs / peak) + launch cost``:
  bytes and FLOPs from a per-kernel work model (:data:`WORK_MODELS`; GEMMs from their shapes), bandwidth
  scaled by the SMs the grid can occupy, the issue time from the measured per-element instruction counts of
  the streaming loops (``elements x instructions / (32 x SMs x 4 x clock)``), cuBLAS at
  :data:`GEMM_EFFICIENCY` of the bf16 peak and :data:`GEMV_BW_EFFICIENCY` of the bandwidth, and
  :data:`LAUNCH_S` per kernel (a CUDA-graph replay). Sums per forward, per diffusion step and per problem of
  the published setting are printed beside the floor (weights and activations read once, or FLOPs at peak).

What it is not: a simulator. Latency, caches, bank conflicts and the memory system are not modelled; the
numbers are ceilings and floors to compare with ``gpu_check``'s measurements, which print both side by side.
Compiled kernels are cached by Triton (``~/.triton/cache``) and the SASS analysis in
``~/.cache/dinfill/static`` (``DINFILL_STATIC_CACHE``), so a re-run takes seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import linecache
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dinfill.bench.forward import NO_KERNEL
from dinfill.target import Target, lookup, static_target

__all__ = [
    "ARCHS",
    "Recorder",
    "KernelInfo",
    "Loop",
    "Launch",
    "Workload",
    "analyse",
    "workloads",
    "run_workload",
    "predict",
    "evaluate",
    "check_rules",
    "main",
    "MODES",
]

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")  # the targets of the fit rules (A100, A10, L4, H100)
SMEM_MARGIN = 8 * 1024  # shared memory a launch must leave free below the per-block limit
LAUNCH_S = 1.3e-6  # per kernel in a CUDA-graph replay (issue 18; gpu_check calibrates it)
GEMM_EFFICIENCY = 0.7  # cuBLAS bf16 GEMMs: fraction of the (measured) tensor peak they reach at these shapes
GEMV_BW_EFFICIENCY = 0.85  # cuBLAS GEMV-like products (few rows): fraction of the stream bandwidth
ELEMENTWISE_BW_EFFICIENCY = 0.8  # small aten kernels (copies, gathers, comparisons)
BUDGET_PUBLISHED = 20.0  # fused_step pass 1 and the sample scan, published preset, sm_90 (issue 18)
BUDGET_GREEDY = 10.0  # fused_step greedy pass 1
FLOOR_RATIO = 1.5  # predicted batch-1 forward of the 0.5B shape / its weight-read floor
DECODE_BW_FRACTION = 0.5  # batch-1 decode attention at DECODE_KEYS keys: predicted fraction of the bandwidth
DECODE_KEYS = 1152

SEED_MODELS = ("open-dcoder-0.5b", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "deepseek-coder-1.3b", "starcoder2-3b")
BATCHES = (1, 8, 32)
LENGTHS = (64, 276, 608)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # the matrix: bf16 and fp16
STEP_PRESETS = {  # fused_step settings per name: every alg / preset a diffusion step can launch
    "greedy": dict(select="p2", temperature=0.0),
    "published": dict(select="p2", temperature=0.6, top_p=0.95),
    "fast": dict(select="threshold", temperature=0.6, top_p=0.95, threshold=0.9),
    "maskgit": dict(select="topk", temperature=0.6, top_p=0.95, alg_temp=0.5),
    "origin": dict(select="bernoulli", temperature=0.6, top_p=0.95),
    "entropy-topk": dict(select="topk", temperature=0.6, top_k=50, confidence="neg_entropy"),
    "margin-topk": dict(select="topk", temperature=0.6, top_k=50, confidence="margin"),
}
MODES = ("full", "window", "prefill", "decode", "decode-gemv", "step", "forward", "forward-decode", "forward-pdl")
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-7T]\s+)?([A-Z0-9_.]+)([^;]*);")
_FILE_LINE = re.compile(r'File "([^"]+)", line (\d+)')
_TAG = re.compile(r"#\s*static:\s*([\w-]+)")
_ANALYSIS_VERSION = 6  # in the kernel-analysis cache key: bump when analyse() changes
_RECORD_VERSION = 8  # in the recorded-workload cache key: bump when Recorder or WORK_MODELS change


# --------------------------------------------------------------------------------------------------
# compiling for a target without a GPU
# --------------------------------------------------------------------------------------------------


class _StandInDriver:
    """Answers Triton's "which device, stream and target" questions for a GPU that is not there."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 10_000 + self.arch  # one kernel cache per architecture inside each JITFunction

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")


@contextlib.contextmanager
def _driver_for(target: Target) -> Iterator[None]:
    from triton.runtime.driver import driver

    driver.set_active(_StandInDriver(target.arch))
    try:
        yield
    finally:
        driver._active = None  # the next use re-creates the real one (or fails as it would have without us)


def _nvidia_bin(tool: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    if not path.exists():
        raise RuntimeError(f"static GPU model: {path} is missing; this triton wheel has no NVIDIA tools")
    return str(path)


def nvidia_backend_available() -> bool:
    """True when the installed triton can compile for NVIDIA GPUs (its wheel ships ptxas / nvdisasm)."""
    try:
        import importlib

        return "nvidia" in importlib.import_module("triton.backends").backends and bool(_nvidia_bin("nvdisasm"))
    except Exception:
        return False


# --------------------------------------------------------------------------------------------------
# one compiled kernel: resources and SASS loops
# --------------------------------------------------------------------------------------------------


@dataclass
class Loop:
    """One loop of a kernel's SASS (a backward branch and the instructions it repeats).

    ``body`` counts every instruction between the loop head and its back-edge (each branch taken into
    account once: the issue count of an iteration whose every rare path runs); ``fast`` the instructions on
    the shortest path through one iteration (forward branches taken where they skip code). ``bytes`` are
    loaded per thread per iteration by the loop's global loads; ``elems`` = bytes / element size of the
    stream; ``per_elem`` = body / elems (``fast_per_elem`` likewise).
    """

    tag: str | None
    line: str
    start: int
    body: int
    fast: int
    loads: int
    bytes: int
    elems: float = 0.0
    sources: list[tuple[str, int]] = field(default_factory=list, repr=False)  # (file, line) of its instructions
    edge_sources: list[tuple[str, int]] = field(default_factory=list, repr=False)  # of its head and back edge
    inside: list[int] = field(default_factory=list, repr=False)  # indices of the loops nested in this one

    @property
    def per_elem(self) -> float | None:
        return self.body / self.elems if self.elems else None

    @property
    def fast_per_elem(self) -> float | None:
        return self.fast / self.elems if self.elems else None


@dataclass
class KernelInfo:
    """Resources and loops of one compiled kernel on one target."""

    name: str
    key: str
    arch: int
    target: str
    shared: int
    smem_limit: int
    regs: int
    spill_bytes: int
    num_warps: int
    resident: int
    itemsize: int
    loops: list[Loop] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.shared <= self.smem_limit - SMEM_MARGIN and self.resident > 0

    def stream_loops(self) -> list[Loop]:
        """The tagged loops (``# static: <tag>`` on their load line)."""
        return [lp for lp in self.loops if lp.tag]

    def loop(self, tag: str) -> Loop | None:
        """The tagged loop with the most instructions per element (a tag may be inlined in several places)."""
        found = [lp for lp in self.loops if lp.tag == tag and lp.elems]
        return max(found, key=lambda lp: lp.per_elem, default=None)

    @classmethod
    def from_row(cls, raw: dict) -> KernelInfo:
        """The inverse of :meth:`row` (loops tagged again from the current sources)."""
        loops = [Loop(**{k: v for k, v in lp.items() if k in Loop.__dataclass_fields__}) for lp in raw["loops"]]
        for lp in loops:
            lp.sources = [tuple(x) for x in lp.sources]
            lp.edge_sources = [tuple(x) for x in lp.edge_sources]
        fields = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__ and k != "loops"}
        return cls(**fields, loops=tag_loops(loops))

    def row(self) -> dict:
        d = dataclasses.asdict(self)
        d["loops"] = [dict(dataclasses.asdict(lp), per_elem=lp.per_elem, fast_per_elem=lp.fast_per_elem)
                      for lp in self.loops]  # fmt: skip
        return d


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "dinfill" / "static"
    path = Path(os.environ.get("DINFILL_STATIC_CACHE") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], data: bytes | str, suffix: str) -> subprocess.CompletedProcess:
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        return subprocess.run([*cmd, f.name], capture_output=True, text=True, check=False)


def _ptxas_resources(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill store bytes) of a kernel's PTX as ``ptxas -v`` reports them for ``sm_<arch>``."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    from triton.backends.nvidia.compiler import get_ptxas  # the ptxas Triton itself uses for this architecture

    out = _run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", "-o", os.devnull], ptx, ".ptx")
    if out.returncode:
        raise RuntimeError(f"ptxas failed for sm_{arch}: {out.stderr[-500:]}")
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores", out.stderr)
    return int(regs.group(1)) if regs else 0, int(spills.group(1)) if spills else 0


def _disassemble(cubin: bytes) -> list[tuple[int, str, str, list[tuple[str, int]], bool]]:
    """SASS of a cubin as (address, opcode, operands, source lines (innermost first), predicated).

    Branch targets are rewritten from nvdisasm's labels (``.L_x_3``) to hexadecimal addresses.
    """
    out = _run([_nvidia_bin("nvdisasm"), "-gi", "-c"], cubin, ".cubin")
    if out.returncode:
        raise RuntimeError(f"nvdisasm failed: {out.stderr[-500:]}")
    ins, where, labels, pending = [], [], {}, []
    for line in out.stdout.splitlines():
        stripped = line.strip()
        if stripped.startswith("//##"):
            where = [(f, int(n)) for f, n in _FILE_LINE.findall(line)]
            continue
        label = re.match(r"^(\.L_x_\d+):", stripped)
        if label:
            pending.append(label.group(1))
            continue
        m = _LINE.search(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            ins.append((addr, m.group(3), m.group(4), where, m.group(2) is not None))
    resolve = lambda rest: re.sub(r"`?\(?(\.L_x_\d+)\)?", lambda g: hex(labels.get(g.group(1), 0)), rest)
    return [(a, op, resolve(rest) if op.startswith("BRA") else rest, w, p) for a, op, rest, w, p in ins]


def _tag_of(where: list[tuple[str, int]]) -> str | None:
    for path, lineno in where:
        m = _TAG.search(linecache.getline(path, lineno))
        if m:
            return m.group(1)
    return None


def _load_bytes(opcode: str) -> int:
    """Bytes one thread loads with a global load of this opcode (``LDG.E.128`` = 16)."""
    for width, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if width in opcode:
            return size
    return 4


def _branch_target(op: str, rest: str) -> int | None:
    if not op.startswith("BRA"):
        return None
    m = re.search(r"0x([0-9a-f]+)", rest)
    return int(m.group(1), 16) if m else None


def _blocks(ins: list[tuple]) -> tuple[list[list[tuple]], dict[int, list[int]]]:
    """Basic blocks of a disassembly and the successors of each (by block index)."""
    addrs = {x[0] for x in ins}
    leaders = {ins[0][0]} if ins else set()
    for k, (_addr, op, rest, _w, _p) in enumerate(ins):
        target = _branch_target(op, rest)
        if target is not None and target in addrs:
            leaders.add(target)
        if (target is not None or op.startswith(("EXIT", "RET", "BRX", "JMX"))) and k + 1 < len(ins):
            leaders.add(ins[k + 1][0])
    blocks: list[list[tuple]] = []
    for x in ins:
        if x[0] in leaders or not blocks:
            blocks.append([])
        blocks[-1].append(x)
    start = {b[0][0]: n for n, b in enumerate(blocks)}
    succ: dict[int, list[int]] = {}
    for n, b in enumerate(blocks):
        addr, op, rest, _w, predicated = b[-1]
        out = []
        target = _branch_target(op, rest)
        if target is not None and target in start:
            out.append(start[target])
        # a branch is conditional when guarded (``@P0 BRA``) or when it names a condition operand before its
        # target (``BRA P0, ...``, ``BRA.U !UP0, ...``, ``BRA.DIV ~URZ, ...``: taken only if the warp diverged)
        conditional = predicated or (op.startswith("BRA") and "," in rest)
        ends = op.startswith(("EXIT", "RET", "BRX", "JMX")) or (op.startswith("BRA") and not conditional)
        if (not ends or conditional) and n + 1 < len(blocks):
            out.append(n + 1)
        succ[n] = out
    return blocks, succ


def sass_loops(ins: list[tuple]) -> list[Loop]:
    """Every loop of a disassembly, in address order; see :class:`Loop`. Tagged by :func:`tag_loops`.

    A loop is a backward branch (tail -> head) and the blocks laid out between them that reach the tail
    without passing the head: code ptxas placed inside the range but off the loop (another path's blocks) is
    not counted, nor is a rotated loop's entry path before the head.
    """
    if not ins:
        return []
    blocks, succ = _blocks(ins)
    pred: dict[int, list[int]] = {n: [] for n in succ}
    for n, out in succ.items():
        for m in out:
            pred[m].append(n)
    found = []
    for tail, out in succ.items():
        for head in out:
            if blocks[head][0][0] > blocks[tail][-1][0]:
                continue  # a forward edge
            members, todo, closed = {tail}, [tail], head == tail
            while todo:  # blocks laid out between head and tail that reach the tail without passing the head
                for q in pred[todo.pop()]:
                    if q == head:
                        closed = True
                    elif q not in members and head < q < tail:
                        members.add(q)
                        todo.append(q)
            if not closed:
                continue  # a backward jump that never comes back (an exit path placed earlier): no loop
            if head == tail and len(blocks[head]) == 1:
                continue  # ``BRA`` to itself after the final ``EXIT``: padding, never executed
            members.add(head)
            body = [x for n in sorted(members) for x in blocks[n]]
            loads = [x for x in body if x[1].startswith("LDG") and ".STRONG" not in x[1]]
            first = loads[0][3] if loads else body[0][3]
            line = f"{Path(first[0][0]).name}:{first[0][1]}" if first else "?"
            sources = sorted({(f, n) for x in body for f, n in x[3]})
            loop = Loop(None, line, blocks[head][0][0], len(body), _shortest(blocks, succ, members, head, tail),
                        len(loads), sum(_load_bytes(x[1]) for x in loads), sources=sources)  # fmt: skip
            loop.edge_sources = sorted(set(blocks[tail][-1][3]) | set(blocks[head][0][3]))
            found.append((loop, frozenset(members)))
    found.sort(key=lambda f: f[0].start)
    for loop, members in found:
        loop.inside = [k for k, (other, om) in enumerate(found) if om < members]
    return tag_loops([f[0] for f in found])


def _shortest(blocks, succ, members: set[int], head: int, tail: int) -> int:
    """Instructions on the shortest path through one iteration: from the loop head to the end of ``tail``."""
    dist = {head: len(blocks[head])}
    todo = [head]
    while todo:  # blocks form a DAG once the back edges are ignored; relax in address order
        todo.sort()
        n = todo.pop(0)
        for m in succ[n]:
            if m not in members or m == head or m <= n:
                continue
            d = dist[n] + len(blocks[m])
            if d < dist.get(m, math.inf):
                dist[m] = d
                todo.append(m)
    return int(dist.get(tail, sum(len(blocks[n]) for n in members)))


def tag_loops(loops: list[Loop]) -> list[Loop]:
    """Tag each loop by the ``# static: <tag>`` comment of the source line it comes from.

    Line info is per instruction, and ptxas moves a load's address arithmetic away from the load, so the tag
    sits on the loop statement itself (``for ...:  # static: pass-1``, or the call of a helper whose loop it
    is, since Triton 3.9 keeps only the call's line for inlined helpers): a loop carries the tags of its head
    and back-edge instructions' lines (of any of its instructions if those have none). A tag belongs to the
    innermost loops that carry it. Tags are read from the source each time (the analysis cache keeps lines).
    """
    own = []
    for lp in loops:
        tags = {t for f, n in lp.edge_sources if (t := _tag_of([(f, n)]))}
        own.append(tags or {t for f, n in lp.sources if (t := _tag_of([(f, n)]))})
    for lp, tags in zip(loops, own, strict=True):
        inner = set().union(*(own[k] for k in lp.inside)) if lp.inside else set()
        rest = sorted(tags - inner)
        lp.tag = rest[0] if rest else None
    return loops


def analyse(kernel, target: Target, itemsize: int) -> KernelInfo:
    """Resources and loops of a compiled Triton kernel (a ``CompiledKernel``) on ``target``, cached on disk."""
    cubin = kernel.asm["cubin"]
    meta = kernel.metadata
    key = hashlib.sha256(cubin).hexdigest()[:24]
    path = _cache_dir() / f"{key}-{itemsize}-v{_ANALYSIS_VERSION}.json"
    name = getattr(meta, "name", "kernel")
    if path.exists():
        try:
            info = KernelInfo.from_row(json.loads(path.read_text()))
            return dataclasses.replace(info, target=target.name, smem_limit=target.smem_per_block,
                                       resident=target.resident_blocks(32 * info.num_warps, info.regs, info.shared))
        except (OSError, ValueError, TypeError, KeyError):
            pass  # a stale or foreign cache entry: analyse again
    regs, spills = _ptxas_resources(kernel.asm["ptx"], target.arch)
    loops = sass_loops(_disassemble(cubin))
    for lp in loops:
        lp.elems = lp.bytes / itemsize
    warps = meta.num_warps
    info = KernelInfo(name, key, target.arch, target.name, meta.shared, target.smem_per_block, regs, spills, warps,
                      target.resident_blocks(32 * warps, regs, meta.shared), itemsize, loops)  # fmt: skip
    with contextlib.suppress(OSError):
        path.write_text(json.dumps(info.row()))
    return info


# --------------------------------------------------------------------------------------------------
# recording the launches of real code
# --------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One device op of a workload: a Triton launch (with its compiled kernel) or an aten op."""

    op: str
    kind: str  # "triton", "gemm" or "aten"
    grid: tuple[int, int, int] = (1, 1, 1)
    info: KernelInfo | None = None
    bytes: float = 0.0
    flops: float = 0.0
    streams: dict[str, float] = field(default_factory=dict)  # loop tag -> elements streamed through it
    note: str = ""
    scalars: dict[str, int | float] = field(default_factory=dict)  # the launch's int / float arguments
    pdl: bool = False  # launched with programmatic dependent launch (DINFILL_PDL=1)

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _itemsize_of(name: str, args: dict[str, Any]) -> int:
    """Element size of the kernel's main stream (the first floating-point tensor argument)."""
    for v in args.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.element_size()
    return 2


# Work models: bytes / FLOPs / streamed elements of a launch from its bound arguments (what the kernel must move,
# not what a tensor argument's storage spans: caches and workspaces are larger than what a launch touches).
def _work_fused_rows(a: dict, grid) -> tuple[float, float, dict]:
    logits = a["logits_ptr"]
    n_rows = grid[0] // max(1, int(a["C"]))
    elems = n_rows * int(a["V"])
    streams = {"pass-1": elems, "pass-1a": elems}
    if a.get("TEMP_MODE", 0):
        streams["scan"] = n_rows * int(a["CHUNK"]) / 2  # the finisher re-reads half a chunk on average
    return elems * logits.element_size() + 64.0 * n_rows, 0.0, streams


def _work_attention(a: dict, grid) -> tuple[float, float, dict]:
    q, k = a["Q"], a["K"]
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], int(a["L_k"])
    keys = Lk / 2 if a.get("CAUSAL") and Lq == Lk else Lk
    kv = 2 * B * Hkv * Lk * D * k.element_size()
    partials = _nbytes(a["O_PART"]) + _nbytes(a["LSE_PART"]) if a.get("SPLIT") else 0  # fp32, read by the merge
    return kv + 2 * _nbytes(q) + partials, 4.0 * B * Hq * Lq * keys * D, {}


def _work_add_norm(a: dict, grid) -> tuple[float, float, dict]:
    rows, H = int(a["n_rows"]), int(a["H"])
    item = a["Y"].element_size()
    tiles = 1 + bool(a.get("HAS_DELTA")) + bool(a.get("STORE_RESIDUAL")) + 1  # x (+ delta) -> (residual) + y
    return rows * H * item * tiles, 0.0, {}


def _work_rope(a: dict, grid) -> tuple[float, float, dict]:
    qkv = a["QKV"]
    T = int(a["n_tokens"])
    width = (int(a["HQ"]) + 2 * int(a["HKV"])) * 2 * int(a["HALF"])
    return 2.0 * T * width * qkv.element_size(), 0.0, {}


def _work_activation(a: dict, grid) -> tuple[float, float, dict]:
    rows, inner = int(a["n_rows"]), int(a["inner"])
    return 3.0 * rows * inner * a["OUT"].element_size(), 0.0, {}


def _work_skinny(a: dict, grid) -> tuple[float, float, dict]:
    M, N, K = int(a["M"]), int(a["N"]), int(a["K"])
    item = a["W"].element_size()
    return (N * K + M * K + M * N * (2 if a.get("HAS_RES") else 1)) * item, 2.0 * M * N * K, {"gemv": N * K}


def _work_default(a: dict, grid) -> tuple[float, float, dict]:
    seen, total = set(), 0
    for v in a.values():
        if isinstance(v, torch.Tensor) and id(v) not in seen:
            seen.add(id(v))
            total += _nbytes(v)
    return float(total), 0.0, {}


WORK_MODELS: dict[str, Callable[[dict, tuple], tuple[float, float, dict]]] = {
    "_fused_step_rows_kernel": _work_fused_rows,
    "_attention_kernel": _work_attention,
    "_add_norm_kernel": _work_add_norm,
    "_rope_cache_kernel": _work_rope,
    "_activation_kernel": _work_activation,
    "_skinny_linear_kernel": _work_skinny,
}

_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "_addmm_activation"}
_GATHERS = {"embedding", "index_select", "gather", "take"}  # read the rows they return, not the whole table


class Recorder(TorchDispatchMode):
    """Records the device ops of the code run inside it on ``meta`` tensors, compiling Triton launches for a target.

    Use as ``with static_target(t), Recorder(t) as rec: code()``; ``rec.launches`` then lists every
    Triton launch (grid, compiled kernel analysed for ``t``, work) and every kernel-launching aten op.
    """

    def __init__(self, target: Target):
        super().__init__()
        self.target = target
        self.launches: list[Launch] = []
        self._paused = 0
        self._undo: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if self._paused or func.is_view or name in NO_KERNEL:
            return out
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if not any(t.device.type == "meta" for t in tensors):
            return out  # host-side arithmetic on CPU tensors (a cached constant, a shape): no device op
        moved = float(sum(_nbytes(t) for t in tensors))
        if name in _GEMMS:
            a, b = args[0], args[1]
            if name in ("addmm", "baddbmm"):
                a, b = args[1], args[2]
            m = a.shape[-2] if a.dim() > 1 else 1
            k = a.shape[-1]
            n = b.shape[0] if name == "linear" else b.shape[-1]
            batch = a.shape[0] if a.dim() == 3 else 1
            flops = 2.0 * batch * m * n * k
            self.launches.append(Launch(name, "gemm", bytes=moved, flops=flops, note=f"{batch}x{m}x{n}x{k}"))
        elif name in _GATHERS:
            # embedding(weight, indices), index_select(self, dim, index), gather(self, dim, index), take(self, index):
            # the index is the last tensor (the table may be an integer tensor too: a gather of token ids)
            index = [a for a in args if isinstance(a, torch.Tensor)][-1]
            self.launches.append(Launch(name, "aten", bytes=2.0 * _nbytes(out) + _nbytes(index)))
        else:
            self.launches.append(Launch(name, "aten", bytes=moved))
        return out

    def __enter__(self):
        from triton.runtime.jit import JITFunction

        recorder = self
        own = JITFunction.__dict__.get("run")
        real = JITFunction.run

        def run(fn, *args, grid, warmup, **kwargs):
            if warmup:
                return real(fn, *args, grid=grid, warmup=warmup, **kwargs)
            recorder._paused += 1
            try:
                kernel = real(fn, *args, grid=grid, warmup=True, **kwargs)
            finally:
                recorder._paused -= 1
            recorder._record(fn, kernel, grid, args, kwargs)
            return kernel

        JITFunction.run = run
        self._undo.append((JITFunction, own))
        self._driver = _driver_for(self.target)
        self._driver.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._restore()

    def _restore(self) -> None:
        while self._undo:
            cls, value = self._undo.pop()
            if value is None:
                with contextlib.suppress(AttributeError):
                    delattr(cls, "run")
            else:
                cls.run = value
        if getattr(self, "_driver", None) is not None:
            self._driver.__exit__(None, None, None)
            self._driver = None

    def _record(self, fn, kernel, grid, args, kwargs) -> None:
        names = fn.arg_names
        bound = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
        if callable(grid):
            grid = grid(bound)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        name = fn.fn.__name__
        item = _itemsize_of(name, bound)
        info = analyse(kernel, self.target, item)
        bytes_, flops, streams = WORK_MODELS.get(name, _work_default)(bound, grid)
        scalars = {k: v for k, v in bound.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        pdl = bool(kwargs.get("launch_pdl", False))
        self.launches.append(Launch(name, "triton", grid, info, bytes_, flops, streams, scalars=scalars, pdl=pdl))


# --------------------------------------------------------------------------------------------------
# predicted time
# --------------------------------------------------------------------------------------------------


def predict(launch: Launch, target: Target) -> dict[str, float | str]:
    """Predicted seconds of one launch on ``target`` and which ceiling sets them (see the module docstring)."""
    bw, peak = target.stream_bandwidth, target.peak_flops
    issue = 0.0
    if launch.kind == "gemm":
        t_mem = launch.bytes / (bw * GEMV_BW_EFFICIENCY)
        t_math = launch.flops / (peak * GEMM_EFFICIENCY)
    elif launch.kind == "aten":
        t_mem, t_math = launch.bytes / (bw * ELEMENTWISE_BW_EFFICIENCY), 0.0
    else:
        info = launch.info
        busy = min(1.0, launch.programs / target.sms)  # SMs the grid occupies
        t_mem = launch.bytes / (bw * max(busy, 1.0 / target.sms))
        t_math = launch.flops / peak
        if info is not None:
            for tag, elems in launch.streams.items():
                loop = info.loop(tag)
                if loop is not None:
                    issue += elems * loop.per_elem / (32 * target.warp_issue_rate) / max(busy, 1.0 / target.sms)
    bound = max((("bytes", t_mem), ("issue", issue), ("flops", t_math)), key=lambda kv: kv[1])
    return {"seconds": bound[1] + LAUNCH_S, "bound": bound[0], "t_mem": t_mem, "t_issue": issue, "t_math": t_math}


# --------------------------------------------------------------------------------------------------
# workloads: the seed shapes, driven through the sampler's own step code
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One thing a user runs, at one shape: a model forward (+ the step that follows it) or a fused_step call.

    ``mode``: ``full`` (diffusion, no cache: the published setting's step), ``window`` (diffusion, dual cache:
    the middle window against cached keys), ``prefill`` / ``decode`` (AR), ``decode-gemv`` (AR decode with
    ``DINFILL_GEMV=triton``), ``step`` (``fused_step`` alone with ``preset``), and the forward alone as
    ``gpu_check``'s forward phase times it: ``forward`` (a bidirectional canvas, logits at ``middle`` rows) and
    ``forward-decode`` (one causal token against ``length`` cached ones), ``forward-pdl`` (that forward on the
    ``DINFILL_GEMV=triton`` path with ``DINFILL_PDL=1``; sm_90 and newer, see :func:`applies`). ``length`` is
    the canvas / prompt / cache length; a diffusion middle is ``middle`` tokens (default :func:`middle` of the
    length).
    """

    model: str
    mode: str
    batch: int
    length: int
    dtype: str = "bf16"
    preset: str = "published"
    mid: int = 0

    @property
    def middle(self) -> int:
        return self.mid or middle(self.length)

    @property
    def name(self) -> str:
        extra = f" {self.preset}" if self.mode in ("full", "window", "step") else ""
        return f"{self.model} {self.mode}{extra} B{self.batch} L{self.length} {self.dtype}"


def middle(length: int) -> int:
    """Middle tokens of a diffusion canvas of ``length`` (HumanEval-Infill single-line: ~30 of ~276)."""
    return max(8, length // 9)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (the names :class:`Workload` takes)."""
    return {v: k for k, v in DTYPES.items()}[dtype]


def workloads(models=SEED_MODELS, batches=BATCHES, lengths=LENGTHS, dtypes=("bf16", "fp16")) -> list[Workload]:
    """The issue's matrix: every seed model in its modes, every batch, length and dtype, plus fused_step alone."""
    out: list[Workload] = []
    from dinfill.models.config import BUILTIN_SHAPES

    for model in models:
        kind = BUILTIN_SHAPES[model]["kind"]
        for dtype in dtypes:
            for B in batches:
                for L in lengths:
                    if kind == "diffusion":
                        out.append(Workload(model, "full", B, L, dtype, "published"))
                        out.append(Workload(model, "window", B, L, dtype, "fast"))
                    else:
                        out += [Workload(model, "prefill", B, L, dtype), Workload(model, "decode", B, L, dtype)]
                        if B == 1:
                            out.append(Workload(model, "decode-gemv", B, L, dtype))
            if kind == "ar" and 1 in batches and DECODE_KEYS not in lengths:  # the decode-attention rule's shape
                out.append(Workload(model, "decode", 1, DECODE_KEYS, dtype))
            window = BUILTIN_SHAPES[model].get("sliding_window")
            if window:  # one long prefill past the sliding window
                out.append(Workload(model, "prefill", 1, window + 512, dtype))
        if kind == "diffusion":
            for dtype in dtypes:  # gpu_check's forward phase: one decode step, canvases with 16 logits rows
                out.append(Workload(model, "forward-decode", 1, 276, dtype))
                out.append(Workload(model, "forward-pdl", 1, 276, dtype))
                out += [Workload(model, "forward", B, 276, dtype, mid=16) for B in batches if B in (1, 32)]
            for dtype in dtypes:
                for preset in STEP_PRESETS:
                    for B in batches:
                        out.append(Workload(model, "step", B, 276, dtype, preset))
    return out


@functools.lru_cache(maxsize=16)
def _meta_model(name: str, dtype: str):
    import dinfill

    return dinfill.load_model(name, random_weights=True, device="meta", dtype=DTYPES[dtype])


def _step_options(preset: str, rows: int) -> dict:
    opts = dict(STEP_PRESETS[preset])
    sel = opts["select"]
    if sel in ("topk", "p2", "bernoulli"):
        opts["fraction"] = 0.5
    return opts


def _fused_step_call(w: Workload, model_vocab: int, mask_id: int) -> Callable[[], Any]:
    from dinfill.kernels import fused_step

    B, L, M = w.batch, w.length, w.middle
    dev = torch.device("meta")
    logits = torch.empty(B, M, model_vocab, dtype=DTYPES[w.dtype], device=dev)
    x = torch.empty(B, L, dtype=torch.long, device=dev)
    positions = torch.empty(B, M, dtype=torch.long, device=dev)
    opts = _step_options(w.preset, B * M)
    seed = torch.empty(1, dtype=torch.long, device=dev)
    offset = torch.empty(1, dtype=torch.long, device=dev)
    return lambda: fused_step(logits, x, positions, mask_id=mask_id, seed=seed, offset=offset, **opts)


def _diffusion_runner(w: Workload, model):
    from dinfill.sampler import diffusion as diff

    B, L, M = w.batch, w.length, w.middle
    opts = STEP_PRESETS[w.preset]
    sampled = opts.get("temperature", 0.0) > 0
    spec = diff._SamplingSpec(sampled=sampled, top_p="top_p" in opts, top_k="top_k" in opts, needs_rng=sampled,
                              threshold=opts.get("threshold", 0.9), factor=1.0, alg_temp=opts.get("alg_temp", 0.0))
    dual = w.mode == "window"
    runner = diff._StepRunner(model, B, L, M, M + 1, dual=dual, steps_cap=64, mask_id=model.config.vocab_size - 1,
                              select=opts["select"], confidence=opts.get("confidence", "prob"), spec=spec)
    kind = "window" if dual else "plain"
    return lambda: (runner.forward(kind), runner.sample(kind))


def _ar_runner(w: Workload, model):
    from dinfill.sampler import autoregressive as ar

    B, L = w.batch, w.length
    spec = ar._ArSpec(sampled=True, top_p=False, top_k=None)  # the published AR setting: temperature 0.6
    dec = ar._Decode(model, B, L + 1, 4, spec)
    P = L if w.mode == "prefill" else 1
    dec._prompt(P)
    dec.P = P
    return dec.prefill if w.mode == "prefill" else dec.step


@functools.cache
def _code_fingerprint() -> str:
    """What a recorded workload depends on: the runtime's sources (kernels, models, samplers, target, the forward
    phase's input builder), triton's and torch's versions, and ``_RECORD_VERSION`` for this module's recorder
    and work models (bump it when they change; the report code here does not invalidate recordings) and
    ``_ANALYSIS_VERSION`` (the recordings hold kernel analyses, which are cached apart under it)."""
    import triton

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(f"{triton.__version__} {torch.__version__} v{_RECORD_VERSION}.{_ANALYSIS_VERSION}".encode())
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("eval/", "bench/")) and rel != "bench/forward.py" or rel == "cli.py":
            continue
        h.update(rel.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def _launch_row(x: Launch) -> dict:
    return dict(op=x.op, kind=x.kind, grid=list(x.grid), info=x.info.row() if x.info else None, bytes=x.bytes,
                flops=x.flops, streams=x.streams, note=x.note, scalars=x.scalars, pdl=x.pdl)  # fmt: skip


def _launch_from_row(d: dict) -> Launch:
    info = KernelInfo.from_row(d["info"]) if d["info"] else None
    return Launch(d["op"], d["kind"], tuple(d["grid"]), info, d["bytes"], d["flops"], d["streams"], d["note"],
                  d.get("scalars", {}), d.get("pdl", False))  # fmt: skip


def run_workload(w: Workload, target: Target | str) -> list[Launch]:
    """Record every device op of ``w`` on ``target`` (compiling its Triton kernels for it).

    Results are cached on disk under the analysis cache, keyed by the workload, the target and
    :func:`_code_fingerprint` (any change to the package's source or to triton / torch records anew), so a
    second run of the same matrix only reads JSON.
    """
    target = lookup(target) if isinstance(target, str) else target
    key = hashlib.sha256(json.dumps([dataclasses.asdict(w), target.as_dict()], sort_keys=True).encode()).hexdigest()
    path = _cache_dir() / "results" / f"{_code_fingerprint()}-{key[:24]}.json"
    if path.exists():
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            return [_launch_from_row(d) for d in json.loads(path.read_text())]
    launches = _record_workload(w, target)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([_launch_row(x) for x in launches]))
    return launches


def _record_workload(w: Workload, target: Target) -> list[Launch]:
    model = _meta_model(w.model, w.dtype)
    gemv = w.mode in ("decode-gemv", "forward-pdl")
    env = {"DINFILL_BACKEND": "auto", "DINFILL_GEMV": "triton" if gemv else "cublas",
           "DINFILL_PDL": "1" if w.mode == "forward-pdl" else "0"}  # fmt: skip
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with static_target(target), torch.no_grad():
            with Recorder(target):  # a first call allocates and compiles (the warm-up before a graph capture)
                if w.mode == "step":
                    fn = _fused_step_call(w, model.config.vocab_size, model.config.vocab_size - 1)
                elif w.mode in ("full", "window"):
                    fn = _diffusion_runner(w, model)
                elif w.mode.startswith("forward"):  # gpu_check's forward phase builds its inputs (and cache) so
                    from dinfill.bench.forward import _forward_inputs

                    decode = w.mode in ("forward-decode", "forward-pdl")
                    fn = _forward_inputs(model, w.batch, 1 if decode else w.length, w.middle, w.length)[0]
                else:
                    fn = _ar_runner(w, model)
                fn()
            with Recorder(target) as rec:  # the steady state a CUDA graph replays
                fn()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rec.launches


# --------------------------------------------------------------------------------------------------
# evaluation: per workload totals, floors, and the rules
# --------------------------------------------------------------------------------------------------


def _floor(w: Workload, target: Target) -> tuple[float, str]:
    """The roofline floor of one workload's device work on ``target``: (seconds, what sets it)."""
    from dinfill.bench.roofline import forward_work
    from dinfill.models.config import builtin_config

    cfg = builtin_config(w.model)
    item = DTYPES[w.dtype].itemsize
    B, L, M = w.batch, w.length, w.middle
    if w.mode == "step":
        work_bytes, flops = B * M * cfg.vocab_size * item, 0.0
    else:
        if w.mode == "full":
            work = forward_work(cfg, batch=B, queries=L, logits_rows=B * M, itemsize=item)
        elif w.mode == "window":
            work = forward_work(cfg, batch=B, queries=M + 1, keys=L, logits_rows=B * M, itemsize=item)
        elif w.mode == "prefill":
            work = forward_work(cfg, batch=B, queries=L, logits_rows=B, itemsize=item, causal=True)
        elif w.mode == "forward":
            work = forward_work(cfg, batch=B, queries=L, logits_rows=B * M, itemsize=item)
        else:  # decode, decode-gemv, forward-decode, forward-pdl
            work = forward_work(cfg, batch=B, queries=1, keys=L, logits_rows=B, itemsize=item)
        work_bytes, flops = work.bytes, work.flops
        if w.mode in ("full", "window"):
            work_bytes += B * M * cfg.vocab_size * item  # the step reads the logits once
    t_b, t_f = work_bytes / target.stream_bandwidth, flops / target.peak_flops
    return (t_b, "bytes") if t_b >= t_f else (t_f, "flops")


@dataclass
class Result:
    """One workload on one target: its launches, their predictions, the totals and the floor."""

    workload: Workload
    target: Target
    launches: list[Launch]
    predictions: list[dict]
    total_s: float
    floor_s: float
    floor_bound: str
    error: str | None = None

    @property
    def kernels(self) -> int:
        return len(self.launches)

    def breakdown(self) -> dict[str, float]:
        """Seconds per cause: launch overhead, and per op family."""
        out: dict[str, float] = {"launch": LAUNCH_S * len(self.launches)}
        for launch, p in zip(self.launches, self.predictions, strict=True):
            out[launch.op] = out.get(launch.op, 0.0) + p["seconds"] - LAUNCH_S
        return out

    def row(self) -> dict:
        w = self.workload
        return {
            "workload": w.name, "model": w.model, "mode": w.mode, "preset": w.preset, "batch": w.batch,
            "length": w.length, "dtype": w.dtype, "target": self.target.name, "arch": self.target.arch,
            "kernels": self.kernels, "predicted_s": self.total_s, "floor_s": self.floor_s, "floor_bound":
            self.floor_bound, "ratio": self.total_s / self.floor_s if self.floor_s else None,
            "breakdown": self.breakdown(), "error": self.error,
            "launches": [
                dict(op=x.op, kind=x.kind, grid=x.grid, kernel=x.info.key if x.info else None, bytes=x.bytes,
                     flops=x.flops, streams=x.streams, pdl=x.pdl, **{k: v for k, v in p.items()})
                for x, p in zip(self.launches, self.predictions, strict=True)
            ],
        }  # fmt: skip


def applies(w: Workload, target: Target) -> bool:
    """Whether the matrix evaluates ``w`` on ``target``: ``forward-pdl`` only where programmatic dependent launch
    exists (sm_90 and newer; below, ``DINFILL_PDL=1`` is refused before any launch)."""
    from dinfill.target import PDL_MIN_ARCH

    return w.mode != "forward-pdl" or target.arch >= PDL_MIN_ARCH


def evaluate(w: Workload, target: Target | str) -> Result:
    """Run, predict and sum one workload on one target (an exception becomes the result's ``error``)."""
    target = lookup(target) if isinstance(target, str) else target
    try:
        launches = run_workload(w, target)
    except Exception as e:  # a launch that cannot be compiled for this target is a finding, not a crash
        return Result(w, target, [], [], math.nan, math.nan, "", error=f"{type(e).__name__}: {str(e)[:300]}")
    preds = [predict(x, target) for x in launches]
    floor, bound = _floor(w, target)
    return Result(w, target, launches, preds, sum(p["seconds"] for p in preds), floor, bound)


def per_problem(r: Result, steps: int = 64) -> float | None:
    """Predicted seconds per problem of the published setting: a diffusion step x ``steps``, divided over the
    batch (``None`` for the AR and forward-only modes, whose per-problem cost depends on the middle's length)."""
    w = r.workload
    if w.mode in ("full", "window"):
        return r.total_s * steps / w.batch
    return None


def _bandwidth_share(launch: Launch, prediction: dict, t: Target) -> float:
    """Fraction of the streaming bandwidth of `t` at which a launch moves its bytes in its predicted time."""
    return launch.bytes / max(prediction["seconds"] - LAUNCH_S, 1e-12) / t.stream_bandwidth


def check_rules(results: list[Result]) -> list[str]:
    """Every broken fit or budget rule of issue 18, one line each (empty: all hold)."""
    bad: list[str] = []
    seen: set[tuple[str, str]] = set()
    for r in results:
        if r.error:
            bad.append(f"{r.target.name}: {r.workload.name}: {r.error}")
            continue
        for launch in r.launches:
            info = launch.info
            if info is None or (info.key, r.target.name) in seen:
                continue
            seen.add((info.key, r.target.name))
            if not info.fits:
                bad.append(f"{r.target.name}: {info.name} ({r.workload.name}) uses {info.shared} B of shared memory; "
                           f"the limit is {info.smem_limit} - {SMEM_MARGIN} margin (resident blocks {info.resident})")
            if info.spill_bytes:
                bad.append(f"{r.target.name}: {info.name} ({r.workload.name}) spills {info.spill_bytes} B "
                           f"({info.regs} registers, {info.num_warps} warps)")
        bad += _budget_rules(r)
    return bad


def _budget_rules(r: Result) -> list[str]:
    w, t = r.workload, r.target
    bad = []
    if t.arch == 90 and w.mode == "step" and w.dtype == "bf16":
        for launch in r.launches:
            if launch.op != "_fused_step_rows_kernel" or launch.info is None:
                continue
            budget = BUDGET_GREEDY if w.preset == "greedy" else BUDGET_PUBLISHED
            if w.preset not in ("greedy", "published"):
                continue
            tags = ["pass-1", "pass-1a"] + (["scan"] if w.preset == "published" else [])
            for tag in tags:
                loop = launch.info.loop(tag)
                if loop is not None and loop.per_elem > budget:
                    bad.append(f"{t.name}: fused_step {w.preset} loop {tag} ({loop.line}) costs "
                               f"{loop.per_elem:.1f} instructions per element (budget {budget:g})")
            if w.preset == "published" and launch.info.loop("pass-1") is None:
                bad.append(f"{t.name}: fused_step {w.preset}: no loop tagged pass-1 in the compiled kernel")
    if w.mode in ("decode", "window") and w.batch == 1 and t.arch in (89, 90):
        from dinfill.kernels.attention_fwd import _MAX_SPLITS, _SPLIT_MIN_KEYS, _SPLIT_MIN_LEN

        for launch, p in zip(r.launches, r.predictions, strict=True):
            if launch.op != "_attention_kernel" or launch.info is None:
                continue
            keys = int(launch.scalars.get("L_k", w.length))
            wave = launch.info.resident * t.sms
            # a full wave, or as many programs as the attention launcher's shortest splits (one tensor-core tile of
            # keys each, at most _MAX_SPLITS of them) can make
            reachable = launch.grid[0] * launch.grid[1] * min(max(1, keys // _SPLIT_MIN_LEN), _MAX_SPLITS)
            if keys >= _SPLIT_MIN_KEYS and launch.programs < min(t.sms, reachable):
                bad.append(f"{t.name}: {w.name}: attention launches {launch.programs} programs on {t.sms} SMs "
                           f"({keys} keys; a full wave is {t.sms}, {_SPLIT_MIN_LEN}-key splits reach {reachable})")
                break
            if w.mode == "decode" and keys >= DECODE_KEYS and p["t_mem"] > 0:
                frac = _bandwidth_share(launch, p, t)
                if frac < DECODE_BW_FRACTION:
                    bad.append(f"{t.name}: {w.name}: attention reaches {frac:.0%} of the bandwidth "
                               f"(target {DECODE_BW_FRACTION:.0%}; wave {wave})")
                break
    return bad


def calibrated_target(device: torch.device | str | None = None, ceilings: dict | None = None) -> Target:
    """The target of a real GPU (from its properties) with the ceilings a run measured as its peaks.

    Without CUDA (gpu_check's CPU dry run) the stand-in is the sm_90 table entry, said in its name.
    """
    from dataclasses import replace

    from dinfill.target import target_for

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    t = target_for(device) if device.type == "cuda" else None
    if t is None:
        t = replace(lookup("sm_90"), name="H100 SXM (stand-in: no CUDA)")
    if ceilings:
        t = replace(t, measured_bandwidth=ceilings.get("bandwidth"), measured_bf16_flops=ceilings.get("flops"))
    return t


def predict_ms(w: Workload, target: Target) -> dict[str, Any]:
    """Prediction cells for a measured row: ``pred_ms`` (the workload's device time), kernels, what bounds it."""
    from dinfill.backend import triton_interpreted

    if not nvidia_backend_available():
        return {"pred_note": "no NVIDIA backend in this triton: no prediction"}
    if triton_interpreted():  # kernels defined under TRITON_INTERPRET cannot be compiled for a GPU
        return {"pred_note": "Triton interpreter process: see dinfill bench --static"}
    r = evaluate(w, target)
    if r.error:
        return {"pred_note": f"prediction failed: {r.error[:120]}"}
    top = max(((k, v) for k, v in r.breakdown().items()), key=lambda kv: kv[1])
    return {"pred_ms": round(r.total_s * 1e3, 4), "pred_kernels": r.kernels, "pred_largest": top[0]}


def targets(results: list[Result]) -> list[tuple[bool, str]]:
    """Issue 18's whole-forward target, per sm_89 / sm_90 result: ``(met, line)``.

    The predicted batch-1 forward of the 0.5B shape (fused path, graph replay) within ``FLOOR_RATIO`` of its
    weight-read floor. It is a target, not a fit rule: it depends on the stated launch cost and cuBLAS
    efficiency as much as on the kernels, so ``--check`` prints it (with what keeps the forward from the
    floor) but does not fail on it; gpu_check measures it.
    """
    out = []
    for r in results:
        w, t = r.workload, r.target
        if r.error or (w.model, w.mode, w.batch, w.dtype) != ("open-dcoder-0.5b", "forward-decode", 1, "bf16"):
            continue
        if t.arch not in (89, 90):
            continue
        ratio = r.total_s / r.floor_s
        top = sorted(r.breakdown().items(), key=lambda kv: -kv[1])[:3]
        why = ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in top)
        line = (f"{t.name}: {w.name}: predicted {r.total_s * 1e3:.3f} ms = {ratio:.2f}x the floor "
                f"{r.floor_s * 1e3:.3f} ms (target {FLOOR_RATIO}x; {r.kernels} kernels); largest: {why}")  # fmt: skip
        if ratio > FLOOR_RATIO:
            line += "; " + _launch_room(r)
        out.append((ratio <= FLOOR_RATIO, line))
    return out


def pdl_lines(results: list[Result]) -> list[str]:
    """What programmatic dependent launch would have to cost for the 0.5B batch-1 forward to meet the target.

    The model charges every launch :data:`LAUNCH_S`, PDL or not: what PDL saves is a latency the compiled code
    does not show, so it is left to gpu_check to measure (its forward phase times ``fused_gemv_pdl_ms``). This
    says what it must save: the largest cost per PDL launch at which the ``forward-pdl`` forward is within
    ``FLOOR_RATIO`` of its floor, with the other launches at :data:`LAUNCH_S`.
    """
    out = []
    for r in results:
        w, t = r.workload, r.target
        if r.error or (w.model, w.mode, w.batch, w.dtype) != ("open-dcoder-0.5b", "forward-pdl", 1, "bf16"):
            continue
        overlapped = sum(x.pdl for x in r.launches)
        work = _work_s(r)
        room = FLOOR_RATIO * r.floor_s - work - LAUNCH_S * (r.kernels - overlapped)
        head = (f"{t.name}: {w.name}: {r.kernels} kernels, {overlapped} launched with PDL; {r.total_s * 1e3:.3f} ms "
                f"at {LAUNCH_S * 1e6:.1f} us a launch ({r.total_s / r.floor_s:.2f}x the floor)")
        if room <= 0 or not overlapped:
            out.append(f"{head}; the target cannot hold whatever PDL saves (the kernels' work and the other launches "
                       f"take {(work + LAUNCH_S * (r.kernels - overlapped)) * 1e6:.0f} us)")
        else:
            out.append(f"{head}; within {FLOOR_RATIO}x if a PDL launch costs <= {room / overlapped * 1e6:.2f} us "
                       "(gpu_check measures it)")
    return out


def _work_s(r: Result) -> float:
    """The predicted seconds of a workload's kernels without their launch costs."""
    return r.total_s - LAUNCH_S * r.kernels


def _launch_room(r: Result) -> str:
    """How many launches the target leaves once the kernels' own work is paid for (the launch cost is the lever
    the kernels cannot shorten)."""
    work = _work_s(r)
    room = FLOOR_RATIO * r.floor_s - work
    fits = max(int(room // LAUNCH_S), 0)
    return (f"the kernels' own work takes {work * 1e6:.0f} us of the {FLOOR_RATIO * r.floor_s * 1e6:.0f} us the target "
            f"allows, leaving room for {fits} launches at {LAUNCH_S * 1e6:.1f} us")


# --------------------------------------------------------------------------------------------------
# report and command line
# --------------------------------------------------------------------------------------------------


def _us(s: float) -> str:
    return f"{s * 1e6:,.1f}" if s == s else "-"


def kernel_table(results: list[Result]) -> list[str]:
    """Markdown: one row per distinct compiled kernel and target (waves, bytes and predicted time per launch:
    their range over the launches that use it)."""
    rows: dict[tuple[str, str], tuple[KernelInfo, list[tuple[Launch, dict]], Target, str]] = {}
    for r in results:
        for launch, pred in zip(r.launches, r.predictions, strict=True):
            if launch.info is None:
                continue
            key = (launch.info.key, r.target.name)
            if key not in rows:
                rows[key] = (launch.info, [], r.target, r.workload.name)
            rows[key][1].append((launch, pred))
    out = ["| target | kernel | warps | smem (limit) | regs | spills | blocks/SM | waves | MB / launch | us / launch "
           "(bound) | loops: instr/elem (fast path) | first seen in |", "|---" * 12 + "|"]

    def span(vals: list[float], fmt: str) -> str:
        lo, hi = fmt.format(min(vals)), fmt.format(max(vals))
        return lo if lo == hi else f"{lo}-{hi}"

    for (_key, _t), (info, launches, t, first) in sorted(rows.items(), key=lambda kv: (kv[1][2].arch, kv[1][0].name)):
        waves = span([x.programs / max(1, info.resident * t.sms) for x, _ in launches], "{:.2f}")
        mbytes = span([x.bytes / 1e6 for x, _ in launches], "{:.3g}")
        us = span([p["seconds"] * 1e6 for _, p in launches], "{:.3g}")
        bounds = "/".join(sorted({p["bound"] for _, p in launches}))
        loops = "; ".join(f"{lp.tag}: {lp.per_elem:.1f} ({lp.fast_per_elem:.1f})" for lp in info.stream_loops()
                          if lp.elems)  # fmt: skip
        out.append(f"| {t.name} (sm_{t.arch}) | {info.name} | {info.num_warps} | {info.shared:,} ({info.smem_limit:,}) "
                   f"| {info.regs} | {info.spill_bytes} | {info.resident} | {waves} | {mbytes} | {us} ({bounds}) | "
                   f"{loops or '-'} | {first} |")
    return out


def workload_table(results: list[Result]) -> list[str]:
    """Markdown: one row per workload and target: kernels, predicted time, floor, ratio, what dominates."""
    out = ["| target | workload | kernels | predicted us | floor us (bound) | ratio | per problem ms | largest |",
           "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.error:
            out.append(f"| {r.target.name} | {r.workload.name} | - | - | - | - | - | {r.error} |")
            continue
        top = sorted(r.breakdown().items(), key=lambda kv: -kv[1])[:2]
        why = ", ".join(f"{k} {v * 1e6:.0f}" for k, v in top)
        pp = per_problem(r)
        out.append(f"| {r.target.name} | {r.workload.name} | {r.kernels} | {_us(r.total_s)} | {_us(r.floor_s)} "
                   f"({r.floor_bound}) | {r.total_s / r.floor_s:.2f} | {pp * 1e3:.2f} | {why} |"
                   if pp is not None else
                   f"| {r.target.name} | {r.workload.name} | {r.kernels} | {_us(r.total_s)} | {_us(r.floor_s)} "
                   f"({r.floor_bound}) | {r.total_s / r.floor_s:.2f} | - | {why} |")  # fmt: skip
    return out


def headline_table(results: list[Result]) -> list[str]:
    """Markdown: per target, the numbers issue 18 asks about (where the results hold those workloads).

    The published setting's step (open-dcoder-0.5b, B1 and B32, L276) and the fast preset's window step, in
    predicted microseconds and ms per problem (64 steps); the fused_step loops of the published preset; a
    batch-1 decode's attention (programs, predicted share of the bandwidth at 1152 keys); the batch-1 forward
    against its weight-read floor; the fit rules' maxima.
    """
    by = {(r.target.name, r.workload): r for r in results if not r.error}
    out = ["| target | published step B1 / B32 (us) | ms / problem B1 / B32 | fast window step B1 (us) | fused_step "
           "pass 1a / 1b / scan | decode attention @276 / @1152 keys | forward B1 / floor | max smem / limit, "
           "spills |", "|---" * 8 + "|"]
    for t in dict.fromkeys(r.target for r in results):
        def get(model, mode, B, L, preset="published", mid=0, name=t.name):
            return by.get((name, Workload(model, mode, B, L, "bf16", preset, mid)))

        cells = []
        steps = [get("open-dcoder-0.5b", "full", B, 276) for B in (1, 32)]
        cells.append(" / ".join(f"{r.total_s * 1e6:,.0f}" if r else "-" for r in steps))
        cells.append(" / ".join(f"{per_problem(r) * 1e3:.1f}" if r else "-" for r in steps))
        win = get("open-dcoder-0.5b", "window", 1, 276, "fast")
        cells.append(f"{win.total_s * 1e6:,.0f}" if win else "-")
        loops = "-"
        pub = get("open-dcoder-0.5b", "step", 1, 276)
        rows = [x for x in (pub.launches if pub else []) if x.op == "_fused_step_rows_kernel" and x.info]
        if rows:
            parts = [rows[0].info.loop(tag) for tag in ("pass-1a", "pass-1", "scan")]
            loops = " / ".join(f"{lp.per_elem:.1f}" if lp else "-" for lp in parts)
        cells.append(loops)
        att = []
        for L in (276, DECODE_KEYS):
            r = get("qwen2.5-coder-0.5b", "decode", 1, L)
            pairs = [(x, p) for x, p in zip(r.launches, r.predictions, strict=True) if x.op == "_attention_kernel"] \
                if r else []  # fmt: skip
            if not pairs:
                att.append("-")
                continue
            x, p = pairs[0]
            att.append(f"{x.programs} programs, {min(_bandwidth_share(x, p, t), 1.0):.0%} bw")
        cells.append(" / ".join(att))
        fwd = get("open-dcoder-0.5b", "forward-decode", 1, 276)
        cells.append(f"{fwd.total_s * 1e3:.3f} / {fwd.floor_s * 1e3:.3f} ms ({fwd.total_s / fwd.floor_s:.2f}x)"
                     if fwd else "-")  # fmt: skip
        infos = {x.info.key: x.info for r in results if r.target is t for x in r.launches if x.info}
        if infos:
            worst = max(infos.values(), key=lambda i: i.shared)
            spills = sum(i.spill_bytes > 0 for i in infos.values())
            cells.append(f"{worst.shared:,} / {worst.smem_limit:,} B, {spills} of {len(infos)} kernels spill")
        else:
            cells.append("-")
        out.append(f"| {t.name} (sm_{t.arch}) | " + " | ".join(cells) + " |")
    return out


def select(items: list[Workload], model: list[str] | None, mode: list[str] | None) -> list[Workload]:
    """The workloads of the given models and modes (``None``: all)."""
    if model:
        items = [w for w in items if w.model in model]
    if mode:
        items = [w for w in items if w.mode in mode]
    return items


CHECK_SUBSET = dict(models=("open-dcoder-0.5b", "qwen2.5-coder-0.5b", "starcoder2-3b"), batches=(1, 32),
                    lengths=(276,), dtypes=("bf16",))  # fmt: skip
_DTYPE_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}


def main(args) -> int:
    """Entry point of ``dinfill bench --static``; returns the exit code."""
    if not nvidia_backend_available():
        print("dinfill bench --static: the installed triton has no NVIDIA backend (ptxas / nvdisasm); "
              "install the triton wheel from PyPI")
        return 2
    from dinfill.models.config import BUILTIN_SHAPES

    gpus = [lookup(a) for a in (args.arch or ARCHS)]
    model = getattr(args, "model", None)
    if model and model.lower() not in BUILTIN_SHAPES:
        raise ValueError(f"--static --model takes a built-in shape ({', '.join(SEED_MODELS)}), not {model!r}")
    if args.check and not args.full and not model:
        items = workloads(**CHECK_SUBSET)
    else:
        items = workloads(models=(model.lower(),) if model else SEED_MODELS)
    items = select(items, None, args.mode)
    if getattr(args, "batch", None):
        items = [w for w in items if w.batch in args.batch]
    if getattr(args, "step_preset", None):
        items = [w for w in items if w.mode != "step" or w.preset in args.step_preset]
    if getattr(args, "dtype", None):
        if args.dtype not in _DTYPE_NAMES:
            raise ValueError(f"--static models bf16 and fp16 launches, not --dtype {args.dtype}")
        items = [w for w in items if w.dtype == _DTYPE_NAMES[args.dtype]]
    results, skipped = [], []
    for t in gpus:
        for w in items:
            if applies(w, t):
                results.append(evaluate(w, t))
            else:
                skipped.append(f"not evaluated: {w.name} on {t.name} (sm_{t.arch}): PDL needs sm_90")
    if args.kernel:
        for r in results:
            r.launches = [x for x in r.launches if any(k in x.op for k in args.kernel)]
    bad, met_lines, pdl = check_rules(results), targets(results), pdl_lines(results)
    if args.json:
        rows = {"workloads": [r.row() for r in results], "kernels": [], "violations": bad,
                "targets": [{"met": met, "line": line} for met, line in met_lines], "pdl": pdl}
        seen = set()
        for r in results:
            for x in r.launches:
                if x.info is not None and (x.info.key, r.target.name) not in seen:
                    seen.add((x.info.key, r.target.name))
                    rows["kernels"].append(x.info.row())
        text = json.dumps(rows, indent=1, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    goals = [f"target {'met' if met else 'missed'}: {line}" for met, line in met_lines]
    goals += [f"pdl: {line}" for line in pdl]
    if args.mode and "forward-pdl" in args.mode:  # asked for by name: say where it was not evaluated
        goals += skipped
    if args.check:
        for line in bad + goals:
            print(line)
        print(f"static check: {len(bad)} broken rule(s) over {len(results)} workload x target evaluations")
        return 1 if bad else 0
    print("\n".join(kernel_table(results)))
    print()
    print("\n".join(workload_table(results)))
    print()
    print("\n".join(headline_table(results)))
    print()
    print(f"{len(bad)} broken rule(s)" + (":\n" + "\n".join(bad) if bad else ""))
    print("\n".join(goals))
    return 0
