"""Runner: generate, post-process, score and append one record per (problem, seed, sample); resumable and sharded.

Why it is built this way:

- The runner only needs a small callable (:class:`InfillGenerator`): tests drive it with fake
  generators, and the CLI builds the real one from ``dinfill.load_model`` and ``dinfill.sampler.infill``.
- Work is cut into fixed batches of the problem list per (seed, sample), and each batch gets its own
  generator seed derived from (seed, sample, batch number). A batch therefore produces the same
  middles whether the run is fresh, resumed, or spread over any number of ranks (given a sampler
  whose output does not depend on the batch's neighbours beyond that).
- Records are appended with an fsync as soon as a batch is scored (:mod:`dinfill.eval.records`).
  A restarted run reads what exists and redoes only missing records of the batches it owns.
- Under ``torchrun`` (``WORLD_SIZE > 1``) ranks take batches round-robin, each writes
  ``records.rank{r}.jsonl``, and after a barrier rank 0 merges them into ``records.jsonl`` and writes
  the summary. torch.distributed (gloo: only barriers are needed) does the coordination.
- Summaries and tables are computed from the records alone (:mod:`dinfill.eval.report`), so what a report
  says about cost must be in the records too: a generator may report, per call, the tokens it generated
  (``last_tokens``), the peak device memory (``last_peak_memory``) and the CUDA-graph capture time
  (``last_capture_s``), and once the environment it runs in (``environment``: device, dtype, versions); each
  record carries its share of its batch's numbers and that environment.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from dinfill.eval.execution import Sandbox, SandboxConfig, SandboxInterrupted, available_cores
from dinfill.eval.postprocess import PostProcess
from dinfill.eval.records import (
    RECORDS,
    RUN_FILE,
    RecordWriter,
    RunLock,
    check_run_file,
    load_records,
    note_sandbox,
    read_run_identity,
    record_key,
    write_records_atomically,
)
from dinfill.eval.tasks.base import KINDS, Task


@runtime_checkable
class InfillGenerator(Protocol):
    """What the runner needs from a model: fill a batch of holes.

    ``kind`` (``"diffusion"`` or ``"ar"``) picks the prompt format. The call gets the prefixes and
    suffixes as the model should see them, the canonical middles (used only by the diffusion
    sampler's oracle length mode) and the batch's seed, and returns one middle per hole.
    """

    kind: str

    def __call__(
        self, prefixes: list[str], suffixes: list[str], middles: list[str], *, seed: int
    ) -> list[str]: ...  # pragma: no cover - protocol


def generated_tokens(stats: Sequence) -> int:
    """Tokens a sampler generated over a call's statistics (``infill(..., return_stats=True)``).

    Diffusion: every canvas position it filled (all candidates of ``length="search"``, untrimmed middles of
    ``adaptive``); AR: every new token decoded, stop tokens included. Either way the work done, not the length
    of the text kept.
    """
    total = 0
    for st in stats:
        if hasattr(st, "revealed_per_step"):
            total += sum(st.revealed_per_step) + st.masks_left
        else:
            total += int(st.new_tokens)
    return total


def generator_environment(model) -> dict:
    """What a record says about where it was generated: device, dtype, weights and versions (no date: the
    record has its own time stamp)."""
    from dinfill.bench.report import environment

    param = next(model.parameters(), None) if hasattr(model, "parameters") else None
    env = environment(param.device if param is not None else "cpu")
    env.pop("date", None)
    dtype = param.dtype if param is not None else None
    env.update(
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
        random_weights=bool(getattr(model, "random_weights", False)),
    )
    return env


@dataclass
class FunctionGenerator:
    """Wrap a plain function ``fn(prefixes, suffixes, middles, seed=...)`` as an :class:`InfillGenerator`."""

    fn: object
    kind: str = "diffusion"

    def __call__(self, prefixes: list[str], suffixes: list[str], middles: list[str], *, seed: int) -> list[str]:
        return self.fn(prefixes, suffixes, middles, seed=seed)


@dataclass
class RunSpec:
    """Everything that defines a run (and must match when it is resumed).

    Parameters
    ----------
    task : Task
        The benchmark (with its subset and data source).
    model : str
        Model name written into every record.
    kind : str
        ``diffusion`` or ``ar``.
    sampler : dict
        Sampler settings written into every record (``length`` is the middle-length mode for diffusion).
    postprocess : PostProcess
        Rule applied to every middle before scoring.
    seeds : sequence of int
        One full pass over the problems per seed.
    samples : int
        Samples per problem and seed (pass@k for k <= samples).
    batch_size : int
        Holes per generator call; part of the run's identity because it fixes the batches' seeds.
    limit : int, optional
        Only the first ``limit`` problems (smoke tests).
    execute : bool
        Run programs in the sandbox (pass@1); off: exact match only / nothing to score for HumanEval.
    """

    task: Task
    model: str
    kind: str
    sampler: dict = field(default_factory=dict)
    postprocess: PostProcess | None = None
    seeds: Sequence[int] = (0,)
    samples: int = 1
    batch_size: int = 16
    limit: int | None = None
    execute: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {KINDS}")
        if self.postprocess is None:
            self.postprocess = self.task.default_postprocess
        if self.samples < 1 or self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("samples, batch_size and limit must be >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list without repeats, got {list(self.seeds)}")
        if self.execute and not self.task.can_execute():
            raise ValueError(f"{self.task.name} {self.task.subset} cannot be executed (not Python); pass --no-execute")

    def identity(self) -> dict:
        """Settings a resumed run must share with the records already in its folder."""
        return {
            "task": self.task.name,
            "subset": self.task.subset,
            "model": self.model,
            "kind": self.kind,
            "sampler": self.sampler,
            "postprocess": self.postprocess.to_dict(),
            "batch_size": self.batch_size,
            "execute": self.execute,
        }


@dataclass
class DistContext:
    """Rank layout of this process; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> DistContext:
        """Read torchrun's variables and join the process group (gloo) when there are several ranks."""
        # torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE and the rendezvous address.
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            # Only barriers cross ranks, so gloo works on CPU and GPU hosts alike; generation may take
            # hours on one rank while another waits, hence the long timeout.
            dist.init_process_group(backend="gloo", timeout=_dt.timedelta(hours=24))
        return cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        )

    def barrier(self) -> None:
        """Wait for every rank; a no-op for one process or without a process group.

        Without a process group (ranks started by hand as separate jobs on a shared folder) nothing
        synchronises them: run rank 0 last, and it merges what the others wrote.
        """
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()

    def close(self) -> None:
        """Leave the process group (if this process joined one)."""
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


