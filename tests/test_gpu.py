"""Training on a GPU: `make test-all` on a machine with one (they are skipped without)."""

import numpy as np
import pytest
import torch

from compress.feed import CUDA_RESERVE, Feed, activation_bytes, plan_cuda
from compress.fit import PAD, FitConfig, fit
from compress.student import StudentConfig, count_params
from tests.test_fit import interrupt_and_resume, realizable


def on_gpu(test):
    """A test that needs a CUDA GPU: marked `gpu`, skipped without one."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no GPU")
    return pytest.mark.gpu(skip(test))


@on_gpu
def test_a_gpu_student_is_as_good_as_the_cpu_one():
    x, z = realizable(3000)
    cfg = StudentConfig((12,), 5, 256, 6)
    got = {dev: fit(x[:2700], z[:2700], x[2700:], z[2700:], cfg, FitConfig(epochs=30, device=dev))
           for dev in ("cpu", "cuda")}
    assert got["cuda"].device.startswith("cuda") and got["cuda"].engine == "graph"  # a small step
    assert got["cuda"].history[-1]["agreement"] >= got["cpu"].history[-1]["agreement"] - 0.03
    with torch.no_grad():  # the returned student is on the CPU, raw inputs in, raw logits out
        s = got["cuda"].model(torch.from_numpy(x[2700:])).numpy()
    assert (s.argmax(1) == z[2700:].argmax(1)).mean() > 0.9


@on_gpu
def test_the_feed_copies_blocks_to_the_gpu_intact():
    x = np.random.default_rng(0).standard_normal((1000, 7)).astype(np.float32)
    z = np.random.default_rng(1).standard_normal((1000, 3)).astype(np.float32)
    bounds = [(a, a + 250) for a in range(0, 1000, 250)]
    feed = Feed(x, z, bounds, lambda x, z, a, b: (torch.from_numpy(x[a:b] * 1.0), torch.from_numpy(z[a:b])),
                torch.device("cuda"))
    for k, (xt, zt) in zip([3, 1, 0, 2], feed.epoch([3, 1, 0, 2]), strict=True):
        assert xt.is_cuda
        a, b = bounds[k]
        np.testing.assert_array_equal(xt.cpu().numpy(), x[a:b])
        np.testing.assert_array_equal(zt.cpu().numpy(), z[a:b])


def streaming_free_bytes(batch: int, rows: int) -> int:
    """Free GPU memory for the 12-feature student below at which a batch of `batch` fits but `rows`
    training rows do not (they need half again the room left beside the batch)."""
    padded = StudentConfig((12,), PAD, 256, 6)
    act = activation_bytes(12, 6, 256, PAD)
    room = 2 * batch * act + rows * 4 * (12 + 5) // 2  # the batch takes at most half the room
    return int((CUDA_RESERVE + 22 * count_params(padded) + room) / 0.9) + 1


def test_the_streaming_case_is_planned_as_streamed():  # the arithmetic of the GPU test below, on any machine
    padded = StudentConfig((12,), PAD, 256, 6)
    plan = plan_cuda(count_params(padded), activation_bytes(12, 6, 256, PAD), 32, 2700, 4 * (12 + 5),
                     streaming_free_bytes(32, 2700))
    assert plan.batch == 32 and plan.note is None
    assert plan.stream_rows is not None and 32 <= plan.stream_rows < 2700


def test_the_gpu_plan_streams_rows_that_do_not_fit(monkeypatch):  # fit's GPU planning, on any machine
    import dataclasses

    from compress import gpu_step
    from compress.fit import _plan_gpu

    cfg, cuda = StudentConfig((12,), 5, 256, 6), torch.device("cuda")  # a device object; nothing runs
    padded = dataclasses.replace(cfg, num_classes=PAD, rank=gpu_step.padded_rank(6, cuda))
    free = streaming_free_bytes(32, 2700)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    notes: list[str] = []
    bs, rows, eval_rows = _plan_gpu(cfg, padded, 32, 2700, None, cuda, 1, notes)
    assert bs == 32 and rows is not None and 32 <= rows < 2700 and eval_rows >= 1
    assert notes == ["the training rows do not fit on cuda beside the student: streamed in blocks of "
                     f"{rows:,} rows"]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**30, 80 * 2**30))
    notes = []
    assert _plan_gpu(cfg, padded, 32, 2700, None, cuda, 1, notes)[:2] == (32, None) and notes == []


@on_gpu
def test_rows_that_do_not_fit_on_the_gpu_are_streamed(monkeypatch):
    x, z = realizable(3000)
    cfg = StudentConfig((12,), 5, 256, 6)
    free = streaming_free_bytes(32, 2700)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    res = fit(x[:2700], z[:2700], x[2700:], z[2700:], cfg, FitConfig(epochs=30, batch_size=32, device="cuda"))
    assert res.batch_size == 32 and res.streamed and any("streamed in blocks" in n for n in res.notes)
    assert res.history[-1]["agreement"] > 0.88


@on_gpu
@pytest.mark.parametrize("front", [(), (("c", 3, 5), ("p", 2, 0))])
def test_the_graph_step_trains_as_autograd_does(front):
    """The CUDA-graph step against the eager one from the same start: 500 rows at batch 32, so each
    epoch ends with a short batch (20 rows) that runs eagerly between replays."""
    x, z = realizable(600)
    cfg = StudentConfig((12,), 5, 256, 6, front)
    runs = {e: fit(x[:500], z[:500], x[500:], z[500:], cfg, FitConfig(epochs=20, batch_size=32, device="cuda",
                                                                      engine=e))
            for e in ("graph", "autograd")}
    assert runs["graph"].engine == "graph" and runs["autograd"].engine == "autograd"
    curves = {e: [h["val_loss"] for h in r.history] for e, r in runs.items()}
    np.testing.assert_allclose(curves["graph"], curves["autograd"], rtol=1e-3)
    assert curves["graph"][-1] < 0.9 * curves["graph"][0]


@on_gpu
def test_a_graph_run_resumes_on_the_gpu_and_on_the_cpu(tmp_path):
    import dataclasses

    def stop(info):
        if info.get("epoch") == 2 and "loss" in info:
            raise KeyboardInterrupt

    x, z = realizable(600)
    cfg = StudentConfig((12,), 5, 64, 6, (("c", 3, 3), ("p", 2, 0)))
    fc = FitConfig(epochs=4, batch_size=32, device="cuda")  # auto: the graph step on the GPU
    full = fit(x[:500], z[:500], x[500:], z[500:], cfg, fc)
    assert full.engine == "graph"
    resumed = interrupt_and_resume(x, z, cfg, fc, str(tmp_path / "gpu.pt"), stop_epoch=2)
    assert resumed.engine == "graph" and [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(v, resumed.model.state_dict()[k], rtol=1e-4, atol=1e-5)
    ck = str(tmp_path / "cpu.pt")  # a graph run's checkpoint, finished on the CPU
    with pytest.raises(KeyboardInterrupt):
        fit(x[:500], z[:500], x[500:], z[500:], cfg, fc, stop, checkpoint=ck)
    on_cpu = fit(x[:500], z[:500], x[500:], z[500:], cfg, dataclasses.replace(fc, device="cpu"),
                 checkpoint=ck, resume=True)
    assert on_cpu.resumed_from_epoch == 2 and [h["epoch"] for h in on_cpu.history] == [1, 2, 3, 4]
    assert on_cpu.history[-1]["val_loss"] < on_cpu.history[0]["val_loss"]
