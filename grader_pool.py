"""The grader's worker processes: symbolic equivalence checks (rewards.symbolic_equal, named to the
workers as "rewards:symbolic_equal") run in subprocesses, each item under a hard timeout.

A module of its own so that rewards.py reads as the grading rules: this is the
process machinery, and nothing in it decides what a correct answer is. It imports nothing of the
project: the workers import the check by the name they are given, so rewards.py -> grader_pool.py
is the only direction.

- A worker that is still busy when its item's time is up is killed and replaced, so an exponent
  tower or a pathological expression costs one timeout, never the run. Workers also cap their
  address space. Timeouts and errors score 0 and are counted by the pool.
- math-verify's own signal-based timeouts are switched off in the workers (they raise outside the
  main thread, and a blanket except would then silently score 0); the pool's timeout replaces them.
- Every request carries an id, so a late reply can never be taken for another item's verdict.
- A worker dies with the process that started it (_exit_with_parent), so killing a trainer with
  SIGKILL mid-grade leaves no worker computing on.
- Workers are plain subprocesses speaking JSON lines (`serve`), not multiprocessing, so that the pool
  works whatever the caller's __main__ looks like.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from multiprocessing.connection import wait

DEFAULT_TIMEOUT = 5.0  # seconds per symbolic check
WORKER_MEMORY_BYTES = 4 << 30  # address-space cap of each grading worker


CHECK = "rewards:symbolic_equal"  # module:function a worker answers with: (pred, gold) -> bool


def serve(parent: int | None = None, check: str = CHECK):
    """Worker main loop (`python -c "import grader_pool; grader_pool.serve()"`): die with `parent`,
    cap memory, import the heavy libraries, say ready, then answer each JSON line [request id, pred,
    gold] with one JSON line [request id, "ok", verdict of `check`] or [request id, "error", message]."""
    if parent is not None:
        _exit_with_parent(parent)
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    import logging

    logging.disable(logging.WARNING)  # math-verify warns that its own timeouts are off: that is the point
    import math_verify  # noqa: F401  (paid once here, not inside the first item's timeout)

    import importlib

    module, name = check.split(":")
    equal = getattr(importlib.import_module(module), name)
    print(json.dumps(["ready"]), flush=True)
    for line in sys.stdin:
        seq, pred, gold = json.loads(line)
        try:
            reply = [seq, "ok", equal(pred, gold)]
        except BaseException as e:  # noqa: BLE001 (a MemoryError or RecursionError is a verdict too)
            reply = [seq, "error", f"{type(e).__name__}: {e}"[:200]]
        print(json.dumps(reply), flush=True)


def _exit_with_parent(parent: int):
    """Make this worker die when the process that started it does, even mid-computation: a killed
    trainer must not leave workers grading a tower of exponents for minutes. On Linux the kernel sends
    SIGKILL (PR_SET_PDEATHSIG; strictly, when the thread that started the worker ends: a pool driven
    from a thread that exits loses its workers and starts new ones). Elsewhere a daemon thread
    polls the parent pid each second."""
    try:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:  # 1: PR_SET_PDEATHSIG
            raise OSError("prctl failed")
    except (OSError, AttributeError):  # not Linux
        def watch():
            while _alive(parent):
                time.sleep(1.0)
            os._exit(0)

        threading.Thread(target=watch, daemon=True).start()
    if not _alive(parent):  # it died before the signal was armed
        os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def symbolic_available() -> bool:
    """Whether math-verify is installed. Without it, answers the exact checks cannot settle grade as
    wrong (counted as errors), and a warning says so once per process."""
    global _SYMBOLIC
    if _SYMBOLIC is None:
        import importlib.util

        _SYMBOLIC = importlib.util.find_spec("math_verify") is not None
        if not _SYMBOLIC:
            print("warning: math-verify is not installed, so answers that need a symbolic check (not equal as "
                  "text or as exact numbers) are graded wrong; pip install math-verify", file=sys.stderr)
    return _SYMBOLIC


_SYMBOLIC: bool | None = None

STARTUP_TIMEOUT = 120.0  # seconds for a worker to import sympy and math-verify
MAX_FAILED_STARTS = 3  # consecutive workers that die before they are ready: give up, say why


class _Worker:
    """One grading subprocess, talking JSON lines over its stdin/stdout. A plain subprocess rather
    than multiprocessing, so that it works whatever the caller's __main__ looks like."""

    def __init__(self):
        here = os.path.dirname(os.path.abspath(__file__))
        code = f"import sys; sys.path.insert(0, {here!r}); import grader_pool; grader_pool.serve({os.getpid()})"
        self.stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty worker can never block on it
        self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.started = time.monotonic()
        self.ready = False
        self.job: tuple[int, int, float] | None = None  # (request id, item index, deadline)

    def fileno(self) -> int:
        return self.process.stdout.fileno()

    def send(self, seq: int, pair: tuple[str, str]) -> bool:
        try:
            self.process.stdin.write(json.dumps([seq, *pair]) + "\n")
            self.process.stdin.flush()
            return True
        except OSError:  # it died while idle
            return False

    def receive(self) -> list | None:
        line = self.process.stdout.readline()
        return json.loads(line) if line else None  # None: the worker died

    def error_output(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-2000:].decode(errors="replace").strip()

    def kill(self):
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.stderr):
            try:
                stream.close()
            except OSError:  # a write to the dead worker was still buffered
                pass


