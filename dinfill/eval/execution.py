"""Execution sandbox: run untrusted, model-written programs and say, with a typed result, whether they passed.

Why this exists: HumanEval-Infill is scored by running what a model wrote, and model output can
loop forever, fork, allocate without bound, fill the disk, delete files, or call ``sys.exit(0)``
before the checks (which a naive harness counts as a pass). Each program gets a fresh, isolated
process, and the evaluator believes only a report that the process writes after ``exec`` returned.

How a program runs: each parallel slot has a small fork server (``_sandbox_server.py``, started
once per slot with ``python -I -B -u``) that forks a fresh process per program. That process gets a
new session, a new pid namespace whose pid 1 is a reaper, new mount and IPC namespaces, the slot's
memory cgroup, resource limits, ``no_new_privs``, an unprivileged uid of its own, ``/dev/null`` as
stdin and a scrubbed environment, and runs the program with ``exec`` in a fresh global namespace
(``__name__`` is not ``"__main__"``, as in the human-eval harness whose published counts we
reproduce). The evaluator drains stdout, stderr and the two report pipes with caps, enforces the
wall clock, kills the process group and has the server reap it. Forking from a server spares each
program an interpreter start-up with its imports (30-60 ms on a 2-core CI machine; the namespaces
cost about 1.5 ms per program), which matters when a re-scoring runs thousands of programs.

Covered (full isolation: Linux >= 5.12, root or CAP_SYS_ADMIN, a cgroup memory controller)
-----------------------------------------------------------------------------------------
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
- fresh process per program, own session and process group; stdin is ``/dev/null`` and
  ``sys.stdin`` is closed; environment scrubbed (PATH, HOME = TMPDIR = cwd = ``/tmp/work``, C.UTF-8);
- CPU time: ``RLIMIT_CPU`` (default 3 s, so results do not depend on machine load), plus a looser
  wall clock (default ``3 * cpu + 1`` s) for programs that sleep; timeouts kill the whole group;
- never more programs at once than cores (:func:`available_cores`); identical programs run once;
- memory: ``RLIMIT_AS`` per process (default 2 GiB: a huge allocation is ``MemoryError`` -> ``oom``)
  and the same cap for the program as a whole (all its processes, its tmpfs files and shared
  memory) through a memory cgroup per slot: cgroup v2 where the evaluator's cgroup can have a child
  with the memory controller (the OOM killer then stops the whole program), else cgroup v1's memory
  controller (it stops the largest process); any OOM kill in it makes the row ``oom``
  (:attr:`Sandbox.memory_scope` says which applies);
- processes: ``RLIMIT_NPROC`` (default 16) for the slot's uid stops fork bombs; every slot has its
  own uid, so one slot's fork bomb cannot starve another; when the program ends, the reaper (pid 1
  of its pid namespace) exits and the kernel kills everything the program left, daemons that
  ``setsid`` and double-fork included; ``/proc`` is a fresh instance of that pid namespace, so the
  program sees only its own processes (and the reaper), not the host's;
- files: the program sees every file system read-only (its own ``/proc`` aside), except private
  tmpfs on ``/tmp``, ``/var/tmp``, ``/dev/shm`` and ``/run/lock`` (``tmp_bytes`` each, at most 16384
  inodes) that disappear with it; ``RLIMIT_FSIZE`` caps files, ``RLIMIT_NOFILE`` descriptors;
- IPC: a private IPC namespace per program: SysV shared memory, semaphores and message queues die
  with it (POSIX shared memory lives in its private ``/dev/shm``);
- output: stdout and stderr are drained continuously (a flood cannot block the child) and only the
  first ``max_output_bytes`` of each are kept;
- privileges: as root, programs run as unused uids (no passwd entry, no process, ``flock``-ed per
  evaluator) with no supplementary groups and ``no_new_privs`` (setuid binaries gain nothing): they
  cannot signal the evaluator or the fork server, nor read, delete or overwrite the user's files
  (in 0700 directories); a 0700 home that holds the interpreter (pyenv in /root) is covered by an
  empty tmpfs and only the interpreter's directories are bound back;
- network: an empty network namespace (``unshare(CLONE_NEWNET)``); every result says whether it was isolated.

Where the machine cannot provide a requested feature (not root, a container without
CAP_SYS_ADMIN, a kernel before 5.12), the sandbox refuses to start and says what is missing and
why, unless weaker isolation is allowed explicitly (``SandboxConfig(allow_weaker_isolation=True)``,
``--allow-weak-sandbox`` on the command line, ``DINFILL_ALLOW_WEAK_SANDBOX=1`` in the environment);
it then logs a warning naming what is missing. The memory cap is the exception: without a usable
cgroup it falls back to the per-process limit, so a program can use ``memory_bytes * max_processes``
(also logged).

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
- with weaker isolation (only when allowed): without a mount namespace the cwd is a temporary
  directory removed afterwards (depth-safe, bounded; a leftover makes the row ``crashed`` and is
  retried at :meth:`Sandbox.close`), files written to world-writable places outside it persist and
  the host's ``/proc`` is visible; without an IPC namespace SysV segments outlive the program;
  not root: programs run as the evaluator's user and could signal it or touch its files, and
  ``RLIMIT_NPROC`` counts all the user's processes; no network namespace: the network is reachable
  (each result says so); no pid namespace: leftovers are killed by the subreaper when the program ends;
- world-readable files (the dataset, ``/etc``) stay readable; no seccomp filter (the whole system-call
  surface is reachable: a kernel exploit escapes everything above); CPU is bounded per process by
  rlimits, so a fork bomb's 16 processes can use 16 x the CPU limit within the wall clock;
- programs of one slot share the fork server's interpreter state as it was at start-up (its hash seed
  and imported standard-library modules; ``random`` is never imported there, so it is seeded per program).

Threads in the evaluator only wait on pipes and sockets; no ``preexec_fn`` is used (unsafe with
threads): all privileged set-up happens in the fork server, a single-threaded process.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hmac
import logging
import os
import pwd
import queue
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from ast import literal_eval
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
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
# Isolation features a SandboxConfig can ask for, with how a refusal names them.
_FEATURES = {
    "drop_privileges": "an unprivileged uid per slot",
    "pid_namespace": "a pid namespace per program",
    "isolate_network": "an empty network namespace",
    "ipc_namespace": "an IPC namespace per program",
    "private_filesystem": "a read-only root with a private /tmp, /var/tmp, /dev/shm, /run/lock and /proc",
}


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
        ``RLIMIT_CPU`` per program (the human-eval timeout, 3 s), rounded up to whole seconds;
        exceeding it is ``timeout``.
    wall_seconds : float or None
        Wall-clock bound; ``None`` means ``3 * cpu_seconds + 1`` (looser, for sleeping programs).
    memory_bytes : int or None
        ``RLIMIT_AS`` per process, and the memory cgroup cap of the whole program where a cgroup is
        available; ``None`` switches both off (not recommended).
    max_processes : int
        ``RLIMIT_NPROC`` for the slot uid (fork bombs).
    max_output_bytes : int
        Bytes of stdout and of stderr kept per program; the rest is read and dropped.
    max_file_bytes : int
        ``RLIMIT_FSIZE``: the largest file a program may write.
    max_open_files : int
        ``RLIMIT_NOFILE``.
    tmp_bytes : int
        Size of each private tmpfs (``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock``).
    isolate_network : bool
        Run programs in an empty network namespace.
    pid_namespace : bool
        Run each program as pid 2 of a new pid namespace whose pid 1 is a reaper, so that everything
        the program started dies with it; without it the fork server (a subreaper) kills leftovers.
    ipc_namespace : bool
        A private IPC namespace per program (SysV shared memory dies with it).
    private_filesystem : bool
        A mount namespace per program: every mount read-only, private size-capped tmpfs for the
        writable places, a fresh ``/proc`` (with ``pid_namespace``).
    drop_privileges : bool
        When running as root, run programs as dedicated unprivileged uids (strongly recommended).
    allow_weaker_isolation : bool
        Run even when the machine cannot provide a feature asked for above (not root, no namespaces);
        off by default (unless the environment sets ``DINFILL_ALLOW_WEAK_SANDBOX=1``, for commands
        without the ``--allow-weak-sandbox`` flag), so that a sandbox never silently isolates less
        than it says.
    uid_range : tuple of int
        Half-open range searched for free uids (no passwd entry, no process, not locked).
    python : str
        Interpreter of the fork servers (the evaluator's own by default).
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

    def requested(self) -> list[str]:
        """The isolation features this configuration asks for (keys of the refusal messages)."""
        return [name for name in _FEATURES if getattr(self, name)]


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
        CPU seconds used by the program and wall-clock seconds until it ended.
    stdout, stderr : str
        Heads of the program's output, capped at ``max_output_bytes`` each.
    network_isolated : bool
        Whether the program ran in an empty network namespace.
    """

    status: str
    detail: str = ""
    returncode: int | None = None
    cpu_s: float = 0.0
    wall_s: float = 0.0
    stdout: str = ""
    stderr: str = ""
    network_isolated: bool = False

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


