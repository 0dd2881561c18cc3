"""Run untrusted Python programs outside the calling process, isolated and time-bounded.

Each run starts `sandbox_init.py` (a fresh interpreter) in its own session. It enters new network, PID and mount
namespaces when the OS allows, mounts private tmpfs over /tmp and the other world-writable dirs, and runs the
program as PID 1's child in a fresh work dir, under rlimits (CPU, address space, processes, file size), with a
cleared environment and, when we are root, a random unprivileged uid of its own (root ignores RLIMIT_NPROC).
The network namespace has only a loopback that is down: no address, 127.0.0.1 included, is reachable.

The caller enforces the wall clock, reads stdout/stderr with a cap (a program exceeding it is killed), and at the
end SIGKILLs the process group; PID 1 exiting takes down everything left in the namespace, including processes
that escaped the group with `setsid`. Without a PID namespace, processes of the run's uid are swept instead.
`SandboxResult` says which isolation was in force (`network_isolated`, `pid_namespace`, `private_tmp`, `uid`).

The program's interpreter is `SandboxConfig.python`: by default `$SPARROW_SANDBOX_PYTHON`, else this interpreter
when it has numpy and the sandbox's unprivileged uid can execute it and read its stdlib and numpy (file
permissions checked along the real path), else the system python3. An interpreter under /tmp (or another dir the
sandbox hides behind a private tmpfs) cannot start inside it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import selectors
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

_INIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_init.py")
_UID_RANGE = (1_000_000, 1_000_000 + (1 << 24))  # far above real accounts; random so concurrent runs don't share
_EXIT_GRACE_S = 0.5  # after the program exits, how long stragglers may keep its output pipes open


def _world_usable(path: str, mode: int = stat.S_IXOTH) -> bool:
    """Whether another (unprivileged) user can reach `path` (every directory above it searchable by others) and
    has `mode` on it; symlinks are followed."""
    real = os.path.realpath(path)
    try:
        if not os.stat(real).st_mode & mode:
            return False
        parent = os.path.dirname(real)
        while True:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            if parent == os.path.dirname(parent):
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


_PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # sandbox_init mounts an empty tmpfs over each


def _under_private_tmp(path: str) -> bool:
    return any(p == d or p.startswith(d + "/") for p in (os.path.abspath(path), os.path.realpath(path))
               for d in _PRIVATE_TMP)


def _usable_by_sandbox(paths: list[str], hides_tmp: bool = True) -> bool:
    """Reachable inside the sandbox (not under a dir it hides, when it isolates) by its uid: an unprivileged one
    when we are root, else us."""
    if hides_tmp and any(_under_private_tmp(p) for p in paths):
        return False
    if os.geteuid() != 0:
        return all(os.access(p, os.R_OK) for p in paths)
    return all(_world_usable(p, stat.S_IXOTH if os.path.isfile(p) else stat.S_IROTH | stat.S_IXOTH)
               for p in paths)


def _this_python_with_numpy() -> str | None:
    """This interpreter, when it has numpy and the sandbox's uid can run it and read its stdlib and numpy."""
    import importlib.util

    spec = importlib.util.find_spec("numpy")
    if spec is None or not spec.submodule_search_locations:
        return None
    paths = [sys.executable, os.path.dirname(os.__file__), *spec.submodule_search_locations]
    return sys.executable if _usable_by_sandbox(paths) else None


def _default_python() -> str:
    """`SPARROW_SANDBOX_PYTHON`, else this interpreter when it has numpy and the sandbox can run it, else the
    system python3, else this interpreter."""
    return os.environ.get("SPARROW_SANDBOX_PYTHON") or _detected_python()


@functools.cache  # the environment does not change under a running process; every SandboxConfig() asks
def _detected_python() -> str:
    mine = _this_python_with_numpy()
    if mine:
        return mine
    for path in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(path, os.X_OK) and _usable_by_sandbox([path]):
            return path
    return sys.executable


