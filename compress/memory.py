"""How much memory training a student takes, against what this process may use: checked before the
teacher runs, so that a typo (`--width 400M` for 400k) is one line instead of a traceback from the
allocator, or the kernel's OOM killer, after the whole transfer set was labelled.

What the process may use is the smaller of MemAvailable (/proc/meminfo) and, in a container, the
room left under its cgroup's memory limit (v2 `memory.max` - `memory.current`, v1
`memory.limit_in_bytes` - `memory.usage_in_bytes`, the tightest level of the hierarchy).
"""

from __future__ import annotations

from pathlib import Path

from compress.threads import CGROUP_ROOT, _read, hierarchies

# float32 copies of every weight that a CPU fit holds at once: the weights, their gradients, Adam's two
# moments, and the best epoch's copy
STATE_COPIES = 5


def _meminfo_available(meminfo: str | None = None) -> int | None:
    text = meminfo if meminfo is not None else _read(Path("/proc/meminfo"))
    for line in (text or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _cgroup_room(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> int | None:
    """Bytes left under the tightest memory limit of this process's cgroups; None when none is set."""
    rooms = []
    for v2, levels in hierarchies("memory", ("memory",), root, proc_cgroup):
        files = [(lvl / "memory.max", lvl / "memory.current") if v2 else
                 (lvl / "memory.limit_in_bytes", lvl / "memory.usage_in_bytes") for lvl in levels]
        for limit_file, usage_file in files:
            try:
                limit, usage = int(_read(limit_file) or ""), int(_read(usage_file) or "0")
            except ValueError:  # "max", missing
                continue
            if 0 < limit < 2**60:  # v1 writes a huge number for no limit
                rooms.append(max(0, limit - usage))
    return min(rooms, default=None)


def available_bytes() -> int | None:
    """What this process may still allocate; None where it cannot be read (not Linux)."""
    found = [v for v in (_meminfo_available(), _cgroup_room()) if v is not None]
    return min(found, default=None)


def training_bytes(params: int, batch: int, activation_per_sample: int, data_bytes: int) -> int:
    """A CPU fit's peak: STATE_COPIES float32 copies of the weights, one step's activations, and the
    training data held in memory."""
    return STATE_COPIES * 4 * params + batch * activation_per_sample + data_bytes


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


# glibc malloc, tuned for a training loop: activations of a few MB each are allocated and freed every
# step; by default glibc hands such blocks back to the kernel (mmap / heap trimming) and faults them in
# again, zeroed, the next step. Measured on a conv student's CPU step (32c5-p-64c5-p-64L-1k, batch
# 256): 823 minor page faults a step by default, 0 with these settings. Blocks above MMAP_THRESHOLD
# (weights, large buffers) are still mapped and returned; at most TRIM_THRESHOLD of freed heap is kept.
MMAP_THRESHOLD = 64 * 2**20
TRIM_THRESHOLD = 256 * 2**20


def keep_freed_memory() -> bool:
    """Tune this process's glibc malloc as above (mallopt); a process-wide setting, so the CLI calls it,
    not the library. False where there is no glibc (macOS, musl) and nothing changed."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))