# -- processes seen through /proc --------------------------------------------------------------
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
    """Real uids of every process (zombies included: their uid is still taken)."""
    return {status[0] for status in map(_proc_status, _pids()) if status is not None}


def _uid_has_live_processes(uid: int) -> bool:
    return any(s is not None and s[0] == uid and s[1] not in "ZX" for s in map(_proc_status, _pids()))


def _lock_dir() -> str:
    """A directory for the per-uid lock files that only this user can write."""
    # Per user, and refused if someone else could have created it (a program could, in /tmp).
    path = os.path.join(tempfile.gettempdir(), f"dinfill-sandbox-locks-{os.geteuid()}")
    os.makedirs(path, mode=0o755, exist_ok=True)
    info = os.lstat(path)
    if info.st_uid != os.geteuid() or info.st_mode & 0o022 or not os.path.isdir(path):
        raise RuntimeError(
            f"sandbox lock directory {path} is not a directory owned by uid {os.geteuid()} and closed to "
            "others; remove it (something else created it) and retry"
        )
    return path


# -- memory cgroups ----------------------------------------------------------------------------
def _cgroup_parents() -> list[tuple[int, str]]:
    """(version, directory of this process's own cgroup) for cgroup v2, then v1's memory hierarchy."""
    mounts: dict[int, tuple[str, str]] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            for line in handle:
                left, _, right = line.partition(" - ")
                fields, kind = left.split(), right.split()
                if len(fields) < 5 or len(kind) < 3:
                    continue
                if kind[0] == "cgroup2":
                    mounts.setdefault(2, (fields[4], fields[3]))
                elif kind[0] == "cgroup" and "memory" in kind[2].split(","):
                    mounts.setdefault(1, (fields[4], fields[3]))
        paths: dict[int, str] = {}
        with open("/proc/self/cgroup", encoding="utf-8") as handle:
            for line in handle:
                hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
                if hierarchy == "0" and not controllers:
                    paths[2] = path
                elif "memory" in controllers.split(","):
                    paths[1] = path
    except (OSError, ValueError):
        return []
    found = []
    for version in (2, 1):
        if version in mounts and version in paths:
            mountpoint, root = mounts[version]
            path = paths[version]
            # A mount of a sub-tree (containers) shows the cgroup paths below its root.
            if root != "/" and (path == root or path.startswith(root + "/")):
                path = path[len(root) :]
            found.append((version, os.path.join(mountpoint, path.lstrip("/"))))
    return found


