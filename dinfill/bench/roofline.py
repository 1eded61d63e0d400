"""Roofline numbers: device peaks, the work a forward pass must do, and what a run achieved.

Why: a benchmark that prints only seconds cannot say whether a change helped or how much is left.
Every ``dinfill bench`` record therefore carries the FLOPs and the minimum bytes its model calls
needed (a model of the work, computed from the shapes the sampler ran, not hardware counters), the
achieved FLOP/s and bytes/s, and their fraction of the device's peak. Datasheet peaks are leads only:
:func:`measure_ceilings` times a large device-to-device copy and a large matrix product on the machine
at hand, and records prefer those when they were measured in the same run.

The work model (per forward call, matching :class:`dinfill.models.Decoder`):

* FLOPs: ``2 * (linear-layer weights) * tokens`` for the projections and MLPs, ``4 * Lq * Lk * Hq * D``
  per layer and row for attention (QK^T and PV), and ``2 * hidden * vocab`` per logits row.
* Bytes (the floor): every weight of the blocks read once, the lm_head matrix read once when any
  logits row is produced, the K/V that attention reads, and the logits written once in the model's dtype.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from dinfill.target import Target, match_name

__all__ = [
    "DevicePeaks",
    "device_name",
    "device_peaks",
    "forward_work",
    "Work",
    "measure_ceilings",
    "achieved",
]


DevicePeaks = Target  # the datasheet / measured ceilings are columns of the runtime's target table


def device_name(device: torch.device | str) -> str:
    """A human-readable device name: the CUDA product name, or ``cpu (N threads)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def device_peaks(name: str) -> Target | None:
    """The :data:`dinfill.target.TARGETS` entry whose pattern matches ``name`` (a CUDA device name), else ``None``."""
    return match_name(name)


@dataclass
class Work:
    """FLOPs and minimum bytes of some model calls (additive: ``a + b``)."""

    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.bytes + other.bytes)

    def scaled(self, factor: float) -> Work:
        """This work repeated ``factor`` times."""
        return Work(self.flops * factor, self.bytes * factor)


def forward_work(
    config,
    *,
    batch: int,
    queries: int,
    keys: int | None = None,
    logits_rows: int = 0,
    itemsize: int = 2,
    causal: bool = False,
) -> Work:
    """The work of one decoder forward call.

    Parameters
    ----------
    config : dinfill.models.ModelConfig
        Model shape.
    batch : int
        Rows of the batch.
    queries : int
        Tokens computed per row (the canvas width, the middle window, or 1 for an AR decode step).
    keys : int, optional
        Keys each query attends over (default ``queries``: no cache).
    logits_rows : int
        Logits rows produced in the whole batch (``0``: hidden states only).
    itemsize : int
        Bytes per element of weights and activations (2 for bf16/fp16, 4 for fp32).
    causal : bool
        Causal self-attention without a cache attends to half the keys on average.

    Returns
    -------
    Work
    """
    if batch < 1 or queries < 1:
        raise ValueError(f"forward_work needs batch >= 1 and queries >= 1, got {batch} and {queries}")
    keys = queries if keys is None else keys
    H, D, L = config.hidden_size, config.head_dim, config.num_layers
    V, Hq, Hkv = config.vocab_size, config.num_heads, config.num_kv_heads
    tokens = batch * queries
    # weights of the blocks (projections + MLP); the embedding is a gather of `tokens` rows
    block_weights = config.num_parameters() - V * H * (1 if config.tie_word_embeddings else 2)
    seen = keys / 2 if (causal and keys == queries) else keys  # mean keys per query
    flops = 2.0 * block_weights * tokens + 4.0 * L * Hq * D * tokens * seen + 2.0 * H * V * logits_rows
    kv_bytes = 2.0 * L * batch * Hkv * D * keys * itemsize  # K and V read once per layer
    head_bytes = V * H * itemsize if logits_rows else 0
    act_bytes = 2.0 * tokens * H * itemsize + logits_rows * V * itemsize  # embeddings in, logits out
    return Work(flops=flops, bytes=block_weights * itemsize + head_bytes + kv_bytes + act_bytes)


