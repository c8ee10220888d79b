"""Stop signals between the training process and its loader workers.

A scheduler (Slurm's scancel) or a Ctrl-C signals the whole process group: the training process and
its loader workers at once. The training process finishes its step, saves and exits; a worker that
died of the signal meanwhile would make it fail first (the DataLoader checks its workers on every
SIGCHLD), and without a checkpoint. So:

- the training process makes a stop flag for its run (:func:`new_stop_flag`, before its loaders
  start their workers: they find the flag's path in their environment) and, on its stop signal,
  raises it (:func:`announce_stop`). A :class:`SignalWatcher` raises it at once, also while the
  training process's main thread is inside one long C++ call (a CPU backward), where Python would
  run the process's own handler only when the call returns;
- a signalled worker (:func:`defer_stop_signals`) goes on while the flag is up, until the next
  signal (the loader shutting it down once the step is done, or a second Ctrl-C); it ends when its
  parent is gone, or STOP_WAIT_S after the signal when the flag never went up (the signal was for
  the worker alone: its loader ending it);
- a second Ctrl-C interrupts the training process at once: its handler raises KeyboardInterrupt,
  and its workers end. Whatever error the training process then meets (its workers gone, a save
  cut short) is that interrupt's doing (:func:`interrupted_twice`, which also counts two that came
  during one C++ call, where Python runs the handler once).

The flag is a file with a random name, so that one left behind by a killed run never speaks for a
later process that happens to get the same pid.
"""
from __future__ import annotations

import atexit
import os
import secrets
import signal
import tempfile
import threading
import time

#: environment variable that gives loader workers their training process's stop flag
STOP_FLAG_ENV = "D3SSL_STOP_FLAG"
#: how long a signalled worker waits for the flag before it takes the signal as its own
STOP_WAIT_S = 30.0
_POLL_S = 0.5


def new_stop_flag() -> str:
    """A fresh stop flag (not raised) for this process's loader workers, started from now on:
    its path, also set in this process's environment, which the workers inherit."""
    path = os.path.join(tempfile.gettempdir(), f"d3ssl-stopping-{os.getpid()}-{secrets.token_hex(8)}")
    os.environ[STOP_FLAG_ENV] = path
    return path


def announce_stop():
    """Raises this process's stop flag (when it has one): its signalled workers wait for it."""
    path = os.environ.get(STOP_FLAG_ENV)
    if path and not os.path.exists(path):
        try:
            open(path, "w").close()
        except OSError:  # (an unwritable temp folder: the workers then end STOP_WAIT_S after the signal)
            return
        atexit.register(_remove, path)


def clear_stop():
    """Lowers this process's stop flag (harmless when it is not up)."""
    _remove(os.environ.get(STOP_FLAG_ENV))


def _remove(path: str | None):
    if path:
        try:
            os.remove(path)
        except OSError:
            pass


#: SIGINTs the active SignalWatcher has seen (a second one means: interrupt at once)
_interrupts = {"count": 0}
_watching = {"watcher": None}


def reset_interrupts():
    """Forgets the SIGINTs counted so far (a new run in this process)."""
    _interrupts["count"] = 0


def interrupted_twice() -> bool:
    """Whether a second SIGINT came while a SignalWatcher was on: whatever error the process then
    meets (its workers ending, a save cut short) is that interrupt's doing."""
    return _interrupts["count"] >= 2


def _forked_child():
    """In a process forked while a SignalWatcher is on (a DALI source worker, any helper): the
    watcher's pipe and the training process's stop handlers are not the child's."""
    watcher = _watching["watcher"]
    if watcher is None:
        return
    _watching["watcher"] = None
    try:
        signal.set_wakeup_fd(-1)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL if s == signal.SIGTERM else signal.default_int_handler)
    except ValueError:  # (forked from another thread than the main one: not settable there)
        pass
    for fd in (watcher._read, watcher._write):
        try:
            os.close(fd)
        except OSError:
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked_child)


class SignalWatcher:
    """Raises the stop flag the moment SIGTERM or SIGINT arrives: CPython's C-level handler writes
    the signal's number to a wakeup pipe at once, and a thread reading it runs while the main
    thread's C++ call has released the GIL (PyTorch's operators do). The process's own Python
    handlers run as before. Make it from the main thread, after the handlers are set; ``close()``."""

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        _interrupts["count"] = 0
        _watching["watcher"] = self
        self._thread = threading.Thread(target=self._watch, name="d3ssl-stop-watcher", daemon=True)
        self._thread.start()

    def _watch(self):
        stops = {int(signal.SIGTERM), int(signal.SIGINT)}
        while True:
            data = os.read(self._read, 64)
            if stops.intersection(data):
                announce_stop()
            _interrupts["count"] += data.count(int(signal.SIGINT))
            if not data or 0 in data:   # (0: close() asks the thread to end)
                return

    def close(self):
        _watching["watcher"] = None
        signal.set_wakeup_fd(self._previous)
        try:
            os.write(self._write, b"\0")
        except OSError:  # (a full pipe: the thread reads on and finds the 0 later)
            pass
        self._thread.join(timeout=5)
        os.close(self._write)
        if not self._thread.is_alive():
            os.close(self._read)


def defer_stop_signals(wait: float | None = None):
    """For a loader's worker process: SIGTERM and SIGINT are the training process's to act on (see
    the module's text). A signalled worker looks every half second:

    - its parent raised the stop flag: it goes on;
    - its parent is gone: it ends;
    - `wait` seconds (None: STOP_WAIT_S) passed without the flag: it ends;
    - a second signal ends it (the loader shutting it down, a second Ctrl-C).

    A worker ends by the signal it got, as it would have without this."""
    wait = STOP_WAIT_S if wait is None else wait
    parent = os.getppid()
    flag = os.environ.get(STOP_FLAG_ENV)
    state = {"signal": None, "since": 0.0}
    try:  # a forked worker inherits the training process's wakeup pipe: its signals are its own
        signal.set_wakeup_fd(-1)
    except ValueError:  # (not the main thread: no signal handlers can be set there either)
        pass

    def raised():
        return flag is not None and os.path.exists(flag)

    def die():
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(state["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), state["signal"])

    def on_stop(signum, frame):
        if state["signal"] is None:
            state["signal"], state["since"] = signum, time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, _POLL_S, _POLL_S)
        else:  # the loader shutting the worker down, or a second Ctrl-C
            die()

    def poll(signum, frame):
        if os.getppid() != parent:
            die()
        if not raised() and time.monotonic() - state["since"] >= wait:
            die()

    signal.signal(signal.SIGALRM, poll)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