@dataclass(slots=True)
class SandboxConfig:
    timeout_s: float = 10.0  # wall clock for the whole run
    cpu_s: float | None = None  # RLIMIT_CPU; default ceil(timeout_s) + 1
    memory_mb: int = 1024  # RLIMIT_AS
    max_procs: int = 64  # RLIMIT_NPROC (only with a uid of its own, i.e. when we are root)
    max_file_mb: int = 16  # RLIMIT_FSIZE
    max_output_bytes: int = 1 << 20  # per stream; more gets the program killed and the result truncated
    tmpfs_mb: int = 64  # size of each private tmpfs (the work dir lives in /tmp)
    # interpreter of the program (world-executable when we are root); default: see _default_python
    python: str = field(default_factory=_default_python)
    isolate: bool = True  # try namespaces; False runs with rlimits (and uid drop) only

    def __post_init__(self) -> None:
        for name in ("timeout_s", "memory_mb", "max_procs", "max_file_mb", "max_output_bytes", "tmpfs_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.cpu_s is not None and self.cpu_s <= 0:
            raise ValueError(f"SandboxConfig.cpu_s must be > 0 seconds, got {self.cpu_s}")
        if not os.access(self.python, os.X_OK):
            raise ValueError(f"SandboxConfig.python {self.python!r} is not an executable file")
        if not _usable_by_sandbox([self.python], hides_tmp=self.isolate):  # else every program would fail to start
            raise ValueError(
                f"SandboxConfig.python {self.python!r} cannot start inside the sandbox: it lies under a directory "
                f"the sandbox hides ({', '.join(_PRIVATE_TMP)}) or one its unprivileged uid cannot enter "
                f"({os.path.realpath(self.python)}); set SPARROW_SANDBOX_PYTHON to an interpreter outside them"
            )


@dataclass(slots=True)
class SandboxResult:
    status: str  # "ok" (exit 0) | "failed" (nonzero exit, signal, output limit) | "timeout" | "error" (sandbox)
    returncode: int | None  # negative: killed by that signal
    stdout: str
    stderr: str
    elapsed_s: float
    truncated: bool = False  # output exceeded max_output_bytes
    reason: str = ""
    network_isolated: bool = False
    pid_namespace: bool = False
    private_tmp: bool = False
    uid: int | None = None  # uid the program ran as
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_program(source: str, stdin: str | None = None, config: SandboxConfig | None = None,
                files: dict[str, str] | None = None) -> SandboxResult:
    """Run `source` as main.py (plus `files` next to it) in the sandbox; `stdin=None` gives it an empty stdin."""
    cfg = config or SandboxConfig()
    if not isinstance(source, str):
        raise TypeError(f"source must be str, got {type(source).__name__}")
    files = dict(files or {})
    if "main.py" in files or any(os.path.basename(n) != n or n in ("", ".", "..") for n in files):
        raise ValueError(f"files must be plain names other than main.py, got {sorted(files)}")
    files["main.py"] = source
    uid = random.randrange(*_UID_RANGE) if os.geteuid() == 0 else None
    job = {"files": files, "main": "main.py", "stdin": stdin, "uid": uid, "python": cfg.python,
           "isolate": cfg.isolate, "cpu_s": cfg.cpu_s or math.ceil(cfg.timeout_s) + 1, "memory_mb": cfg.memory_mb,
           "max_procs": cfg.max_procs, "max_file_mb": cfg.max_file_mb, "tmpfs_mb": cfg.tmpfs_mb}
    return _Run(cfg, job).execute()


class _Run:
    """One sandboxed execution: launch, pump output under the caps and the clock, kill, collect."""

    def __init__(self, cfg: SandboxConfig, job: dict):
        self.cfg, self.job = cfg, job
        self.out = {"stdout": bytearray(), "stderr": bytearray(), "facts": bytearray()}
        self.truncated = False

    def execute(self) -> SandboxResult:
        start = time.monotonic()
        facts_r, facts_w = os.pipe()
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", _INIT, str(facts_w)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(facts_w,),
                                    env={"PATH": "/usr/bin:/bin"}, start_new_session=True, cwd="/")
        except OSError as e:
            os.close(facts_r)
            return SandboxResult("error", None, "", "", time.monotonic() - start, reason=f"cannot launch: {e}")
        finally:
            os.close(facts_w)
        try:
            proc.stdin.write(json.dumps(self.job).encode())
            proc.stdin.close()
            timed_out = self._pump(proc, facts_r, start + self.cfg.timeout_s)
        except BrokenPipeError:
            timed_out = False
        finally:
            self._kill(proc)
            os.close(facts_r)
        return self._result(proc, timed_out, time.monotonic() - start)

    def _pump(self, proc: subprocess.Popen, facts_r: int, deadline: float) -> bool:
        """Read the three pipes until all close, the deadline passes (True) or the output cap is hit."""
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        sel.register(facts_r, selectors.EVENT_READ, "facts")
        exited_at = None
        try:
            while sel.get_map():
                now = time.monotonic()
                if now >= deadline:
                    return True
                if exited_at is not None and now >= exited_at + _EXIT_GRACE_S:
                    return False
                limit = deadline if exited_at is None else min(deadline, exited_at + _EXIT_GRACE_S)
                for key, _ in sel.select(limit - now):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        if key.data == "facts":
                            exited_at = time.monotonic()
                        continue
                    buf = self.out[key.data]
                    if key.data != "facts" and len(buf) + len(chunk) > self.cfg.max_output_bytes:
                        buf += chunk[: self.cfg.max_output_bytes - len(buf)]
                        self.truncated = True
                        return False
                    buf += chunk
            return False
        finally:
            sel.close()

    def _kill(self, proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            stream.close()

    def _result(self, proc: subprocess.Popen, timed_out: bool, elapsed: float) -> SandboxResult:
        facts, returncode = {}, None
        for line in self.out["facts"].decode(errors="replace").splitlines():
            record = json.loads(line)
            facts = record.get("facts", facts)
            returncode = record.get("exit", returncode)
        if self.job["uid"] is not None:
            _sweep_uid(self.job["uid"])
        res = SandboxResult("ok", returncode, self.out["stdout"].decode(errors="replace"),
                            self.out["stderr"].decode(errors="replace"), elapsed, self.truncated,
                            network_isolated=bool(facts.get("network_isolated")),
                            pid_namespace=bool(facts.get("pid_namespace")),
                            private_tmp=bool(facts.get("private_tmp")), uid=facts.get("uid"),
                            notes=list(facts.get("notes", [])))
        res.status, res.reason = _classify(res, timed_out, self.cfg, proc.returncode)
        return res


def _classify(res: SandboxResult, timed_out: bool, cfg: SandboxConfig, init_code: int | None) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"wall-clock limit of {cfg.timeout_s:g} s exceeded"
    if res.truncated:
        return "failed", f"output exceeded {cfg.max_output_bytes} bytes"
    if res.returncode is None:
        return "error", f"sandbox init failed (exit {init_code}): {res.stderr[-500:]}"
    if res.returncode == -signal.SIGXCPU:
        return "timeout", "CPU-time limit exceeded"
    if res.returncode == 0:
        return "ok", ""
    if res.returncode < 0:
        return "failed", f"killed by signal {signal.Signals(-res.returncode).name}"
    return "failed", f"exit code {res.returncode}"


def _sweep_uid(uid: int, budget_s: float = 2.0) -> None:
    """SIGKILL every live process of `uid` (the run's own uid) until none is left or `budget_s` passes; a PID
    namespace's members die asynchronously after its init, and a fork race can leave survivors."""
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        alive = [pid for pid, (real_uid, state) in _proc_table().items() if real_uid == uid and state != "Z"]
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (real uid, state letter) of every process visible in /proc."""
    table = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            table[int(pid)] = (int(fields["Uid"].split()[0]), fields["State"].split()[0])
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return table


@dataclass(slots=True)
class Job:
    source: str
    stdin: str | None = None
    files: dict[str, str] | None = None


def run_many(jobs: Sequence[Job | str], config: SandboxConfig | None = None,
             max_workers: int | None = None) -> list[SandboxResult]:
    """Run many programs, at most `max_workers` at a time (default: 2 x CPUs); results in input order."""
    jobs = [Job(j) if isinstance(j, str) else j for j in jobs]
    workers = max_workers or 2 * (os.cpu_count() or 1)
    if workers <= 0:
        raise ValueError(f"max_workers must be > 0, got {workers}")
    if len(jobs) <= 1:
        return [run_program(j.source, j.stdin, config, j.files) for j in jobs]
    with ThreadPoolExecutor(max_workers=min(workers, len(jobs)), thread_name_prefix="sandbox") as ex:
        return list(ex.map(lambda j: run_program(j.source, j.stdin, config, j.files), jobs))


def isolation_report(config: SandboxConfig | None = None) -> dict:
    """What isolation this machine gives a sandboxed program (runs a trivial one)."""
    res = run_program("print('ok')", config=config)
    return {"status": res.status, "network_isolated": res.network_isolated, "pid_namespace": res.pid_namespace,
            "private_tmp": res.private_tmp, "uid": res.uid, "notes": res.notes}
