"""The statistics update compiled for the CPU: ``native.c``, built once with the system C compiler.

On the CPU, :meth:`knockout.stats.LayerStats.add` hands float32 batches whose values all lie inside the histogram
window (the common case) to it, and uses its torch path otherwise. Both give the same counts bit for bit
(``floorf(x / eps)`` in float32 either way) and the same moments up to float64 rounding (both are two float64
passes, summed in another order). Where the torch path makes a dozen passes over the batch and a ``bincount``, this
makes two, split over ``torch.get_num_threads()`` threads by ranges of neurons (the counts do not depend on the
split); it is a few times faster (README, Benchmark).

The library is built on first use into ``~/.cache/knockout/native/`` (keyed by the source, the compiler, its flags and
the CPU), with ``-O3 -march=native`` (retried without ``-march=native`` if the compiler refuses it), never with
fast-math or FMA contraction. Without a C compiler, or if the build fails, knockout says why once (log level INFO) and
uses the torch path. ``KNOCKOUT_NATIVE=0`` turns it off; ``CC`` names the compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
CACHE = Path.home() / ".cache" / "knockout" / "native"
#: No fast-math, no FMA contraction: the bins (and moments' rounding) must follow IEEE single and double arithmetic.
#: ``-fno-math-errno -fno-trapping-math`` only let floorf and the division be vectorised; they change no value.
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]

_state: dict = {}  # "lib": the loaded library, or None once building or loading failed; "pool", "workers": threads


def library() -> ctypes.CDLL | None:
    """The compiled update, built and loaded on first call; None where it is turned off or cannot be built."""
    if os.environ.get("KNOCKOUT_NATIVE", "1") == "0":
        return None
    if "lib" not in _state:
        try:
            _state["lib"] = _load(build())
        except Exception as e:  # any failure only costs the speed-up
            log.info("compiled statistics update not available (%s); using the torch path", e)
            _state["lib"] = None
    return _state["lib"]


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build() -> Path:
    """The compiled library's path, compiling it into :data:`CACHE` unless it is there already."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    source = SOURCE.read_bytes()
    error = ""
    for flags in (["-march=native", *FLAGS], FLAGS):
        parts = [source, cc.encode(), " ".join(flags).encode(), _cpu_id().encode(), platform.machine().encode()]
        key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
        target = CACHE / f"knockout_stats-{key}.so"
        if target.is_file():
            return target
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            out = Path(tmp) / target.name
            done = subprocess.run([cc, *flags, "-o", str(out), str(SOURCE), "-lm"], capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(out, target)  # atomic: no process loads a half-written library
                return target
            error = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    raise RuntimeError(f"{cc} failed: {error}")


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))  # ctypes releases the GIL during a call: ranges of neurons run on several threads
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ko_pass1.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr]
    lib.ko_pass1.restype = i64
    lib.ko_pass2.argtypes = [ptr, i64, i64, i64, i64, ctypes.c_float, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr]
    lib.ko_pass2.restype = None
    return lib


def usable(x: torch.Tensor) -> bool:
    """Whether the compiled update can take the batch ``x`` (a float32 CPU tensor) and is available."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and library() is not None


def _split(run, w: int, threads: int | None) -> list:
    """``run(j0, j1)`` on one range of the ``w`` neurons per thread (``torch.get_num_threads()`` by default), the
    caller's thread taking the first; the results in order."""
    threads = max(1, min(threads or torch.get_num_threads(), w))
    bounds = [w * t // threads for t in range(threads + 1)]
    if threads == 1:
        return [run(0, w)]
    if _state.get("workers", 0) < threads - 1:  # a pool with enough threads, made once (or when more are asked)
        _state["pool"] = ThreadPoolExecutor(threads - 1, thread_name_prefix="knockout-stats")
        _state["workers"] = threads - 1
    pool = _state["pool"]
    futures = [pool.submit(run, bounds[t], bounds[t + 1]) for t in range(1, threads)]
    return [run(bounds[0], bounds[1]), *(f.result() for f in futures)]


def pass1(x: torch.Tensor, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(mean, min, max, number of NaN/inf values)`` of each neuron of ``x: [n, w]`` (float32, contiguous, n >= 1);
    the mean in float64, the extremes in float32."""
    lib = library()
    n, w = x.shape
    mean = torch.empty(w, dtype=torch.float64)
    lo, hi = torch.empty(w, dtype=torch.float32), torch.empty(w, dtype=torch.float32)
    ptrs = (mean.data_ptr(), lo.data_ptr(), hi.data_ptr())
    bad = _split(lambda j0, j1: lib.ko_pass1(x.data_ptr(), n, w, j0, j1, *ptrs), w, threads)
    return mean, lo, hi, sum(bad)


def pass2(
    x: torch.Tensor, mean: torch.Tensor, eps: float, k_min: int, k_max: int, k_lo: int,
    hist: torch.Tensor, under: torch.Tensor, over: torch.Tensor, threads: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Count finite ``x: [n, w]`` (float32, contiguous) into ``hist`` (``[w, n_bins]``, first column bin ``k_lo``,
    covering every bin of x inside ``[k_min, k_max]``), ``under`` and ``over`` in place; return the sum of squared
    deviations from ``mean`` (from :func:`pass1`) in float64."""
    lib = library()
    for t in (hist, under, over):
        if t.device.type != "cpu" or t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError("the compiled update counts into contiguous int64 CPU tensors")
    n, w = x.shape
    m2 = torch.empty(w, dtype=torch.float64)
    ptrs = (mean.data_ptr(), hist.data_ptr(), under.data_ptr(), over.data_ptr(), m2.data_ptr())
    args = (eps, k_min, k_max, k_lo, hist.shape[1])
    _split(lambda j0, j1: lib.ko_pass2(x.data_ptr(), n, w, j0, j1, *args, *ptrs), w, threads)
    return m2