class _MemoryCgroup:
    """A memory cgroup for one slot: its cap covers everything a program starts, its tmpfs files and shared memory."""

    def __init__(self, path: str, version: int) -> None:
        self.path, self.version = path, version
        self.procs = os.path.join(path, "cgroup.procs")

    @classmethod
    def create(cls, name: str, limit: int) -> tuple[_MemoryCgroup | None, str]:
        """A child of this process's cgroup with ``limit`` bytes, or (None, why not)."""
        reasons = []
        for version, parent in _cgroup_parents():
            _remove_stale_cgroups(parent)
            path = os.path.join(parent, name)
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                reasons.append(f"cgroup v{version}: cannot create {path} ({exc.strerror})")
                continue
            try:
                if version == 2:
                    if not os.path.exists(os.path.join(path, "memory.max")):
                        # Fails (EBUSY) when the parent holds processes itself: v2's no-internal-process rule.
                        _write(os.path.join(parent, "cgroup.subtree_control"), "+memory")
                    _write(os.path.join(path, "memory.max"), str(limit))
                    _write(os.path.join(path, "memory.swap.max"), "0", optional=True)
                    # Kill the whole program at the cap, not just one of its processes.
                    _write(os.path.join(path, "memory.oom.group"), "1", optional=True)
                else:
                    _write(os.path.join(path, "memory.limit_in_bytes"), str(limit))
                    _write(os.path.join(path, "memory.memsw.limit_in_bytes"), str(limit), optional=True)
                group = cls(path, version)
                if group.oom_kills() is None:
                    raise OSError(f"{path} does not count OOM kills (kernel before 4.13)")
                return group, ""
            except OSError as exc:
                reasons.append(f"cgroup v{version} at {parent}: {exc}")
                _rmdir_quietly(path)
        return None, "; ".join(reasons) or "no cgroup file system with a memory controller is mounted"

    def oom_kills(self) -> int | None:
        """How many processes the kernel killed in this cgroup for going over its cap so far."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            with open(os.path.join(self.path, name), encoding="ascii") as handle:
                for line in handle:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return None

    def remove(self) -> None:
        """Remove the cgroup (its processes are gone; the kernel may need a moment to let go)."""
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)


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


def _remove_stale_cgroups(parent: str) -> None:
    """Remove the slot cgroups of evaluators that died without cleaning up (their name holds the pid)."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith("dinfill-sandbox-")]
    except OSError:
        return
    for name in names:
        try:
            os.kill(int(name.split("-")[2]), 0)
        except ProcessLookupError:
            _rmdir_quietly(os.path.join(parent, name))
        except (ValueError, IndexError, PermissionError):
            continue


