"""Inside half of the sandbox: run as `python -I -S sandbox_init.py FACTS_FD` with a JSON job on stdin.

Standard library only, never imported by the parent. Steps:
1. `unshare` new mount + network + PID namespaces (plus a user namespace when not root); fork, so the child is
   PID 1 of the new PID namespace: when it exits the kernel kills every process left inside, `setsid` or not.
2. PID 1 mounts a fresh /proc and private tmpfs over the world-writable dirs (/tmp, /var/tmp, /dev/shm, /run/lock),
   writes the job's files into a new work dir there, and forks the program.
3. The program child sets rlimits, drops to the job's unprivileged uid (root only), clears the environment, takes
   its stdin from a pipe (empty when none) and execs Python.
4. PID 1 reaps everything until the program exits, reports its exit status, and exits (killing the rest).
Facts (what isolation was achieved) and the exit status go to FACTS_FD as JSON lines.
If namespaces are unavailable the same steps run without them and the facts say so.
"""

import ctypes
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
_libc = ctypes.CDLL(None, use_errno=True)
_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _write_json(fd, obj):
    os.write(fd, (json.dumps(obj) + "\n").encode())


def _enter_namespaces(facts):
    is_root = os.geteuid() == 0
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | (0 if is_root else CLONE_NEWUSER)
    uid, gid = os.getuid(), os.getgid()
    try:
        _check(_libc.unshare(flags), "unshare")
    except OSError as e:
        facts["notes"].append(f"no namespaces ({e}); network and PID isolation unavailable")
        return False
    if not is_root:  # identity map: inside, we keep our own uid; caps last only until exec
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
    facts.update(network_isolated=True, pid_namespace=True, mount_namespace=True)
    return True


def _private_mounts(job, facts):
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    size = f"size={int(job['tmpfs_mb'])}m,mode=1777"
    for d in _PRIVATE_DIRS:
        if os.path.isdir(d) and not os.path.islink(d):
            try:
                _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, size)
            except OSError as e:
                facts["notes"].append(f"could not make {d} private: {e}")
                return
    facts["private_tmp"] = True


def _make_workdir(job):
    work = tempfile.mkdtemp(prefix="sbx-", dir="/tmp")
    for name, text in job["files"].items():
        with open(os.path.join(work, name), "w", encoding="utf-8") as f:
            f.write(text)
    if job["uid"] is not None:
        for name in [*job["files"], "."]:
            os.chown(os.path.join(work, name), job["uid"], job["uid"])
    return work


def _limits(job):
    mb = 1 << 20
    cpu = int(job["cpu_s"])
    for res, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, job["memory_mb"] * mb),
                       (resource.RLIMIT_FSIZE, job["max_file_mb"] * mb), (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_NPROC, job["max_procs"])):
        if res == resource.RLIMIT_NPROC and job["uid"] is None:
            continue  # without a uid of its own the count would include the caller's processes
        resource.setrlimit(res, value if isinstance(value, tuple) else (value, value))


def _exec_program(job, work, stdin_r):
    """In the forked program child: never returns."""
    try:
        os.dup2(stdin_r, 0)
        os.closerange(3, 65536)
        os.chdir(work)
        _limits(job)
        uid = job["uid"]
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
        os.execve(job["python"], [job["python"], "-I", "-B", job["main"]], env)
    except BaseException as e:
        os.write(2, f"sandbox: cannot start the program: {e}\n".encode())
    os._exit(127)


def _feed(fd, data):
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError:  # the program exited or closed stdin without reading it all
        pass


def _supervise(job, facts, facts_fd):
    """Write the work dir, fork the program, reap until it exits; returns its wait status and the work dir."""
    work = _make_workdir(job)
    stdin_r, stdin_w = os.pipe()
    facts["uid"] = job["uid"] if job["uid"] is not None else os.getuid()
    _write_json(facts_fd, {"facts": facts})
    pid = os.fork()
    if pid == 0:
        _exec_program(job, work, stdin_r)
    os.close(stdin_r)
    threading.Thread(target=_feed, args=(stdin_w, (job["stdin"] or "").encode()), daemon=True).start()
    while True:
        try:
            done, status = os.wait()
        except ChildProcessError:
            return 0, work
        if done == pid:
            return status, work


def _pid1(job, facts, facts_fd):
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the caller killed us: take the namespace down
    try:
        _private_mounts(job, facts)
    except OSError as e:
        facts["notes"].append(f"no private mounts: {e}")
    status, _ = _supervise(job, facts, facts_fd)
    _write_json(facts_fd, {"exit": _returncode(status)})
    os._exit(0)  # the kernel now SIGKILLs every process left in this PID namespace


def _returncode(status):
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main():
    facts_fd = int(sys.argv[1])
    job = json.loads(sys.stdin.buffer.read())
    facts = {"network_isolated": False, "pid_namespace": False, "mount_namespace": False, "private_tmp": False,
             "uid": None, "notes": []}
    if job["isolate"] and _enter_namespaces(facts):
        pid = os.fork()
        if pid == 0:
            _pid1(job, facts, facts_fd)
        _, status = os.waitpid(pid, 0)
        sys.exit(0 if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else 70)
    if not job["isolate"]:
        facts["notes"].append("isolation disabled by the caller")
    status, work = _supervise(job, facts, facts_fd)
    _write_json(facts_fd, {"exit": _returncode(status)})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