def _kill_all(workers: list[_Worker]):
    for w in workers:
        w.kill()
    workers.clear()


class GraderPool:
    """Worker processes for symbolic checks. `run(pairs)` returns one verdict per (pred, gold) pair:
    True/False, or None for an item that timed out or failed (counted in `timeouts` / `errors`).
    Every request carries an id, so a reply that arrives after its item was given up on (a killed
    run, an interrupt) can never be taken for another item's verdict."""

    def __init__(self, workers: int | None = None, timeout: float = DEFAULT_TIMEOUT):
        self.size = workers or max(1, min(4, os.cpu_count() or 1))
        self.timeout = timeout
        self.timeouts = self.errors = 0
        self._workers: list[_Worker] = []
        self._seq = 0
        self._failed_starts = 0
        weakref.finalize(self, _kill_all, self._workers)  # no orphans if close() is never called

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run(self, pairs: list[tuple[str, str]]) -> list[bool | None]:
        results: list[bool | None] = [None] * len(pairs)
        if pairs and not symbolic_available():  # degrade: the cheap checks settled everything they could
            self.errors += len(pairs)
            return results
        pending = deque(range(len(pairs)))
        while len(self._workers) < min(self.size, len(pairs)):
            self._workers.append(_Worker())
        try:
            while pending or any(w.job for w in self._workers):
                self._dispatch(pairs, pending)
                now = time.monotonic()
                deadlines = [w.job[2] if w.job else w.started + STARTUP_TIMEOUT
                             for w in self._workers if w.job or not w.ready]
                for w in wait(list(self._workers), timeout=max(0.0, min(deadlines, default=now + 1) - now)):
                    self._collect(w, results)
                now = time.monotonic()
                for w in list(self._workers):
                    if w.job and now >= w.job[2]:
                        self.timeouts += 1
                        self._replace(w)
                    elif not w.ready and now >= w.started + STARTUP_TIMEOUT:
                        self._failed_start(w)
        except BaseException:
            for w in list(self._workers):  # their answers would belong to this abandoned run
                if w.job:
                    self._replace(w)
            raise
        return results

    def _dispatch(self, pairs, pending: deque):
        for w in list(self._workers):
            if w.ready and w.job is None and pending:
                self._seq += 1
                if w.send(self._seq, pairs[pending[0]]):
                    w.job = (self._seq, pending.popleft(), time.monotonic() + self.timeout)
                else:
                    self._replace(w)

    def _collect(self, w: _Worker, results: list):
        reply = w.receive()
        if reply is None:  # it died: a crash in a C extension, the memory cap, or a failed start
            if not w.ready:
                self._failed_start(w)
                return
            self.errors += w.job is not None
            self._replace(w)
        elif reply[0] == "ready":
            w.ready, self._failed_starts = True, 0
        elif w.job and reply[0] == w.job[0]:
            index, w.job = w.job[1], None
            if reply[1] == "ok":
                results[index] = bool(reply[2])
            else:
                self.errors += 1

    def _failed_start(self, w: _Worker):
        self._failed_starts += 1
        output = w.error_output()
        if self._failed_starts < MAX_FAILED_STARTS:
            self._replace(w)
        else:
            w.kill()
            self._workers.remove(w)
            raise RuntimeError(f"{self._failed_starts} grading workers in a row failed to start "
                               f"(python -c 'import grader_pool; grader_pool.serve()'); the last one said:\n{output}")

    def _replace(self, worker: _Worker):
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker()

    def close(self):
        _kill_all(self._workers)


_default_pool: GraderPool | None = None


def default_pool() -> GraderPool:
    global _default_pool
    if _default_pool is None:
        _default_pool = GraderPool()
        atexit.register(_default_pool.close)
    return _default_pool