# -- one slot ----------------------------------------------------------------------------------
class _Server:
    """One slot: its uid (None when privileges are not dropped), uid lock, memory cgroup and fork server."""

    def __init__(self, sandbox: Sandbox, index: int, uid: int | None, lock_fd: int | None) -> None:
        self.sandbox, self.index, self.uid, self.lock_fd = sandbox, index, uid, lock_fd
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.home: str | None = None
        self.cgroup: _MemoryCgroup | None = None
        self.network_isolated = False
        self.private_filesystem = False

    def setup_message(self) -> dict:
        cfg, features = self.sandbox.config, self.sandbox.features
        # With its own uid a slot may have max_processes; without, the user's existing ones count too.
        nproc = cfg.max_processes if self.uid is not None else self.sandbox.nproc_base + cfg.max_processes
        return {
            "uid": self.uid,
            "gid": self.uid,
            "isolate_network": "isolate_network" in features,
            "pid_namespace": "pid_namespace" in features,
            "ipc_namespace": "ipc_namespace" in features,
            "private_filesystem": "private_filesystem" in features,
            "cgroup_procs": self.cgroup.procs if self.cgroup else None,
            "cpu_limit": cfg.cpu_limit,  # whole seconds, rounded up once (SandboxConfig.cpu_limit)
            "memory_bytes": cfg.memory_bytes,
            "max_file_bytes": cfg.max_file_bytes,
            "max_open_files": cfg.max_open_files,
            "max_processes": nproc,
            "tmp_bytes": cfg.tmp_bytes,
            "tmp_inodes": 16384,
            "keep_paths": [tempfile.gettempdir()],
        }

    def start(self) -> None:
        """Start the fork server, let it build the namespaces its programs share and probe the rest."""
        cfg = self.sandbox.config
        why_not = ""
        if cfg.memory_bytes is not None and self.sandbox.memory_scope != "per-process":
            name = f"dinfill-sandbox-{os.getpid()}-{self.index}"
            self.cgroup, why_not = _MemoryCgroup.create(name, cfg.memory_bytes)
        # A unix socket, because the pipes of each program travel to the server as file descriptors.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.home = tempfile.mkdtemp(prefix="dinfill-sandbox-server-")
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
            self.stop()  # removes the folder and cgroup made above
            raise RuntimeError(f"could not start the sandbox server with {cfg.python}: {exc}") from exc
        finally:
            theirs.close()
        self.sock = ours
        try:
            _wire.send_message(ours, self.setup_message())
            reply, _ = _wire.recv_message(ours)
        except (OSError, EOFError) as exc:
            with open(log, "rb") as handle:
                tail = handle.read()[-2000:].decode("utf-8", "replace").strip()
            self.stop()
            raise RuntimeError(f"the sandbox server exited during set-up ({exc!r}): {tail or 'no output'}") from exc
        state = reply[1]
        if state["error"]:
            self.stop()
            raise RuntimeError(f"sandbox set-up failed: {state['error']}")
        self.network_isolated = bool(state["network_isolated"])
        errors = dict(state["isolation_errors"])
        if "isolate_network" in self.sandbox.features and not self.network_isolated:
            errors["isolate_network"] = "unshare(CLONE_NEWNET) failed"
        if "cgroup_procs" in errors:  # the cap falls back to the per-process limit (see the module docstring)
            why_not = errors.pop("cgroup_procs")
            self.cgroup.remove()
            self.cgroup = None
        self.private_filesystem = "private_filesystem" in self.sandbox.features and "private_filesystem" not in errors
        if errors:
            if not cfg.allow_weaker_isolation:
                self.stop()
                raise SandboxUnavailable(_refusal(errors))
            self.sandbox.weakened.update(errors)
            _log.warning("sandbox slot %d runs with weaker isolation (allowed): %s", self.index, _listing(errors))
        if self.sandbox.memory_scope is None:  # decided by the first slot that started
            self.sandbox.memory_scope = f"cgroup{self.cgroup.version}" if self.cgroup else "per-process"
            if cfg.memory_bytes is not None and self.cgroup is None:
                _log.warning(
                    "sandbox memory cap is per process here (no usable memory cgroup: %s): a program's processes "
                    "together may use up to %d x %d MiB",
                    why_not,
                    cfg.max_processes,
                    cfg.memory_bytes // 1024**2,
                )

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
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None

    def request(self, message: tuple, fds: tuple = (), timeout: float | None = None) -> tuple:
        # Started by Sandbox.run (so that its set-up errors propagate), never lazily here.
        self.sock.settimeout(timeout)
        _wire.send_message(self.sock, message, fds)
        reply, _ = _wire.recv_message(self.sock)
        return reply


