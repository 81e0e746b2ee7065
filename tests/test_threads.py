"""Thread budgets under a container's CPU quota (compress/threads.py), and where they are applied."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compress import threads
from compress.fit import FitConfig, fit
from compress.student import StudentConfig
from compress.teachers.onnx_teacher import session_options


def write(root, rel, **files):
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name.replace("_", ".", 1)).write_text(text + "\n")


def test_cgroup_v2_quota_is_the_tightest_level_of_the_path(tmp_path):
    write(tmp_path, ".", cpu_max="max 100000")
    write(tmp_path, "kubepods/pod1", cpu_max="250000 100000")  # 2.5 CPUs set on the pod
    write(tmp_path, "kubepods/pod1/ctr", cpu_max="max 100000")  # the container itself: unlimited
    assert threads.cpu_quota(tmp_path, "0::/kubepods/pod1/ctr") == 2.5
    write(tmp_path, "kubepods/pod1/ctr", cpu_max="50000 100000")
    assert threads.cpu_quota(tmp_path, "0::/kubepods/pod1/ctr") == 0.5


@pytest.mark.parametrize("text", ["max 100000", "", "junk", "100000", "-1 100000", "1 0"])
def test_no_quota_or_an_unreadable_one_is_none(tmp_path, text):
    write(tmp_path, "c", cpu_max=text)
    assert threads.cpu_quota(tmp_path, "0::/c") is None
    assert threads.cpu_quota(tmp_path / "missing", "0::/c") is None
    assert threads.cpu_quota(tmp_path, "") is None


def test_cgroup_v1_quota_under_either_mount_name(tmp_path):
    write(tmp_path, "cpu,cpuacct/docker/abc", cpu_cfs_quota_us="150000", cpu_cfs_period_us="100000")
    assert threads.cpu_quota(tmp_path, "4:cpu,cpuacct:/docker/abc\n1:memory:/docker/abc") == 1.5
    write(tmp_path / "hybrid", "cpu/ctest", cpu_cfs_quota_us="300000", cpu_cfs_period_us="100000")
    write(tmp_path / "hybrid", "cpu", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    assert threads.cpu_quota(tmp_path / "hybrid", "2:cpuacct:/\n1:cpu:/ctest\n0::/") == 3.0
    assert threads.cpu_quota(tmp_path / "hybrid", "1:cpu:/") is None


def test_budget_rounds_the_quota_down_within_the_cpus():
    assert threads.cpu_budget(quota=2.5, cpus=16) == 2
    assert threads.cpu_budget(quota=0.5, cpus=16) == 1
    assert threads.cpu_budget(quota=64.0, cpus=8) == 8
    assert threads.cpu_budget(quota=4.0, cpus=8) == 4


def realizable(n=1200):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 10)).astype(np.float32)
    return x, np.tanh(x @ rng.standard_normal((10, 4)).astype(np.float32))


def test_fit_trains_within_the_quota_and_restores_torch(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "cpu_budget", lambda **_: 1)
    seen = []
    x, z = realizable()
    outside = torch.get_num_threads()
    torch.set_num_threads(2)  # so that a quota of 1 CPU is below torch's pool on any machine
    try:
        res = fit(x[:1000], z[:1000], x[1000:], z[1000:], StudentConfig((10,), 4, 32, 4),
                  FitConfig(epochs=2, engine="autograd"),
                  progress=lambda _: seen.append(torch.get_num_threads()))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(outside)
    assert res.threads == 1 and set(seen) == {1}
    assert res.notes[0] == ("a CPU quota lets this process keep 1 CPU busy: trained with 1 thread, "
                            "not torch's 2")
    assert res.report()["threads"] == 1


def test_an_explicit_omp_num_threads_is_left_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(threads, "cpu_budget", lambda **_: 1)
    x, z = realizable()
    res = fit(x[:1000], z[:1000], x[1000:], z[1000:], StudentConfig((10,), 4, 32, 4), FitConfig(epochs=1))
    assert res.threads == torch.get_num_threads() and not res.notes


def test_onnxruntime_sessions_take_the_budget_only_under_a_quota(monkeypatch):
    monkeypatch.setattr(threads, "quota_cap", lambda: 3)
    assert session_options().intra_op_num_threads == 3
    assert session_options(5).intra_op_num_threads == 5  # asked for (compress bench --threads)
    monkeypatch.setattr(threads, "quota_cap", lambda: None)
    assert session_options().intra_op_num_threads == 0  # onnxruntime's own choice


def test_a_torch_teacher_labels_within_the_quota(tmp_path, monkeypatch):
    from compress.teachers import torch_teacher
    from compress.teachers.torch_teacher import TorchTeacher

    net = torch.nn.Sequential(torch.nn.Linear(6, 3))
    path = tmp_path / "t.pt"
    torch.jit.save(torch.jit.trace(net, torch.randn(2, 6)), str(path))
    teacher = TorchTeacher(path)
    seen = []
    real = torch_teacher.run_batched
    monkeypatch.setattr(torch_teacher, "run_batched",
                        lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "cpu_budget", lambda **_: 1)
    outside = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
        np.testing.assert_allclose(teacher.logits(x), net(torch.from_numpy(x)).detach().numpy(), rtol=1e-5)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(outside)


def test_memory_room_under_cgroup_limits(tmp_path):
    """compress/memory.py reads the tightest cgroup memory limit (v2 and v1), as threads.py the CPU one."""
    from compress.memory import _cgroup_room, _meminfo_available

    v2 = tmp_path / "v2"
    (v2 / "a" / "b").mkdir(parents=True)
    (v2 / "a" / "memory.max").write_text("max\n")
    (v2 / "a" / "b" / "memory.max").write_text("1000\n")
    (v2 / "a" / "b" / "memory.current").write_text("400\n")
    assert _cgroup_room(v2, "0::/a/b\n") == 600
    v1 = tmp_path / "v1"
    (v1 / "memory" / "x").mkdir(parents=True)
    (v1 / "memory" / "x" / "memory.limit_in_bytes").write_text("2000\n")
    (v1 / "memory" / "x" / "memory.usage_in_bytes").write_text("500\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1's "no limit"
    assert _cgroup_room(v1, "5:memory:/x\n3:cpu,cpuacct:/x\n") == 1500
    assert _cgroup_room(tmp_path, "0::/\n") is None
    assert _meminfo_available("MemTotal: 10 kB\nMemAvailable:     2048 kB\n") == 2048 * 1024
