"""Helpers shared by the benchmarks: presets read from ``configs/*.yaml``, memory and I/O counters, a
fresh-subprocess runner, timing, and JSON / markdown output. Standard library plus PyYAML and torch
only, so any benchmark can reuse them."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

MIB = 1 << 20
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PresetT = TypeVar("PresetT")


def preset_names(benchmark: str) -> list[str]:
    """The presets of ``benchmark``: one ``configs/<benchmark>_<preset>.yaml`` file each."""
    return sorted(path.stem[len(benchmark) + 1 :] for path in CONFIG_DIR.glob(f"{benchmark}_*.yaml"))


def load_preset(cls: type[PresetT], benchmark: str, name: str) -> PresetT:
    """Read ``configs/<benchmark>_<name>.yaml`` into ``cls``, a dataclass whose ``name`` field is
    the preset's name and whose other fields are the file's keys, every one of them.

    Lists become tuples where the field is a tuple; an integer is accepted for a float field and
    kept as written (so a preset's JSON shows the value exactly as the file has it).

    Raises:
        ValueError: a key the dataclass does not have, a field the file does not set, or a value of
            the wrong type, naming the file and the key.
    """
    import yaml

    path = CONFIG_DIR / f"{benchmark}_{name}.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
    unknown, missing = sorted(set(data) - set(fields)), [f for f in fields if f not in data]
    if unknown or missing:
        raise ValueError(
            f"{path}: unknown keys {unknown}, missing keys {missing}; a preset sets every field of "
            f"{cls.__name__}: {fields}."
        )
    hints = typing.get_type_hints(cls)
    return cls(name=name, **{key: _typed(path, key, data[key], hints[key]) for key in fields})


def _typed(path: Path, key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the type ``hint`` (lists turned into tuples where ``hint`` is one)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and isinstance(value, list):
        return tuple(_typed(path, key, item, args[0]) for item in value)
    expected = (int, float) if hint is float else (origin or hint)
    if isinstance(value, bool) != (hint is bool) or not isinstance(value, expected):
        raise ValueError(f"{path}: `{key}` should be {getattr(hint, '__name__', hint)}, got {value!r}.")
    return value


def proc_status() -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``RssAnon`` and ``RssFile`` of this process, in bytes (0 off Linux)."""
    out = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in out:
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def io_counters() -> dict[str, int]:
    """``rchar`` (bytes asked of ``read()``-like calls) and ``read_bytes`` (bytes fetched from the
    storage device) of this process. Reads through ``mmap`` show in neither."""
    out = {"rchar": 0, "read_bytes": 0}
    try:
        with open("/proc/self/io", encoding="ascii") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in out:
                    out[key] = int(value)
    except OSError:
        pass
    return out


class AnonPeakSampler:
    """Samples ``RssAnon`` in a background thread and keeps the peak.

    ``ru_maxrss`` also counts file pages mapped by ``mmap`` (safetensors maps its files), which the
    kernel can drop at any time; the anonymous part is the memory a process really owns. Sampling
    can miss a peak shorter than ``interval`` seconds.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start = proc_status()["RssAnon"]
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status()["RssAnon"])
            time.sleep(self.interval)

    def __enter__(self) -> AnonPeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status()["RssAnon"])

    @property
    def delta(self) -> int:
        """Peak ``RssAnon`` minus its value when the sampler started, in bytes."""
        return self.peak - self.start


def use_one_thread() -> None:
    """One thread for torch and for the BLAS/LAPACK that scipy loads (FlexLoRA's eigen-solve runs
    there): ``torch.set_num_threads`` alone leaves scipy's OpenBLAS on every core, and the cases
    compare one-thread times."""
    import scipy.linalg  # noqa: F401  (loads its BLAS, so that the limit below reaches it)
    import torch
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn (the recipes extra)

    torch.set_num_threads(1)
    threadpool_limits(1)


def repeat_timed(
    fn: Callable[[], Any],
    repeats: int,
    max_seconds: float | None = None,
    cleanup: Callable[[], Any] | None = None,
) -> list[float]:
    """Wall times (``perf_counter``) of ``repeats`` calls of ``fn``; stops early, after at least one
    call, once the total passes ``max_seconds``. ``cleanup`` runs after each call, untimed (e.g. a
    ``gc.collect()``, which takes about 0.25 s in a process that imported torch and transformers)."""
    times: list[float] = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if cleanup is not None:
            cleanup()
        if max_seconds is not None and sum(times) > max_seconds:
            break
    return times


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """``{"times": [...], "median": m, "min": m}`` in seconds."""
    return {"times": [round(t, 6) for t in times], "median": statistics.median(times), "min": min(times)}


def run_child(
    argv: Sequence[str], timeout: float | None = None, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python *argv`` in a fresh interpreter that writes one JSON object to the file named by
    the ``BENCH_RESULT`` environment variable; return that object.

    Raises:
        RuntimeError: the child failed, with the end of its stderr.
    """
    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        result = Path(tmp) / "result.json"
        child_env = {**os.environ, **(env or {}), "BENCH_RESULT": str(result)}
        proc = subprocess.run(
            [sys.executable, *argv], env=child_env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0 or not result.is_file():
            raise RuntimeError(
                f"child {' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        return json.loads(result.read_text())


def write_child_result(data: Mapping[str, Any]) -> None:
    """The child side of :func:`run_child` (prints the JSON when run by hand)."""
    target = os.environ.get("BENCH_RESULT")
    text = json.dumps(data, indent=1, default=str)
    if target:
        Path(target).write_text(text)
    else:
        print(text)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on, for the results page."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            info["mem_total_gib"] = round(int(handle.readline().split()[1]) / MIB, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["accelerator"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    for name in ("peft", "safetensors", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    return info


def roomiest_temp_dir(candidates: Iterable[str | os.PathLike] | None = None) -> Path:
    """The candidate folder (default: ``$TMPDIR``, ``/tmp``, ``/var/tmp``, the working directory)
    on the filesystem with the most free space."""
    paths = [Path(p) for p in (candidates or [tempfile.gettempdir(), "/tmp", "/var/tmp", os.getcwd()])]
    usable = [p for p in paths if p.is_dir() and os.access(p, os.W_OK)]
    return max(usable, key=lambda p: shutil.disk_usage(p).free)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Indented JSON with a trailing newline (parent folders created), written to a temporary file
    and renamed: a report written while parallel runs update their files never reads a half-written
    (or empty) one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_bytes(n: float | None) -> str:
    """``1.2 GiB`` style, ``n/a`` for None."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