@dataclass(frozen=True)
class Batch:
    """A fixed slice of the problem list for one (seed, sample)."""

    seed: int
    sample: int
    number: int
    indices: tuple[int, ...]

    @property
    def generator_seed(self) -> int:
        """Seed handed to the generator: a stable hash of (seed, sample, batch number)."""
        # Python's hash() is salted per process; sha256 gives every rank and every restart the same seed.
        digest = hashlib.sha256(f"{self.seed}:{self.sample}:{self.number}".encode()).hexdigest()
        return int(digest[:15], 16)


def plan_batches(n_problems: int, seeds: Sequence[int], samples: int, batch_size: int) -> list[Batch]:
    """All batches of a run in a fixed order (independent of ranks and of what is already done)."""
    batches = []
    for seed in seeds:
        for sample in range(samples):
            # Batches never straddle (seed, sample): a batch has one generator seed.
            for number, start in enumerate(range(0, n_problems, batch_size)):
                batches.append(Batch(seed, sample, number, tuple(range(start, min(start + batch_size, n_problems)))))
    return batches


def run_progress(spec: RunSpec, out_dir: str | os.PathLike) -> dict:
    """How far a run folder is with ``spec``, read without a model or the folder's lock.

    Returns
    -------
    dict
        ``done`` (records of the run's plan already on disk), ``expected`` (records the plan holds), ``complete``
        and ``conflict``: a message when the folder holds records of a run with other settings (``run_eval``
        would refuse it), else None. A command that must redo nothing (``dinfill compare``) skips a run only
        when it is complete and without conflict.
    """
    out = Path(out_dir)
    task = spec.task
    problems = task.problems()[: spec.limit]
    expected = {
        (problems[i].task_id, batch.seed, batch.sample)
        for batch in plan_batches(len(problems), spec.seeds, spec.samples, spec.batch_size)
        for i in batch.indices
    }
    records = load_records(out) if out.is_dir() else []
    conflict = None
    recorded = read_run_identity(out) if out.is_dir() else None
    identity = {**spec.identity(), "dataset_sha256": task.dataset_sha256()}
    if records and recorded != identity:
        changed = sorted(k for k in set(recorded or {}) | set(identity) if (recorded or {}).get(k) != identity.get(k))
        conflict = f"{out} holds a different run (differs in {', '.join(changed)}); use another --out"
    done = len(expected & {record_key(r) for r in records})
    return {"done": done, "expected": len(expected), "complete": done == len(expected) and not conflict,
            "conflict": conflict}  # fmt: skip