def _listing(missing: dict[str, str]) -> str:
    return "; ".join(f"{_FEATURES.get(name, name)} ({reason})" for name, reason in missing.items())


def _refusal(missing: dict[str, str]) -> str:
    items = _listing(missing)
    return (
        f"the sandbox cannot provide {items}. Run as root on Linux >= 5.12 (CI does), or accept weaker "
        "isolation explicitly: --allow-weak-sandbox on the command line, DINFILL_ALLOW_WEAK_SANDBOX=1 in the "
        "environment, or SandboxConfig(allow_weaker_isolation=True) (dinfill.eval.execution lists what is "
        "then not covered)"
    )


class Sandbox:
    """A pool of sandbox slots that runs programs in parallel, at most one per core.

    Use as a context manager (the slots' uids stay locked and their fork servers alive until it
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
        When an isolation feature asked for cannot be provided and weaker isolation is not allowed
        (here for what needs root; :meth:`run` and :meth:`self_check` for what the first fork server finds).
    """

    def __init__(self, config: SandboxConfig | None = None, jobs: int | None = None, memo: bool = False) -> None:
        self.config = config or SandboxConfig()
        if jobs is not None and jobs < 1:
            raise ValueError(f"jobs={jobs}: need at least 1 program at a time")
        # More programs than cores would make CPU-bound programs slow on the wall clock and flaky.
        self.jobs = min(jobs or available_cores(), available_cores())
        root = os.geteuid() == 0
        self.privileged = root and self.config.drop_privileges
        # Namespaces need root (CAP_SYS_ADMIN); without it they are not even tried.
        self.features = [name for name in self.config.requested() if root]
        #: Where the memory cap applies: "cgroup2" or "cgroup1" (the whole program) or "per-process";
        #: None until the first slot started.
        self.memory_scope: str | None = None if self.config.memory_bytes is not None else "per-process"
        self.nproc_base = 0
        self._free: queue.Queue[_Server] = queue.Queue()
        self._servers: list[_Server] = []
        self._leftovers: list[str] = []
        self._closed = False
        self._memo: dict[str, ExecResult] | None = {} if memo else None
        #: Isolation features asked for but missing on this machine (only when weaker isolation is allowed).
        self.weakened: dict[str, str] = {}
        if not root and self.config.requested():
            reason = f"needs root or CAP_SYS_ADMIN; this evaluator runs as uid {os.geteuid()}"
            self.weakened = dict.fromkeys(self.config.requested(), reason)
            if not self.config.allow_weaker_isolation:
                raise SandboxUnavailable(_refusal(self.weakened))
            _log.warning("sandbox runs with weaker isolation (allowed): %s", _listing(self.weakened))
        try:
            self._reserve()
        except BaseException:
            self.close()
            raise

    def _reserve(self) -> None:
        if not self.privileged:
            # Without a uid of its own RLIMIT_NPROC counts every process of this user (threads too).
            mine = [pid for pid in _pids() if (_proc_status(pid) or (-1, ""))[0] == os.getuid()]
            self.nproc_base = sum(map(_thread_count, mine)) + 64
            for _ in range(self.jobs):
                self._add(None, None)
            return
        lock_dir = _lock_dir()
        # A uid is usable when nobody has it: no account, no process, no other evaluator holding its lock.
        in_use = _uids_in_use()
        low, high = self.config.uid_range
        for uid in range(low, high):
            if len(self._servers) == self.jobs:
                return
            if uid in in_use:
                continue
            try:
                pwd.getpwuid(uid)
                continue  # a real account: its files must stay out of the programs' reach
            except KeyError:
                pass
            fd = os.open(os.path.join(lock_dir, f"uid-{uid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another evaluator on this host holds it
                os.close(fd)
                continue
            if _uid_has_live_processes(uid):  # appeared since the scan: not ours to touch
                os.close(fd)
                continue
            self._add(uid, fd)
        if len(self._servers) < self.jobs:
            raise RuntimeError(
                f"found only {len(self._servers)} free uids in {self.config.uid_range} for {self.jobs} sandbox "
                "slots; pass SandboxConfig(uid_range=...) with a range of unused uids"
            )

    def _add(self, uid: int | None, lock_fd: int | None) -> None:
        server = _Server(self, len(self._servers), uid, lock_fd)
        self._servers.append(server)
        self._free.put(server)

    def close(self) -> None:
        """Stop the fork servers, release the uid locks, remove what is left; no program can run afterwards."""
        self._closed = True
        for server in self._servers:
            server.stop()
            if server.lock_fd is not None:
                os.close(server.lock_fd)
                server.lock_fd = None
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
        """
        from tqdm.auto import tqdm

        results: dict[str, ExecResult] = {}
        if self._memo is not None:
            results.update((text, self._memo[text]) for text in programs if text in self._memo)
        # dict.fromkeys keeps the first-seen order while dropping repeats.
        unique = [text for text in dict.fromkeys(programs) if text not in results]
        with tqdm(total=len(unique), desc=desc, disable=not progress, unit="prog") as bar:
            with ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="dinfill-sandbox") as pool:
                futures = {pool.submit(self.run, text): text for text in unique}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(1)
        if self._memo is not None:
            self._memo.update(results)
        return [results[text] for text in programs]

    def self_check(self) -> None:
        """Fail closed: a correct program must pass and a wrong one must fail, or raise RuntimeError."""
        good, bad = self.run_many(["import fractions\nassert fractions.Fraction(1, 2) * 2 == 1\n", "assert 1 == 2\n"])
        if not good.passed or bad.status != "failed":
            raise RuntimeError(
                f"sandbox self-check failed: a correct program gave {good.status} ({good.detail or good.stderr!r}), "
                f"a wrong one gave {bad.status}; check SandboxConfig.python={self.config.python!r}"
            )

    # -- one program -----------------------------------------------------------------------
    def _execute(self, program: str, server: _Server) -> ExecResult:
        workdir = None
        try:
            if not server.private_filesystem:
                # Weaker isolation: created here (as root) and handed to the slot's uid as cwd, HOME and TMPDIR.
                workdir = tempfile.mkdtemp(prefix="dinfill-sandbox-")
                if server.uid is not None:
                    os.chown(workdir, server.uid, server.uid)
                os.chmod(workdir, 0o700)
            result = self._run_in(program, server, workdir)
        except Exception as exc:  # noqa: BLE001 - no program and no slot failure may stop the run
            server.stop()  # Sandbox.run starts it again for the next program
            result = ExecResult("crashed", f"sandbox error: {type(exc).__name__}: {exc}")
        if workdir is not None and not _wire.remove_tree(workdir, timeout=10.0):
            self._leftovers.append(workdir)  # retried at close()
            why = f"its working directory {workdir} could not be removed within 10 s"
            result = dataclasses.replace(result, status="crashed", detail=f"{why}; {result.status}: {result.detail}")
        return result

    def _run_in(self, program: str, server: _Server, workdir: str | None) -> ExecResult:
        cfg = self.config
        # One secret per status: a program that reads its own "failed" report cannot turn it into "passed".
        tokens = {status: secrets.token_hex(16) for status in ("passed", "failed", "oom")}
        home = workdir or _wire.WORKDIR
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": home,
            "TMPDIR": home,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
        }
        job = {"program": program, "tokens": tokens, "cwd": workdir, "env": env}
        oom_before = server.cgroup.oom_kills() if server.cgroup else None
        # The server gets the write ends; once it has forked, ours are closed so EOF means "all writers gone".
        pipes = [os.pipe() for _ in range(4)]  # stdout, stderr, report, harness
        # The wall clock starts before the fork, so it bounds everything the program costs.
        start = time.monotonic()
        try:
            try:
                reply = server.request(("run", job), fds=tuple(w for _, w in pipes), timeout=REAP_TIMEOUT)
            finally:
                for _, w in pipes:
                    os.close(w)
        except (OSError, EOFError) as exc:
            for r, _ in pipes:
                os.close(r)
            # A server that died (killed from outside) must not take the batch down with it.
            server.stop()  # Sandbox.run starts it again for the next program
            return ExecResult("crashed", f"sandbox server failed: {exc!r}")
        watch = _Watch(reply[1], [r for r, _ in pipes], cfg.max_output_bytes)
        try:
            return self._watch(watch, server, tokens, start, oom_before)
        except Exception as exc:  # noqa: BLE001 - reaping or parsing trouble is this row's crash, not the run's
            server.stop()
            watch.close(deadline=time.monotonic() + 1.0)
            return ExecResult("crashed", f"sandbox server failed: {type(exc).__name__}: {exc}")

    def _watch(
        self, watch: _Watch, server: _Server, tokens: dict[str, str], start: float, oom_before: int | None
    ) -> ExecResult:
        cfg, pid = self.config, watch.pid
        timed_out = watch.wait(start + cfg.wall_limit)
        wall = time.monotonic() - start
        # Kill before reaping: while the child is a zombie its pid (= group id) cannot be reused.
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        # The server reaps the program, then kills and reaps whatever it left (it is their subreaper).
        _, status, cpu, _orphans = server.request(("reap", pid), timeout=REAP_TIMEOUT)
        # Every writer is dead now: read what is left.
        watch.close(deadline=time.monotonic() + 2.0)
        returncode = os.waitstatus_to_exitcode(status)
        harness = _parse_harness(bytes(watch.buffers[3]))
        if "exit" in harness:  # the reaper saw how the program itself ended
            returncode, cpu = os.waitstatus_to_exitcode(harness["exit"][0]), harness["exit"][1]
        oom_after = server.cgroup.oom_kills() if server.cgroup else None
        oom_killed = oom_before is not None and oom_after is not None and oom_after > oom_before
        common = dict(
            returncode=returncode,
            cpu_s=cpu,
            wall_s=wall,
            stdout=watch.text(1),
            stderr=watch.text(2),
            network_isolated=server.network_isolated,
        )
        return self._classify(watch, tokens, harness, timed_out, oom_killed, common)

    def _classify(
        self, watch: _Watch, tokens: dict, harness: dict, timed_out: bool, oom_killed: bool, common: dict
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
    """The records on fd 4 (written by the harness only): ``setup`` failure text and/or ``exit`` (status, cpu)."""
    found: dict = {}
    try:
        for line in data.decode("ascii").splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "setup":
                found["setup"] = literal_eval(rest)
            elif kind == "exit":
                status, cpu = rest.split()
                found["exit"] = (int(status), float(cpu))
            else:
                raise ValueError(f"unknown record {line[:80]!r}")
    except Exception as exc:  # noqa: BLE001 - never raise while classifying a row
        found["error"] = f"{type(exc).__name__}: {exc}"
    return found


class _Watch:
    """Drains a program's stdout, stderr, report and harness pipes until it exits or its time is up."""

    def __init__(self, pid: int, read_fds: list[int], cap: int) -> None:
        self.pid = pid
        self.fds = read_fds
        self.buffers = [bytearray() for _ in read_fds]
        # stdout and stderr keep the configured head; the report channel a fixed cap (reports are short).
        self.caps = [cap, cap, _REPORT_CAP, _REPORT_CAP]
        self.overflow = [False for _ in read_fds]
        self.sel = selectors.DefaultSelector()
        for index, fd in enumerate(read_fds):
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ, index)
        self.open_reads = len(read_fds)
        self.exited = False
        # pidfd: readable when the process exits, even though the fork server is its parent.
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
            self.sel.register(self.pidfd, selectors.EVENT_READ, "exit")
        except (AttributeError, OSError):  # kernels before 5.3: poll /proc instead
            self.pidfd = None

    def _pump(self, timeout: float) -> int:
        """One select round; returns the number of bytes read."""
        got = 0
        for key, _ in self.sel.select(timeout):
            if key.data == "exit":
                self.exited = True
                continue
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self.sel.unregister(key.fd)
                self.open_reads -= 1
                continue
            got += len(chunk)
            buf, limit = self.buffers[key.data], self.caps[key.data]
            if len(buf) + len(chunk) > limit:
                self.overflow[key.data] = True
            if len(buf) < limit:
                buf.extend(chunk[: limit - len(buf)])
        return got

    def wait(self, deadline: float) -> bool:
        """Pump until the process exits or the deadline passes; True when time ran out (group killed)."""
        while not self.exited:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                return True
            self._pump(remaining if self.pidfd is not None else min(remaining, 0.01))
            if self.pidfd is None:
                status = _proc_status(str(self.pid))
                self.exited = status is None or status[1] in "ZX"
        return False

    def close(self, deadline: float) -> None:
        """Read what is left (every writer is dead by now), then close the pipes (once)."""
        if not self.fds:
            return
        while self.open_reads and time.monotonic() < deadline:
            self._pump(0.05)
        self.sel.close()
        for fd in self.fds if self.pidfd is None else (*self.fds, self.pidfd):
            os.close(fd)
        self.fds, self.pidfd = [], None

    def text(self, stream: int) -> str:
        """Captured head of stdout (1) or stderr (2)."""
        return self.buffers[stream - 1].decode("utf-8", "replace")


def run_programs(
    programs: Iterable[str], config: SandboxConfig | None = None, jobs: int | None = None, progress: bool = False
) -> list[ExecResult]:
    """Run programs in a temporary :class:`Sandbox` (see there); one result per program, in order."""
    with Sandbox(config, jobs=jobs) as box:
        return box.run_many(list(programs), progress=progress)
