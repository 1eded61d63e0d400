"""Fork server behind :mod:`dinfill.eval.execution`: one per sandbox slot, forks one process per program.

Why a fork server: starting a Python interpreter costs 30-60 ms, several times what a HumanEval
program needs, and a full re-scoring runs thousands of them. This server starts once per slot
(as the evaluator's user, root in CI), sets up what every program of the slot shares (an
empty network namespace; a mount namespace where the interpreter's files stay readable after the
uid drop), and then forks a fresh process per program. It never runs untrusted code itself and
imports only the standard library, never ``random`` (a forked module would hand every program the
same random state) and never the dinfill package.

Per program (messages on a unix socket; pipes for stdout, stderr and results come with the job):

    server: unshare(CLONE_NEWPID) (applies to its next child only), fork R, setns back
      R: pid 1 of the new pid namespace, the reaper (stays root): new session, pipes on fd
         0/1/2/3, cwd, scrubbed environment; forks P
         P: pid 2: rlimits, drop to the slot uid, close stdin, exec() the program in {}, report on fd 3
      R waits for P, writes how P ended (wait status, CPU) on fd 3 and exits: the kernel then
      kills everything left in the namespace (daemons included). The evaluator watches R.

Without a pid namespace R is skipped: the forked process becomes P itself. Either way the server
is a child subreaper (``PR_SET_CHILD_SUBREAPER``): whatever a program leaves running is re-parented
to the server, which kills and reaps it when the evaluator asks it to reap the program.

Only P's original pid, after ``exec`` returned, writes the ``passed`` report with the job's token.
Everything P needs after the program ran is bound to local names first, so a program that
rebinds ``os.write`` or ``marshal`` cannot break or fake the report.
"""

import marshal
import os
import resource
import shutil
import socket
import struct
import sys
import traceback

# Linux clone and mount flags (include/uapi/linux/sched.h, include/uapi/linux/mount.h).
_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_CLONE_NEWPID = 0x20000000
_PR_SET_CHILD_SUBREAPER = 36
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = 2, 4, 4096, 8192, 16384, 1 << 18
# The error text sent back is capped so that one write() to the pipe stays atomic (PIPE_BUF 4096).
_DETAIL_CHARS = 1500
_RESULT_FD = 3
_HEADER = struct.Struct("!I")


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


