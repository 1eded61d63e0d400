"""What the GPU a launch is for can hold and do: one small description that every launcher consults.

Why: launch configurations used to be H100 tables read off the device at hand (the SM count only). A
config that fits an H100's 227 KB of shared memory per block raises ``OutOfResources`` on an L4 (99 KB),
and one sized for 132 SMs leaves an L4's 58 idle or oversubscribed in other ways. Launchers therefore
ask :func:`target_for` for a :class:`Target` (compute capability, SMs, shared memory, registers,
bandwidth, clock) and derive block sizes, stages, warps and splits from it. On a real GPU the target
comes from ``torch.cuda.get_device_properties`` (the datasheet columns from :data:`TARGETS` by name);
the static GPU model (``dinfill bench --static``) sets one from :data:`TARGETS` with
:func:`static_target` and runs the real launchers on ``meta`` tensors, so what it compiles is what a
call on that GPU would launch. On the CPU (the Triton interpreter) there is no target: ``None``.

The table (vendor datasheets; CUDA programming guide, "Compute capabilities", for the per-SM limits;
docs/gpu.md for the bandwidths this workplace measured):

========  ====  ====  ==========  ========  ===========  ========  =========
target    arch  SMs   smem/block  smem/SM   threads/SM   L2        HBM GB/s
========  ====  ====  ==========  ========  ===========  ========  =========
a100      80    108   163 KB      164 KB    2048         40 MB     2039
a10       86    72    99 KB       100 KB    1536         6 MB      600
l4        89    58    99 KB       100 KB    1536         48 MB     300
h100      90    132   227 KB      228 KB    2048         50 MB     3350 (3000 measured)
h200      90    132   227 KB      228 KB    2048         50 MB     4800 (4300 measured)
========  ====  ====  ==========  ========  ===========  ========  =========

``issue_budget`` is the arithmetic the kernels are held to: a streaming kernel reading ``itemsize``-byte
elements at the device's bandwidth can spend at most ``SMs x 4 schedulers x clock x 32 lanes /
(bandwidth / itemsize)`` SASS instructions per element per thread and still be bandwidth-bound
(H200 ~15.5 at 4.3 TB/s, H100 SXM ~22 at 3.0 TB/s measured (~20 at the datasheet 3.35), A100 80GB ~19,
A10 ~52, L4 ~100 for bf16).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass, replace

import torch

__all__ = [
    "Target", "TARGETS", "MIN_ARCH", "PDL_MIN_ARCH", "lookup", "target_for", "static_target", "match_name", "pdl",
    "Unservable",
]  # fmt: skip

KB = 1024
MIN_ARCH = 80  # the Triton kernels need bf16 tensor-core dots and bf16x2 PTX; on sm_75 attention spills ~480 B a thread
PDL_MIN_ARCH = 90  # programmatic dependent launch (griddepcontrol) came with Hopper


@dataclass(frozen=True)
class Target:
    """One GPU as the launchers and the static model see it.

    Attributes
    ----------
    name : str
        Product name (``"H100 SXM"``).
    arch : int
        Compute capability as ``10 * major + minor`` (``90``).
    sms : int
        Streaming multiprocessors.
    smem_per_block : int
        Most shared memory one block may use (the opt-in limit), bytes.
    smem_per_sm : int
        Shared memory of one SM, bytes (1 KB of it is reserved per resident block).
    regs_per_sm : int
        32-bit registers of one SM (a thread uses at most 255).
    max_threads_per_sm, max_blocks_per_sm : int
        Residency limits of one SM.
    l2_bytes : int
        L2 cache size.
    bandwidth : float
        HBM / GDDR bandwidth, bytes/s (datasheet).
    bf16_flops : float
        Dense bf16 tensor-core FLOP/s (datasheet, no sparsity).
    clock_hz : float
        SM boost clock.
    measured_bandwidth, measured_bf16_flops : float or None
        What a large copy / matmul reached on such a machine in this workplace (docs/gpu.md).
    """

    name: str
    arch: int
    sms: int
    smem_per_block: int
    smem_per_sm: int
    regs_per_sm: int
    max_threads_per_sm: int
    max_blocks_per_sm: int
    l2_bytes: int
    bandwidth: float
    bf16_flops: float
    clock_hz: float
    measured_bandwidth: float | None = None
    measured_bf16_flops: float | None = None

    @property
    def stream_bandwidth(self) -> float:
        """The bandwidth a streaming kernel can reach: measured where known, else the datasheet."""
        return self.measured_bandwidth or self.bandwidth

    @property
    def peak_flops(self) -> float:
        """Dense bf16 FLOP/s a large GEMM can reach: measured where known, else the datasheet."""
        return self.measured_bf16_flops or self.bf16_flops

    @property
    def warp_issue_rate(self) -> float:
        """Warp instructions the whole GPU can issue per second (4 schedulers per SM, one each per clock)."""
        return self.sms * 4 * self.clock_hz

    def issue_budget(self, itemsize: int = 2, bandwidth: float | None = None) -> float:
        """SASS instructions per element per thread a streaming loop may spend and still be bandwidth-bound.

        ``32 x warp_issue_rate / (bandwidth / itemsize)``: at that many instructions the schedulers issue
        exactly as fast as the memory delivers elements.
        """
        bw = bandwidth or self.stream_bandwidth
        return 32 * self.warp_issue_rate / (bw / itemsize)

    def resident_blocks(self, threads: int, regs_per_thread: int, smem: int) -> int:
        """Blocks of one kernel an SM holds at once (0: the kernel cannot launch on this target).

        Registers are allocated per warp in units of 256; each block costs 1 KB of shared memory on top of
        what it asks for (CUDA's per-block reservation on sm_80 and later).
        """
        if smem > self.smem_per_block or threads > 1024 or regs_per_thread > 255:
            return 0
        warps = -(-threads // 32)
        regs_per_warp = -(-max(regs_per_thread, 1) * 32 // 256) * 256
        by_regs = self.regs_per_sm // (regs_per_warp * warps)
        by_threads = self.max_threads_per_sm // (warps * 32)
        by_smem = self.smem_per_sm // (smem + KB) if smem else self.max_blocks_per_sm
        return max(0, min(self.max_blocks_per_sm, by_regs, by_threads, by_smem))

    def as_dict(self) -> dict:
        """Plain dict for JSON records."""
        return asdict(self)


# Datasheets: NVIDIA A100 (80 GB SXM), A10, L4, H100 SXM5 / PCIe, H200 SXM product briefs; per-SM limits
# from the CUDA C++ Programming Guide, table "Technical Specifications per Compute Capability".
_SM80 = dict(arch=80, smem_per_block=163 * KB, smem_per_sm=164 * KB, max_threads_per_sm=2048, max_blocks_per_sm=32)
_SM86 = dict(arch=86, smem_per_block=99 * KB, smem_per_sm=100 * KB, max_threads_per_sm=1536, max_blocks_per_sm=16)
_SM89 = dict(arch=89, smem_per_block=99 * KB, smem_per_sm=100 * KB, max_threads_per_sm=1536, max_blocks_per_sm=24)
_SM90 = dict(arch=90, smem_per_block=227 * KB, smem_per_sm=228 * KB, max_threads_per_sm=2048, max_blocks_per_sm=32)
_R = dict(regs_per_sm=65536)

TARGETS: dict[str, Target] = {
    "a100": Target("A100 80GB", sms=108, l2_bytes=40 << 20, bandwidth=2.039e12, bf16_flops=312e12, clock_hz=1.41e9,
                   **_SM80, **_R),
    "a10": Target("A10", sms=72, l2_bytes=6 << 20, bandwidth=600e9, bf16_flops=125e12, clock_hz=1.695e9, **_SM86, **_R),
    "l4": Target("L4", sms=58, l2_bytes=48 << 20, bandwidth=300e9, bf16_flops=121e12, clock_hz=2.04e9, **_SM89, **_R),
    "h100": Target("H100 SXM", sms=132, l2_bytes=50 << 20, bandwidth=3.35e12, bf16_flops=989e12, clock_hz=1.98e9,
                   measured_bandwidth=3.0e12, measured_bf16_flops=800e12, **_SM90, **_R),
    "h100-pcie": Target("H100 PCIe", sms=114, l2_bytes=50 << 20, bandwidth=2.0e12, bf16_flops=756e12,
                        clock_hz=1.755e9, **_SM90, **_R),
    "h200": Target("H200", sms=132, l2_bytes=50 << 20, bandwidth=4.8e12, bf16_flops=989e12, clock_hz=1.98e9,
                   measured_bandwidth=4.3e12, measured_bf16_flops=790e12, **_SM90, **_R),
}  # fmt: skip

# torch.cuda.get_device_name() patterns, most specific first ("H100 PCIe" before "H100"; "L4" is not "L40S")
_NAME_PATTERNS = {
    r"\bA100\b": "a100",
    r"\bA10\b": "a10",
    r"\bL4\b": "l4",
    r"\bH100\b.*\bPCIe\b": "h100-pcie",
    r"\bH100\b": "h100",
    r"\bH200\b": "h200",
}
_ARCH_DEFAULT = {80: "a100", 86: "a10", 89: "l4", 90: "h100"}  # sm_NN names one representative GPU


class Unservable(RuntimeError):
    """A kernel has no launch configuration that fits the target (raised before any launch)."""


def lookup(name: str) -> Target:
    """A table target by key (``"l4"``), by architecture (``"sm_89"``, ``"89"``), or by product name."""
    key = name.strip().lower()
    if key in TARGETS:
        return TARGETS[key]
    m = re.fullmatch(r"(?:sm_?)?(\d{2,3})a?", key)
    if m and int(m.group(1)) in _ARCH_DEFAULT:
        return TARGETS[_ARCH_DEFAULT[int(m.group(1))]]
    found = match_name(name)
    if found is None:
        known = ", ".join(list(TARGETS) + [f"sm_{a}" for a in _ARCH_DEFAULT])
        raise ValueError(f"unknown GPU target {name!r}; known: {known}")
    return found


def match_name(device_name: str) -> Target | None:
    """The table entry whose pattern matches a CUDA device name (``"NVIDIA H100 80GB HBM3"``), else ``None``."""
    for pattern, key in _NAME_PATTERNS.items():
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return TARGETS[key]
    return None


_STATIC: ContextVar[Target | None] = ContextVar("dinfill_static_target", default=None)


@contextlib.contextmanager
def static_target(target: Target | str) -> Iterator[Target]:
    """Within the block, tensors on the ``meta`` device stand for tensors on ``target`` (the static GPU model)."""
    t = lookup(target) if isinstance(target, str) else target
    token = _STATIC.set(t)
    try:
        yield t
    finally:
        _STATIC.reset(token)


def static_active() -> Target | None:
    """The target set by :func:`static_target`, if any."""
    return _STATIC.get()


@functools.lru_cache(maxsize=16)
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    arch = 10 * props.major + props.minor
    base = match_name(props.name) or TARGETS.get(_ARCH_DEFAULT.get(arch, ""), None)
    measured = {}
    if base is None:  # an unknown GPU: limits from the driver, no datasheet columns
        base = Target(props.name, arch, props.multi_processor_count, 48 * KB, 64 * KB, 65536, 2048, 16, 0,
                      0.0, 0.0, 1.0e9)
    elif match_name(props.name) is None:  # a GPU of a known architecture but another product: no datasheet
        measured = dict(bandwidth=0.0, bf16_flops=0.0, measured_bandwidth=None, measured_bf16_flops=None)
    return replace(
        base,
        name=props.name,
        arch=arch,
        sms=props.multi_processor_count,
        smem_per_block=getattr(props, "shared_memory_per_block_optin", base.smem_per_block),
        smem_per_sm=getattr(props, "shared_memory_per_multiprocessor", base.smem_per_sm),
        regs_per_sm=getattr(props, "regs_per_multiprocessor", base.regs_per_sm),
        max_threads_per_sm=getattr(props, "max_threads_per_multi_processor", base.max_threads_per_sm),
        l2_bytes=getattr(props, "L2_cache_size", base.l2_bytes),
        **measured,
    )


def target_for(device: torch.device | str) -> Target | None:
    """The target of tensors on ``device``: the real GPU for CUDA, the static target for ``meta``, else ``None``.

    ``None`` means the kernels run in Triton's interpreter (CPU), whose launch parameters are chosen for
    the interpreter's cost model instead.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "meta":
        return _STATIC.get()
    return None


def pdl(device: torch.device | str) -> bool:
    """Whether the forward's Triton launches on ``device`` use programmatic dependent launch (``DINFILL_PDL=1``).

    Experimental, off by default. With it a kernel is launched while the previous one still runs: its
    programs wait (``griddepcontrol.wait``) until that kernel has finished and its writes are visible, then
    let the next one launch, so the launch latency between the two (~1.3 us a kernel in a graph replay, the
    largest cost of a batch-1 forward on an H100) overlaps the previous kernel instead of following it. The
    math is unchanged: every kernel still reads only what the previous ones finished writing. Off in the
    interpreter (nothing to overlap); below sm_90 refused before any launch, naming the GPU.
    """
    value = os.environ.get("DINFILL_PDL", "0")
    if value not in ("0", "1"):
        raise ValueError(f"DINFILL_PDL must be 0 or 1, got {value!r}")
    if value == "0":
        return False
    from dinfill.backend import triton_interpreted

    t = target_for(device)
    if t is None or (torch.device(device).type == "cuda" and triton_interpreted()):  # no griddepcontrol there
        return False
    if t.arch < PDL_MIN_ARCH:
        raise Unservable(
            f"DINFILL_PDL=1 on {t.name} (sm_{t.arch}): programmatic dependent launch needs sm_{PDL_MIN_ARCH} (Hopper) "
            "or newer; unset DINFILL_PDL"
        )
    return True
