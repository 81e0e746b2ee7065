"""How many CPU threads this process may keep busy: the CPUs it may run on, capped by a container's
CPU quota.

torch and onnxruntime size their thread pools from the machine's cores. A container limited by a
CFS quota (`docker --cpus 4`, a Kubernetes CPU limit) still sees every core of the host, in
`os.cpu_count()` and in its affinity mask alike; a pool sized to the host then runs more threads than
the quota lets run at once, the kernel throttles the group, and threads that meet at barriers (the
split training step's, BLAS's) wait for the throttled ones. So the budget is the quota (cgroup v2
`cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`, the tightest of this process's cgroup and
its ancestors) rounded down, at least 1, and at most the CPUs in the affinity mask. An explicit
OMP_NUM_THREADS is the user's choice and is left alone.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _levels(root: Path, rel: str) -> list[Path]:
    """`root/rel` and each of its parents up to `root`: a quota set higher up binds too."""
    parts = [p for p in rel.strip("/").split("/") if p and p not in (".", "..")]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _tightest(levels: list[Path], quota_and_period: Callable[[Path], tuple[str, str]]) -> float | None:
    """The smallest quota / period over the levels that set one (a missing, unlimited or garbled
    level sets none)."""
    quotas = []
    for level in levels:
        try:
            quota, period = (int(v) for v in quota_and_period(level))
        except ValueError:  # "max", "", junk
            continue
        if quota > 0 and period > 0:  # v1 writes -1 for no quota
            quotas.append(quota / period)
    return min(quotas, default=None)


def _v2(level: Path) -> tuple[str, str]:
    fields = (_read(level / "cpu.max") or "").split()
    return (fields[0], fields[1]) if len(fields) == 2 else ("", "")


def _v1(level: Path) -> tuple[str, str]:
    return _read(level / "cpu.cfs_quota_us") or "", _read(level / "cpu.cfs_period_us") or ""


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The CPUs' worth of time a second this process's cgroup may use (2.5 for `--cpus 2.5`); None
    when no quota is set or none can be read (not Linux, no cgroup filesystem)."""
    found = [_tightest(levels, _v2 if v2 else _v1)
             for v2, levels in hierarchies("cpu", ("cpu,cpuacct", "cpu"), root, proc_cgroup)]
    return min((q for q in found if q is not None), default=None)


def hierarchies(controller: str, v1_mounts: tuple[str, ...], root: Path = CGROUP_ROOT,
                proc_cgroup: str | None = None) -> list[tuple[bool, list[Path]]]:
    """(is cgroup v2, this process's cgroup and its parents) for each hierarchy that `controller`
    applies to: the unified one (v2), or a v1 one mounted under one of `v1_mounts`."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    out = []
    for line in proc_cgroup.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hier == "0" and controllers == "":  # cgroup v2 (unified)
            out.append((True, _levels(root, rel)))
        elif controller in controllers.split(","):  # cgroup v1: mounted as e.g. cpu,cpuacct or cpu
            for mount in (controllers, *v1_mounts):
                if (root / mount).is_dir():
                    out.append((False, _levels(root / mount, rel)))
                    break
    return out


def affinity() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cpu_budget(quota: float | None = None, cpus: int | None = None) -> int:
    """Threads that can all run at once: the quota rounded down (at least 1), at most the CPUs."""
    cpus = affinity() if cpus is None else cpus
    quota = cpu_quota() if quota is None else quota
    return cpus if quota is None else max(1, min(cpus, math.floor(quota + 1e-9)))


def user_set_threads() -> bool:
    """OMP_NUM_THREADS (or MKL_NUM_THREADS) in the environment: the user sized the pools."""
    return any(os.environ.get(v, "").strip() for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))


def quota_cap() -> int | None:
    """The budget when a CPU quota makes it lower than the CPUs this process may run on; else None
    (thread pools sized by torch or onnxruntime themselves are then right)."""
    cpus = affinity()
    budget = cpu_budget(cpus=cpus)
    return budget if budget < cpus else None


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op pool at `n` threads inside the block, as it was after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def training_threads() -> tuple[int, str | None]:
    """torch threads for a fit, and a note when that is fewer than torch would take by itself."""
    import torch

    own = torch.get_num_threads()
    if user_set_threads():
        return own, None
    budget = cpu_budget()
    if budget >= own:
        return own, None
    cpus = f"{budget} CPU" + ("s" if budget > 1 else "")
    return budget, (f"a CPU quota lets this process keep {cpus} busy: trained with {budget} "
                    f"thread{'s' if budget > 1 else ''}, not torch's {own}")