# -- one-time set-up ---------------------------------------------------------------------------
def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


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
    evaluator's temporary folder, where the programs' working directories live) are bound back at
    their own paths: imports work, and the rest of that home is hidden from the programs.
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
    libc = _libc()
    if libc.unshare(_CLONE_NEWNS) != 0 or libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return (
            f"the interpreter's files under {sorted(blocked)} cannot be read by other users and no mount "
            f"namespace is available to expose them (errno {_errno()}); use SandboxConfig(python=...) with an "
            "interpreter readable by all users, or make those directories traversable (chmod o+x)"
        )
    for ancestor, paths in blocked.items():
        staged = []
        for index, path in enumerate(paths):
            stage = os.path.join(stage_dir, f"mount-{len(staged)}-{index}")
            os.mkdir(stage, 0o700)
            if libc.mount(path.encode(), stage.encode(), None, _MS_BIND | _MS_REC, None) != 0:
                return f"bind mount of {path} failed (errno {_errno()})"
            staged.append((path, stage))
        if libc.mount(b"tmpfs", ancestor.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0755,size=1m") != 0:
            return f"tmpfs over {ancestor} failed (errno {_errno()})"
        for path, stage in staged:
            os.makedirs(path, exist_ok=True)
            if libc.mount(stage.encode(), path.encode(), None, _MS_MOVE, None) != 0:
                return f"moving the bind mount to {path} failed (errno {_errno()})"
            os.rmdir(stage)
    return ""


def _prepare(setup: dict) -> dict:
    """Namespaces shared by all programs of this slot; returns what was achieved."""
    state = {"network_isolated": False, "error": "", "own_pid_ns": None}
    # As a subreaper, processes a program leaves behind (however they detach) become our children.
    if _libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        state["error"] = f"prctl(PR_SET_CHILD_SUBREAPER) failed (errno {_errno()})"
        return state
    if setup["isolate_network"]:
        try:
            state["network_isolated"] = _libc().unshare(_CLONE_NEWNET) == 0
        except (OSError, AttributeError):
            pass
    if setup["uid"] is not None:
        state["error"] = _expose_interpreter(os.getcwd(), setup["keep_paths"])
    if setup["pid_namespace"]:
        try:
            state["own_pid_ns"] = os.open("/proc/self/ns/pid", os.O_RDONLY)
        except OSError:
            pass
    return state


# -- per program -----------------------------------------------------------------------------
def _set_limit(which: int, value: int) -> None:
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass  # an unsupported limit is skipped rather than aborting the run


def _limit_and_drop(setup: dict) -> None:
    """Resource limits, then the uid drop (limits first: RLIMIT_NPROC must bind the new uid)."""
    _set_limit(resource.RLIMIT_CORE, 0)
    cpu = int(setup["cpu_seconds"] + 0.999)
    try:
        # Soft limit raises SIGXCPU; the hard limit one second later is a SIGKILL nothing can catch.
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    except (ValueError, OSError):
        pass
    for which, key in (
        (resource.RLIMIT_AS, "memory_bytes"),
        (resource.RLIMIT_FSIZE, "max_file_bytes"),
        (resource.RLIMIT_NOFILE, "max_open_files"),
        (resource.RLIMIT_NPROC, "max_processes"),
    ):
        if setup[key]:
            _set_limit(which, int(setup[key]))
    if setup["uid"] is not None:
        os.setgroups([])
        os.setgid(setup["gid"])
        os.setuid(setup["uid"])
        if os.getuid() != setup["uid"] or os.geteuid() != setup["uid"]:
            os._exit(4)
    os.umask(0o077)


def _describe(exc: BaseException, lines: list) -> str:
    """First lines of the error plus the program line it came from, robust to a hostile ``__str__``."""
    try:
        head = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    except BaseException:  # noqa: BLE001 - an exception whose __str__ raises must still be reported
        head = type(exc).__name__
    where = ""
    try:
        for frame, lineno in traceback.walk_tb(exc.__traceback__):
            if frame.f_code.co_filename == "<program>":
                code = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""
                where = f"\n  at program line {lineno}: {code}"
    except BaseException:  # noqa: BLE001
        pass
    return (head + where)[:_DETAIL_CHARS]


def _run_program(setup: dict, job: dict, network: bool) -> None:
    """Become the program: limits, uid drop, ``exec`` in a fresh namespace, report. Never returns."""
    _limit_and_drop(setup)
    # stdin is /dev/null at the fd level; the Python object is closed so reads raise, as in human-eval.
    sys.stdin.close()
    sys.argv = ["<sandbox>"]
    # Taken out of the job and the job emptied, so the program finds less of the harness in memory.
    token, program = job["token"], job["program"]
    lines = program.split("\n")
    job.clear()

    # Bind everything the report needs before untrusted code can rebind module attributes.
    write, getpid, exit_now, describe = os.write, os.getpid, os._exit, _describe
    me = getpid()

    def report(status: str, detail: str) -> None:
        # A process the program forked must never speak for it: only the original pid reports.
        if getpid() != me:
            exit_now(0)
        message = repr({"token": token, "status": status, "detail": detail, "network": network})
        try:
            write(_RESULT_FD, (message + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    try:
        code = compile(program, "<program>", "exec")
        exec(code, {})  # a fresh global namespace: __name__ is not "__main__"
    except MemoryError as exc:
        report("oom", describe(exc, lines))
    except SystemExit as exc:
        try:
            what = f"SystemExit({exc.code!r})"
        except BaseException:  # noqa: BLE001 - a hostile exit code object
            what = "SystemExit"
        report("failed", f"{what} raised before the checks finished")
    except BaseException as exc:  # noqa: BLE001 - every exception from the program is a failure
        report("failed", describe(exc, lines))
    else:
        report("passed", "")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - the program may have closed or replaced them
            pass
    exit_now(0)


def _reap(setup: dict, job: dict, network: bool) -> None:
    """Pid 1 of the program's pid namespace: run it as pid 2, report how it ended, exit."""
    token = job["token"]
    # The program is pid 2: as pid 1 it would be immune to its own signals and to SIGXCPU.
    program_pid = os.fork()
    if program_pid == 0:
        _run_program(setup, job, network)
    job.clear()
    while True:
        try:
            pid, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            os._exit(5)
        # Other pids are orphans re-parented to us (pid 1): reap them and keep waiting.
        if pid == program_pid:
            break
    cpu = usage.ru_utime + usage.ru_stime
    record = {"token": token, "status": "exit", "wait_status": status, "cpu": cpu, "pid_namespace": True}
    try:
        os.write(_RESULT_FD, (repr(record) + "\n").encode())
    except OSError:
        pass
    os._exit(0)  # the kernel now kills whatever the program left in the namespace


def _start(setup: dict, state: dict, job: dict, fds: list) -> int:
    """Fork the process for one job (pid 1 of a new pid namespace when possible); return its pid."""
    in_namespace = False
    if state["own_pid_ns"] is not None:
        in_namespace = _libc().unshare(_CLONE_NEWPID) == 0
    pid = os.fork()
    if pid:
        if in_namespace:
            # unshare() only set the namespace of our next child; return to our own for the next job.
            _libc().setns(state["own_pid_ns"], _CLONE_NEWPID)
        return pid
    try:
        # A session (and process group) of its own, so the evaluator can kill the whole group.
        os.setsid()
        out, err, res = fds
        # stdin reads as empty at the fd level; _run_program also closes the Python object.
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.dup2(res, _RESULT_FD)
        # The socket and every other inherited descriptor (close_range(2): cheap even for a high limit).
        os.closerange(_RESULT_FD + 1, max(1 << 16, resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
        os.chdir(job["cwd"])
        # Only the scrubbed environment the evaluator chose for this program.
        os.environ.clear()
        os.environ.update(job["env"])
    except BaseException as exc:  # noqa: BLE001 - report any set-up failure, never run on
        try:
            record = {"token": job["token"], "status": "setup", "detail": f"{type(exc).__name__}: {exc}"}
            os.write(_RESULT_FD, (repr(record) + "\n").encode())
        finally:
            os._exit(3)
    if in_namespace:
        _reap(setup, job, state["network_isolated"])
    _run_program(setup, job, state["network_isolated"])
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
        message, fds = recv_message(sock, max_fds=3)
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
    send_message(sock, ("ready", {key: state[key] for key in ("network_isolated", "error")}))
    try:
        _serve(sock, setup, state)
    except (EOFError, OSError):
        pass  # the evaluator went away (closed, or was killed): nobody will enforce limits any more
    finally:
        _kill_orphans()  # so a program in flight (and whatever it started) does not outlive us
        # A killed evaluator cannot clean up: remove the folder of a program in flight and our own.
        home = os.getcwd()
        for folder in (state.get("workdir"), home):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        os._exit(0)


if __name__ == "__main__":
    main()