def run_eval(
    spec: RunSpec,
    generator: InfillGenerator,
    out_dir: str | os.PathLike,
    sandbox_config: SandboxConfig | None = None,
    jobs: int | None = None,
    progress: bool = True,
    dist: DistContext | None = None,
    lock: RunLock | None = None,
) -> dict | None:
    """Run (or resume) an evaluation into ``out_dir``; rank 0 returns the summary, other ranks None.

    Parameters
    ----------
    spec : RunSpec
        What to run.
    generator : InfillGenerator
        Fills the holes; its ``kind`` must match ``spec.kind``.
    out_dir : path
        Run folder: ``run.json``, ``records.jsonl`` (``records.rank{r}.jsonl`` per rank), ``summary.json``
        and ``summary.md``.
    sandbox_config : SandboxConfig, optional
        Limits for executed programs.
    jobs : int, optional
        Programs at once on this rank (default: the cores shared by the ranks on this host).
    progress : bool
        Show progress bars.
    dist : DistContext, optional
        Rank layout; read from the torchrun environment when None.
    lock : RunLock, optional
        The folder's lock, already held by the caller (the CLI takes it before loading a model);
        taken here and released at the end when None.

    Raises
    ------
    RunFolderBusy
        Another process is writing ``out_dir``.
    ValueError
        ``out_dir`` holds records of a run with other settings.
    """
    if getattr(generator, "kind", spec.kind) != spec.kind:
        raise ValueError(f"generator kind {generator.kind!r} differs from the run's kind {spec.kind!r}")
    ctx = dist or DistContext.from_env()
    out = Path(out_dir)
    task = spec.task
    problems = task.problems()[: spec.limit]
    identity = {**spec.identity(), "dataset_sha256": task.dataset_sha256()}
    # One writer per folder (per rank under torchrun), for the whole run; the kernel frees it if we die.
    held = lock or RunLock(out, ctx.rank, ctx.world_size).acquire()
    try:
        return _run_locked(spec, generator, out, problems, identity, sandbox_config, jobs, progress, ctx)
    finally:
        if lock is None:
            held.release()


