"""Jobs and servers run as processes of their own, as a user or a scheduler runs them, and what they print."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from helpers.config import REPO


def job_command(*overrides):
    return [sys.executable, str(REPO / "jobs" / "generate.py"), *overrides]


def run_job(cwd, *overrides, env=None, timeout=400) -> subprocess.CompletedProcess:
    """`python jobs/generate.py OVERRIDES...` in `cwd`, to its end."""
    return subprocess.run(job_command(*overrides), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def run_job_ok(cwd, *overrides, env=None, timeout=400) -> str:
    """run_job, which must succeed: what it printed."""
    done = run_job(cwd, *overrides, env=env, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def start_job(cwd, *overrides, env=None) -> subprocess.Popen:
    """`python jobs/generate.py OVERRIDES...` started in `cwd`, its output (stderr too) on its stdout."""
    return subprocess.Popen(job_command(*overrides), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def finish(proc, timeout=400):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


class Said:
    """What a running job prints, read as it comes, on a thread (a readline could block the test)."""

    def __init__(self, proc):
        self.proc, self.lines = proc, []
        self.reader = threading.Thread(target=lambda: [self.lines.append(line) for line in proc.stdout], daemon=True)
        self.reader.start()

    def wait_for(self, text, timeout=120):
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            assert self.reader.is_alive() and time.time() < deadline, "".join(self.lines)[-3000:]
            time.sleep(0.1)

    def finish(self, timeout=400):
        self.proc.wait(timeout=timeout)
        self.reader.join()
        log = "".join(self.lines)
        assert self.proc.returncode == 0, log[-4000:]
        return log


def parts(out):
    return sorted(p for p in os.listdir(out) if p.startswith("part-")) if os.path.isdir(out) else []


def wait_for_parts(out, count, proc, timeout=180):
    deadline = time.time() + timeout
    while len(parts(out)) < count:
        assert proc.poll() is None, "the job ended before the fault could be injected"
        assert time.time() < deadline, "no progress"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() > deadline:
                raise
            time.sleep(0.3)


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process we started and everything it started (its own session), by process group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every process it started, at once, as a preempted machine loses them (left
    alone, a dead driver's Ray processes linger for a minute); wait until they are gone."""
    import psutil

    victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(victims, timeout=30)


def descendants_named(root_pid: int, name: str) -> list[int]:
    """The processes under `root_pid` whose name or command line holds `name` (a Ray actor's class, vLLM's
    `VLLM::EngineCore`)."""
    import psutil

    found = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if name in p.name() or name in " ".join(p.cmdline()):
                found.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def slow_job(path, out, *extra):
    return [f"input.path={path}", f"output.path={out}", "batching.chunk_rows=8", "generation.max_new_tokens=24",
            "cluster.num_replicas=2", *extra]


BIN = os.path.dirname(sys.executable)
