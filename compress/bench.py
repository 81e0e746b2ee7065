"""Latency and throughput of ONNX models under onnxruntime.

Each (model, batch size) is warmed up, then timed call by call for a time budget (at least
`min_runs` calls); p50/p90/p99 come from those calls. Inputs and outputs are bound once through
IOBinding, so the timing holds the runtime's own work and not numpy conversions on every call; where
plain `session.run` is measured faster (it can be, for tiny models on CPU) that figure is kept and the
result says which was used.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import ConfigError
from compress.teachers.onnx_teacher import INPUT_TYPES
from compress.tokens import INT_TYPES, feeds, names_and_dtypes

_ORT_NP = {**INPUT_TYPES, **INT_TYPES}  # INPUT_TYPES: what bench makes random inputs for


def make_session(path: str | Path, provider: str = "cpu", threads: int | None = None) -> Any:
    import onnxruntime as ort

    from compress.teachers import gpu_available
    from compress.teachers.onnx_teacher import session_options

    opts = session_options(threads)
    opts.log_severity_level = 4  # a failing run is reported as one line by the caller, not C++ status dumps
    if provider == "cuda":
        if not (gpu_available() and "CUDAExecutionProvider" in ort.get_available_providers()):
            raise ConfigError("--provider: cuda was asked for but no GPU / CUDA provider is available")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), opts, providers=providers)


def _timed(fn: Any, budget_s: float, min_runs: int, max_runs: int) -> np.ndarray:
    for _ in range(5):  # warm-up: allocations, thread pools, caches
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return np.array(times)


def latency(sess: Any, sample: np.ndarray | None = None, batch_sizes: tuple[int, ...] = (1, 256),
            fixed_batch: int | None = None, budget_s: float = 1.0, min_runs: int = 30,
            max_runs: int = 5000) -> dict[str, dict[str, Any]]:
    """Milliseconds per call at each batch size: p50, p90, p99, runs, samples/s, and the method.

    `sample` supplies real inputs (repeated to fill a batch); without it, standard normal ones of
    the model's input shape. A model with a batch size baked in is timed at that size only.
    """
    import onnxruntime as ort

    inputs, outs = sess.get_inputs(), sess.get_outputs()
    inp = inputs[0]
    dtype = _ORT_NP.get(inp.type, np.float32)
    if len(inputs) > 1:  # token inputs: `sample` is their (N, I, L) stack (compress.tokens)
        if sample is None or sample.ndim != 3 or sample.shape[1] != len(inputs):
            raise ConfigError(f"a model of {len(inputs)} inputs {[i.name for i in inputs]} is timed on real "
                              "inputs stacked as (N, inputs, tokens)")
        dtype = np.int64
        names, dtypes = names_and_dtypes(inputs)
    if sample is None:
        shape = inp.shape[1:]
        if not all(isinstance(d, int) for d in shape):
            raise ConfigError(f"model input '{inp.name}' has dynamic dimensions {inp.shape} besides "
                              "the batch axis; benchmark it with real inputs")
        from compress.data import random_inputs

        sample = random_inputs(64, tuple(shape), dtype)
    sample = sample.astype(dtype)
    device = "cuda" if "CUDAExecutionProvider" in sess.get_providers() else "cpu"
    result: dict[str, dict[str, Any]] = {}
    for b in (fixed_batch,) if fixed_batch else batch_sizes:
        x = np.ascontiguousarray(np.resize(sample, (b, *sample.shape[1:])))
        feed = feeds(names, dtypes, x) if len(inputs) > 1 else {inp.name: x}
        binding = sess.io_binding()
        for name, value in feed.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
        for o in outs:
            binding.bind_output(o.name, device)
        bound = _timed(lambda binding=binding: sess.run_with_iobinding(binding), budget_s / 2,
                       min_runs, max_runs)
        plain = _timed(lambda feed=feed: sess.run(None, feed), budget_s / 2, min_runs, max_runs)
        times, method = (bound, "iobinding") if np.median(bound) <= np.median(plain) else (plain, "run")
        result[str(b)] = {
            "p50": float(np.percentile(times, 50)), "p90": float(np.percentile(times, 90)),
            "p99": float(np.percentile(times, 99)), "runs": int(times.size),
            "samples_per_second": float(b / (np.median(times) / 1e3)), "method": method,
        }
    return result


def latency_of(fn: Any, sample: np.ndarray, batch_sizes: tuple[int, ...], budget_s: float = 1.0,
               min_runs: int = 30, max_runs: int = 5000) -> dict[str, dict[str, Any]]:
    """The same figures as `latency`, for any callable taking a batch (a PyTorch teacher)."""
    result: dict[str, dict[str, Any]] = {}
    for b in batch_sizes:
        x = np.ascontiguousarray(np.resize(sample, (b, *sample.shape[1:])))
        times = _timed(lambda x=x: fn(x), budget_s, min_runs, max_runs)
        result[str(b)] = {
            "p50": float(np.percentile(times, 50)), "p90": float(np.percentile(times, 90)),
            "p99": float(np.percentile(times, 99)), "runs": int(times.size),
            "samples_per_second": float(b / (np.median(times) / 1e3)), "method": "python",
        }
    return result


def bench(paths: list[str | Path], batch_sizes: tuple[int, ...] = (1, 64, 256), provider: str = "cpu",
          threads: int | None = None, budget_s: float = 1.0) -> dict[str, Any]:
    """Latency of each model at each batch size, with what it ran on."""
    from compress.onnxfiles import onnx_size

    models = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise ConfigError(f"MODEL {p}: file not found")
        try:
            sess = make_session(p, provider, threads)
        except ConfigError:
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"MODEL {p}: onnxruntime cannot load it ({first})") from None
        inputs = sess.get_inputs()
        if len(inputs) != 1:
            raise ConfigError(f"MODEL {p}: takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                              "bench times models of one float input")
        inp = inputs[0]
        if inp.type not in INPUT_TYPES:
            raise ConfigError(f"MODEL {p}: input '{inp.name}' is {inp.type}; bench times models of one "
                              "input of floats or small integers")
        dims = inp.shape
        if not isinstance(dims, list) or len(dims) < 2:
            raise ConfigError(f"MODEL {p}: input '{inp.name}' has shape {dims}, without a batch axis and "
                              "a sample shape; bench times models shaped (batch, ...)")
        fixed = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
        try:
            lat = latency(sess, None, batch_sizes, fixed, budget_s)
        except ConfigError:
            raise
        except Exception as e:  # onnxruntime's failure on these inputs, as one line
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ConfigError(f"MODEL {p}: fails when run on inputs shaped {dims} ({first})") from None
        models.append({"model": str(p), "size_bytes": onnx_size(p),  # with a weights file beside it
                       "latency_ms": lat, "providers": sess.get_providers()})
    return {"provider": provider, "threads": threads, "cpu_count": os.cpu_count(), "models": models}
