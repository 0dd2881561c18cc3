"""Hostile programs are contained and time-bounded, and this machine is unharmed."""

import os
import socket
import textwrap
import time
import uuid

import pytest

from rewards.sandbox import Job, SandboxConfig, run_many, run_program

FAST = SandboxConfig(timeout_s=3.0)


@pytest.fixture(scope="module")
def isolation():
    """What this machine gives the sandbox; tests of a missing layer skip and say so."""
    return run_program("pass")


def _need(isolation, layer: str) -> None:
    if not getattr(isolation, layer):
        pytest.skip(f"sandbox has no {layer} on this machine: {isolation.notes}")


def _procs_with(marker: str) -> list[int]:
    """PIDs (host view: sees every PID namespace) whose command line contains marker."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def _live_procs_of_uid(uid: int) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid and fields["State"].split()[0] != "Z":
                found.append(int(pid))
        except (OSError, KeyError):
            continue
    return found


def test_ok_program_with_stdin_and_facts():
    res = run_program("import sys; print(sys.stdin.read().upper())", stdin="hi")
    assert res.status == "ok" and res.returncode == 0 and res.stdout == "HI\n"
    assert res.elapsed_s > 0
    if os.geteuid() == 0:
        assert res.uid not in (None, 0)


def test_isolation_is_reported():
    res = run_program("pass")
    assert res.network_isolated == res.pid_namespace  # both come from the same unshare
    off = run_program("pass", config=SandboxConfig(isolate=False))
    assert off.status == "ok" and not off.network_isolated and not off.pid_namespace and off.notes


def test_failure_statuses():
    assert run_program("raise SystemExit(3)").returncode == 3
    res = run_program("1/0")
    assert res.status == "failed" and "ZeroDivisionError" in res.stderr


def test_while_true_times_out():
    start = time.monotonic()
    res = run_program("while True: pass", config=FAST)
    assert res.status == "timeout" and 2.5 < res.elapsed_s < 6
    assert time.monotonic() - start < 8


def test_cpu_limit():
    res = run_program("while True: pass", config=SandboxConfig(timeout_s=10, cpu_s=1))
    assert res.status == "timeout" and "CPU" in res.reason and res.elapsed_s < 5


def test_fork_bomb_is_contained():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    res = run_program(bomb, config=FAST)
    assert res.status == "timeout" and time.monotonic() - start < 10
    if res.uid:
        assert _live_procs_of_uid(res.uid) == []
    assert run_program("print(1)").stdout == "1\n"  # the machine still forks


def test_memory_bomb_is_contained():
    res = run_program("xs = []\nwhile True:\n    xs.append(bytearray(50 << 20))\n",
                      config=SandboxConfig(timeout_s=10, memory_mb=512))
    assert res.status == "failed" and "MemoryError" in res.stderr and res.elapsed_s < 10


def test_writes_outside_the_work_dir_do_not_land(tmp_path, isolation):
    _need(isolation, "private_tmp")
    name = f"sparrow-escape-{uuid.uuid4().hex}"
    targets = [f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", os.path.join(os.getcwd(), name),
               str(tmp_path / name)]
    prog = textwrap.dedent(f"""
        import os
        for path in {targets!r}:
            try:
                with open(path, "w") as f:
                    f.write("pwned")
                print("wrote", path)
            except OSError as e:
                print("denied", path, e.errno)
        open("inside.txt", "w").write("fine")  # the work dir itself is writable
        print("cwd", os.getcwd())
    """)
    res = run_program(prog)
    assert res.status == "ok", res.stderr
    for path in targets:
        assert not os.path.exists(path), f"sandbox wrote {path}"
    assert "cwd /tmp/sbx-" in res.stdout


def test_file_size_limit():
    res = run_program("open('big', 'wb').write(b'x' * (8 << 20))", config=SandboxConfig(max_file_mb=1))
    assert res.status == "failed"


def test_environment_secrets_are_not_visible(monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("SPARROW_TEST_SECRET", secret)
    prog = textwrap.dedent(f"""
        import os
        print(dict(os.environ))
        for pid in ("self", "1", str(os.getppid()), "{os.getpid()}"):
            try:
                print(open(f"/proc/{{pid}}/environ", "rb").read())
            except OSError as e:
                print("denied", pid, e.errno)
    """)
    res = run_program(prog)
    assert res.status == "ok", res.stderr
    assert secret not in res.stdout and "SPARROW_TEST_SECRET" not in res.stdout


def test_no_connection_reaches_loopback_or_outside(isolation):
    _need(isolation, "network_isolated")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    prog = textwrap.dedent(f"""
        import socket
        for addr in [("127.0.0.1", {port}), ("192.0.2.1", 80)]:  # 192.0.2.1: TEST-NET-1, never routed
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect(addr)
                print("connected", addr)
            except OSError as e:
                print("blocked", addr, type(e).__name__)
    """)
    res = run_program(prog, config=SandboxConfig(timeout_s=10))
    try:
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()
    assert "connected" not in res.stdout, res.stdout
    assert res.stdout.count("blocked") == 2 and res.elapsed_s < 3  # unreachable at once, no 2 s waits


def test_killing_the_parent_fails_and_we_survive():
    me = os.getpid()
    prog = textwrap.dedent(f"""
        import os, signal
        for pid in (os.getppid(), 1, {me}):
            try:
                os.kill(pid, signal.SIGKILL)
                print("killed", pid)
            except OSError as e:
                print("denied", pid, e.errno)
    """)
    res = run_program(prog)
    assert res.status == "ok" and f"killed {me}" not in res.stdout
    assert os.getpid() == me  # and we are still here to check


def test_printing_gigabytes_is_truncated_and_bounded():
    start = time.monotonic()
    res = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
                      config=SandboxConfig(timeout_s=20, max_output_bytes=1 << 16))
    assert res.truncated and res.status == "failed" and len(res.stdout) == 1 << 16
    assert time.monotonic() - start < 5
    res = run_program("import sys\nwhile True:\n    sys.stderr.write('y' * 65536)\n",
                      config=SandboxConfig(timeout_s=20, max_output_bytes=1 << 16))
    assert res.truncated and len(res.stderr) == 1 << 16


def test_setsid_escape_dies_with_the_run(isolation):
    _need(isolation, "pid_namespace")
    marker = f"sparrow-setsid-{uuid.uuid4().hex}"
    prog = textwrap.dedent(f"""
        import os, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)  # {marker}"])
            os._exit(0)
        time.sleep(0.5)
        print("spawned")
    """)
    res = run_program(prog, config=SandboxConfig(timeout_s=10))
    assert res.status == "ok" and "spawned" in res.stdout, res.stderr
    deadline = time.monotonic() + 3
    while _procs_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _procs_with(marker) == []


def test_setsid_escape_without_namespaces_is_swept():
    if os.geteuid() != 0:
        pytest.skip("the uid sweep needs a uid of the run's own (root only)")
    marker = f"sparrow-setsid-{uuid.uuid4().hex}"
    prog = textwrap.dedent(f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)  # {marker}"])
    """)
    res = run_program(prog, config=SandboxConfig(timeout_s=10, isolate=False))
    assert res.status == "ok" and not res.pid_namespace
    assert _procs_with(marker) == []


def test_run_many_is_bounded_and_ordered():
    jobs = [Job(f"import time; time.sleep(0.3); print({i})") for i in range(8)]
    start = time.monotonic()
    results = run_many(jobs, FAST, max_workers=4)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(8)]
    assert 0.6 < time.monotonic() - start < 6  # two waves of four


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValueError, match="plain names"):
        run_program("pass", files={"../x": ""})


def test_an_interpreter_the_sandbox_cannot_start_is_refused_up_front(tmp_path):
    """SPARROW_SANDBOX_PYTHON under a dir the sandbox hides (or, as root, one its uid cannot enter) made every
    program fail to start: each code reward silently 0. Now the config names it."""
    hidden = tmp_path / "python3"  # tmp_path lies under /tmp, which the sandbox mounts over
    hidden.symlink_to(SandboxConfig().python)
    with pytest.raises(ValueError, match="cannot start inside the sandbox"):
        SandboxConfig(python=str(hidden))
    assert SandboxConfig(python=str(hidden), isolate=False).python == str(hidden)  # no private /tmp without namespaces