def _run_locked(
    spec: RunSpec,
    generator: InfillGenerator,
    out: Path,
    problems: list,
    identity: dict,
    sandbox_config: SandboxConfig | None,
    jobs: int | None,
    progress: bool,
    ctx: DistContext,
) -> dict | None:
    """The body of :func:`run_eval`, with the folder's lock held."""
    from tqdm.auto import tqdm

    from dinfill.eval.report import summarize_run, write_summary

    task = spec.task
    # Rank 0 records run.json (or refuses a folder holding another run); every rank then checks its own settings.
    if ctx.rank == 0:
        check_run_file(out, identity)
    ctx.barrier()
    recorded = read_run_identity(out)
    if recorded is not None and recorded != identity:
        raise ValueError(f"rank {ctx.rank}'s settings differ from those rank 0 recorded in {out / RUN_FILE}")

    # Resume: whatever any rank recorded before (with any world size) is not redone.
    done = {record_key(r) for r in load_records(out)}
    batches = plan_batches(len(problems), spec.seeds, spec.samples, spec.batch_size)[ctx.rank :: ctx.world_size]
    # One file per writer: appends from several processes never interleave.
    name = RECORDS if ctx.world_size == 1 else f"records.rank{ctx.rank}.jsonl"
    sandbox = None
    if spec.execute:
        # Ranks on one host share its cores, so together they never run more programs than cores.
        share = jobs or max(1, available_cores() // max(1, ctx.local_world_size))
        sandbox = Sandbox(sandbox_config, jobs=share)
    try:
        if sandbox is not None:
            # Fail closed before hours of generation: a broken sandbox must not score everything as failed.
            sandbox.self_check()
            if ctx.rank == 0:
                note_sandbox(out, sandbox.label)
        with RecordWriter(out / name) as writer:
            desc = f"{task.name} rank {ctx.rank}"
            for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch", position=ctx.local_rank):
                todo = [i for i in batch.indices if (problems[i].task_id, batch.seed, batch.sample) not in done]
                if todo:
                    _run_batch(spec, generator, problems, batch, todo, sandbox, writer, ctx)
    finally:
        if sandbox is not None:
            sandbox.close()
    ctx.barrier()
    if ctx.rank != 0:
        return None
    records = load_records(out)
    # The merged view; the rank files stay as the append-only logs they are.
    if ctx.world_size > 1:
        write_records_atomically(out / RECORDS, records)
    summary = summarize_run(records)
    write_summary(out, summary)
    return summary


def score_keeping_finished(task, problems: list, completions: list[str], postprocess, sandbox) -> tuple:
    """``task.score`` of a batch, except that Ctrl-C in it still scores the programs that finished.

    Returns
    -------
    keep : list of int
        Positions in the batch that were scored (all of them unless interrupted).
    scored : list
        ``task.score``'s result for those positions.
    stop : SandboxInterrupted or None
        The interrupt, for the caller to raise once it has recorded ``scored``.
    """
    try:
        return list(range(len(problems))), task.score(problems, completions, postprocess, sandbox), None
    except SandboxInterrupted as interrupt:
        keep = interrupt.finished()
        chosen, texts = [problems[k] for k in keep], [completions[k] for k in keep]
        return keep, task.score(chosen, texts, postprocess, interrupt.replay()), interrupt


def _run_batch(
    spec: RunSpec,
    generator: InfillGenerator,
    problems: list,
    batch: Batch,
    todo: list[int],
    sandbox: Sandbox | None,
    writer: RecordWriter,
    ctx: DistContext,
) -> None:
    """Generate the whole batch (so its seed gives the same middles as in any other run), score and append ``todo``."""
    task = spec.task
    chosen = [problems[i] for i in batch.indices]
    prefixes = [task.prefix(p, spec.kind) for p in chosen]
    suffixes = [task.suffix(p, spec.kind) for p in chosen]
    start = time.perf_counter()
    # The canonical middles are for the oracle length mode only; generators must not copy them.
    middles = generator(prefixes, suffixes, [p.canonical for p in chosen], seed=batch.generator_seed)
    generate_s = time.perf_counter() - start
    # CUDA-graph captures inside this call (a generator that keeps graphs per shape bucket says how long they
    # took): the first batch of each bucket pays them, so the report can show the steady throughput too.
    capture_s = min(generate_s, max(0.0, float(getattr(generator, "last_capture_s", 0.0) or 0.0)))
    # What the generator can say about its cost (None when it cannot: a custom generator, or the CPU's memory)
    tokens = getattr(generator, "last_tokens", None)
    peak = getattr(generator, "last_peak_memory", None)
    env = getattr(generator, "environment", None)
    if not isinstance(middles, list) or len(middles) != len(chosen) or not all(isinstance(m, str) for m in middles):
        raise TypeError(f"the generator must return a list of {len(chosen)} strings, got {type(middles).__name__}")
    # Only the missing problems are scored and written; the rest of the batch is already on disk.
    by_index = dict(zip(batch.indices, middles, strict=True))
    start = time.perf_counter()
    # Ctrl-C while scoring: what finished is recorded (a resumed run does not redo it), then the run stops.
    keep, scored, stop = score_keeping_finished(
        task, [problems[i] for i in todo], [by_index[i] for i in todo], spec.postprocess, sandbox
    )
    todo = [todo[k] for k in keep]
    score_s = time.perf_counter() - start
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for i, (processed, outcome) in zip(todo, scored, strict=True):
        writer.append(
            {
                "task": task.name,
                "subset": task.subset,
                "task_id": problems[i].task_id,
                "index": i,
                "seed": batch.seed,
                "sample": batch.sample,
                "model": spec.model,
                "kind": spec.kind,
                "sampler": spec.sampler,
                "postprocess": spec.postprocess.to_dict(),
                "completion": by_index[i],
                "processed": processed,
                "outcome": outcome,
                "timings": {
                    # Each record's share of the batch, so that sums over records give the generation time.
                    "generate_s": round(generate_s / len(chosen), 6),
                    "batch_generate_s": round(generate_s, 6),
                    "graph_capture_s": round(capture_s / len(chosen), 6),
                    "batch_size": len(chosen),
                    "score_s": round(score_s / len(todo), 6),
                    "tokens": None if tokens is None else round(tokens / len(chosen), 3),
                    "peak_memory_bytes": peak,  # the batch's peak (device memory), not a share
                },
                "task_size": len(problems),
                "rank": ctx.rank,
                "time": stamp,
                **({"env": env} if env is not None else {}),
            }
        )
    if stop is not None:
        raise stop
