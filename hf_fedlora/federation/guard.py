"""What stands between a recipe run and its operator: the output folder's lock, a clean stop on
SIGINT/SIGTERM, and one line (exit 2) instead of a traceback for an operator's mistake.

- :class:`OutputDirLock`: ``output_dir/.lock``, held with ``flock`` by the run's main process. A
  second run writing the same folder is refused at once, naming the holder's pid; the kernel drops
  the lock when its holder dies however it dies, so a stale file is simply taken over.
- :func:`run_script`: what the recipes' ``__main__`` runs. SIGTERM is turned into an
  :class:`Interrupted` exception like SIGINT's ``KeyboardInterrupt``, so the run unwinds (every
  file it writes is written to a temporary and renamed, so nothing is left half-written); under
  ``accelerate launch`` the training process also asks the kernel for a SIGTERM when its launcher
  dies (``PR_SET_PDEATHSIG``), since the launcher does not forward signals. It prints ``interrupted
  in round N; rerun with --resume`` and exits ``128 + signal`` (130, 143).
- :func:`interrupts_held`: a block that a signal cannot cut in two. The round's ``metrics.jsonl``
  line and ``state.json`` (and the kept client adapters) are written inside one, so a stop never
  leaves a line for a round that ``state.json`` does not call complete; the signal takes effect when
  the block ends.

Signal handlers are process-wide state, so only scripts install them (:func:`run_script`);
:func:`~hf_fedlora.federation.run_federation` itself only takes the lock.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"
EXIT_OPERATOR_ERROR = 2


class RunLockedError(RuntimeError):
    """Another live process is writing the output folder."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (``signum``); a ``KeyboardInterrupt`` so every cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class OutputDirLock:
    """An exclusive ``flock`` on ``output_dir/.lock`` with the holder's pid written in it.

    ``acquire()`` refuses at once (no waiting) with :class:`RunLockedError` when a live process holds
    it; a lock file left by a dead process is not locked any more and is taken over. ``release()``
    unlinks the file and drops the lock (the kernel drops it anyway when the process exits).
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> OutputDirLock:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise RunLockedError(
                    f"'{self.path.parent}' is being written by another run (pid {holder}, lock file "
                    f"'{self.path}'); wait for it, stop it, or choose another `--output_dir`."
                ) from None
            try:  # the holder may have unlinked the file between our open and our lock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_output_dir(out: Path) -> None:
    """Refuse an ``output_dir`` that exists but is not a folder (an operator's mistake)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"`output_dir` '{out}' exists and is not a folder; choose another path.")


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then raise each held one again, to the handler
    it would have reached.

    For writes that belong together (a round's ``metrics.jsonl`` line and its ``state.json``): a stop
    lands before or after them, never between. A signal that is ignored stays ignored; off the main
    thread (where Python cannot set handlers) the block runs unguarded. A held stop is never dropped:
    when the block raises, the signal is raised again while that exception propagates.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous: list[tuple[int, Any]] = []
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if handler not in (signal.SIG_IGN, None):
                previous.append((sig, handler))
                signal.signal(sig, lambda signum, frame: held.append(signum))
        yield
    finally:
        _restore_handlers(previous)
        for signum in dict.fromkeys(held):  # each once, in arrival order; its handler runs inside
            signal.raise_signal(signum)


def _restore_handlers(handlers: list[tuple[int, Any]]) -> None:
    """Put every handler back, even when a signal arrives (and its handler raises) halfway."""
    if handlers:
        try:
            signal.signal(*handlers[0])
        finally:
            _restore_handlers(handlers[1:])


# -- the script side -------------------------------------------------------------------------------


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def _launched_by_accelerate() -> bool:
    """Whether this process was started by ``accelerate launch`` (or torchrun): its launcher sets these."""
    return "ACCELERATE_DYNAMO_BACKEND" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def _die_with_parent() -> None:
    """Ask the kernel for a SIGTERM when the parent (the launcher) dies (Linux ``PR_SET_PDEATHSIG``)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died while we asked (not `== 1`: it may be PID 1)
        raise Interrupted(signal.SIGTERM)


def install_interrupt_handlers() -> None:
    """SIGTERM raises :class:`Interrupted` (SIGINT keeps Python's ``KeyboardInterrupt``, and a signal
    the process was started with ignored, e.g. SIGINT of a background job, stays ignored); under
    ``accelerate launch`` the launcher's death sends this process a SIGTERM."""
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # an ignored signal stays ignored
        signal.signal(signal.SIGTERM, _raise_interrupted)
    if _launched_by_accelerate():
        _die_with_parent()


def _round_in_progress(output_dir: Path) -> int | None:
    try:
        state = json.loads((output_dir / "state.json").read_text(encoding="utf-8"))
        return int(state["completed_round"]) + 1
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def _on_interrupt(exc: KeyboardInterrupt, output_dir: Path, prog: str) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not break the cleanup
        signal.signal(sig, signal.SIG_IGN)
    signum = getattr(exc, "signum", signal.SIGINT)
    if _is_main_process():
        rnd = _round_in_progress(output_dir)
        where = f"in round {rnd}" if rnd is not None else "before the first round"
        print(
            f"{prog}: interrupted {where}; rerun with --resume (output: {output_dir})",
            file=sys.stderr,
            flush=True,
        )
    return 128 + int(signum)


OPERATOR_ERRORS = (ValueError, OSError, LookupError, RunLockedError)
"""What an operator's mistake raises before the first round starts (options, data files, the output folder)."""


def mark_operator_error(exc: BaseException) -> None:
    """Tag ``exc`` (raised while setting up a run) as an operator's mistake for :func:`run_script`."""
    if isinstance(exc, OPERATOR_ERRORS):
        exc.hf_fedlora_operator_error = True  # type: ignore[union-attr]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def run_script(
    parse: Callable[[Sequence[str] | None], tuple],
    main: Callable[..., Any],
    argv: Sequence[str] | None = None,
    *,
    prog: str,
    before_main: Callable[[tuple], Any] | None = None,
) -> int:
    """Parse ``argv`` and run ``main(*arguments)`` as a script; returns the exit status.

    0 on success; 2 with one line ``prog: error: ...`` for an operator's mistake (a bad option or
    config key, a missing data file, an output folder that is a file, held by another run, or
    holding a corrupt run); 130 / 143 with ``interrupted in round N; rerun with --resume`` on
    SIGINT / SIGTERM. Set ``HF_FEDLORA_TRACEBACK=1`` to get the traceback of an operator error too.
    """
    output_dir = Path(".")
    try:
        install_interrupt_handlers()
        try:
            arguments = parse(argv)
        except OPERATOR_ERRORS as exc:
            mark_operator_error(exc)
            raise
        output_dir = Path(arguments[3].output_dir)
        if before_main is not None:
            before_main(arguments)
        main(*arguments)
    except KeyboardInterrupt as exc:
        return _on_interrupt(exc, output_dir, prog)
    except Exception as exc:
        if getattr(exc, "hf_fedlora_operator_error", False) and not os.environ.get("HF_FEDLORA_TRACEBACK"):
            print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr, flush=True)
            return EXIT_OPERATOR_ERROR
        raise
    return 0


__all__ = [
    "EXIT_OPERATOR_ERROR",
    "LOCK_NAME",
    "Interrupted",
    "OutputDirLock",
    "RunLockedError",
    "check_output_dir",
    "install_interrupt_handlers",
    "mark_operator_error",
    "run_script",
]