def sync(device: torch.device) -> None:
    """Wait for the device (a no-op on the CPU): the two sides of every wall-clock measurement here."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int, warmup: bool = True) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn``, synchronised on both sides (after one untimed
    call when ``warmup``: allocation, cuBLAS handles, compilation)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_ceilings(
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    *,
    copy_mb: int | None = None,
    matmul_n: int | None = None,
) -> dict[str, float]:
    """Measure the two ceilings of the roofline on ``device``.

    A large device-to-device copy (bytes read + bytes written per second) and a square matrix product
    in ``dtype`` (default bf16 on CUDA, fp32 on the CPU) on random data, median of a few repeats.
    Sizes default to 2 GiB / 8192 on CUDA (enough to fill an H100) and 256 MiB / 1024 on the CPU.

    Returns
    -------
    dict
        ``{"bandwidth": bytes/s, "flops": FLOP/s, "dtype": str}``.
    """
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    copy_mb = copy_mb or (2048 if on_gpu else 256)
    n = matmul_n or (8192 if on_gpu else 1024)
    bufs = {"src": torch.rand(copy_mb * 2**20 // 4, device=device)}  # random, never zeros (docs/gpu.md)
    bufs["dst"] = torch.empty_like(bufs["src"])
    t_copy = median_seconds(lambda: bufs["dst"].copy_(bufs["src"]), device, 5)
    bufs.clear()  # free the copy buffers before the matmul operands
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = median_seconds(lambda: a @ b, device, 5)
    return {"bandwidth": 2 * copy_mb * 2**20 / t_copy, "flops": 2.0 * n**3 / t_mm, "dtype": str(dtype).split(".")[-1]}


def achieved(
    work: Work, seconds: float, peaks: DevicePeaks | None = None, ceilings: dict[str, float] | None = None
) -> dict[str, float | str | None]:
    """Achieved FLOP/s and bytes/s of ``work`` done in ``seconds``, with fractions of the device peak.

    Fractions are of the datasheet peak (``*_of_peak``) and, when ``ceilings`` from
    :func:`measure_ceilings` are given, of the measured ceilings (``*_of_measured``). ``floor_s`` is the
    roofline floor ``max(bytes / bandwidth, flops / peak)`` on the best-known ceilings, ``floor_bound``
    which of the two sets it (``"bytes"`` or ``"flops"``).
    """
    if seconds <= 0 or not math.isfinite(seconds):
        raise ValueError(f"seconds must be a positive finite number, got {seconds!r}")
    out: dict[str, float | str | None] = {
        "flops": work.flops,
        "bytes": work.bytes,
        "flop_per_s": work.flops / seconds,
        "bytes_per_s": work.bytes / seconds,
    }
    bw = flops = None
    if peaks is not None:
        out["flops_of_peak"] = out["flop_per_s"] / peaks.bf16_flops
        out["bandwidth_of_peak"] = out["bytes_per_s"] / peaks.bandwidth
        bw, flops = peaks.measured_bandwidth or peaks.bandwidth, peaks.measured_bf16_flops or peaks.bf16_flops
    if ceilings:
        out["flops_of_measured"] = out["flop_per_s"] / ceilings["flops"]
        out["bandwidth_of_measured"] = out["bytes_per_s"] / ceilings["bandwidth"]
        bw, flops = ceilings["bandwidth"], ceilings["flops"]
    if bw and flops:
        out["floor_s"] = max(work.bytes / bw, work.flops / flops)
        out["floor_bound"] = "bytes" if work.bytes / bw >= work.flops / flops else "flops"
        out["of_floor"] = out["floor_s"] / seconds  # 1.0 = at the roofline
    return out


def peaks_dict(peaks: DevicePeaks | None) -> dict | None:
    """``asdict`` of a peaks entry (``None`` stays ``None``), for JSON records."""
    return None if peaks is None else asdict(peaks)
