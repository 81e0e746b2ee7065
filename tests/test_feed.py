import threading

import numpy as np
import pytest
import torch

from compress.errors import ConfigError
from compress.feed import Feed, GiB, activation_bytes, plan_cuda
from compress.fit import FitConfig, fit
from compress.student import StudentConfig, count_params
from tests.test_fit import realizable

CPU = torch.device("cpu")


def prep(x, z, a, b):
    return torch.from_numpy(np.asarray(x[a:b]) * 2.0), torch.from_numpy(np.asarray(z[a:b]))


class Source:
    """Rows whose reads are recorded (which block, on which thread) and can be made to fail."""

    def __init__(self, n, fail_at=None):
        self.x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
        self.reads, self.fail_at, self.asked = [], fail_at, threading.Event()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, rows):
        self.reads.append((rows.start, threading.current_thread().name))
        if rows.start == self.fail_at:
            raise OSError(f"block at row {rows.start} is unreadable")
        if len(self.reads) == 2:
            self.asked.set()
        return self.x[rows]


def feed_threads():
    return [t for t in threading.enumerate() if t.name.startswith("compress-feed")]


def test_blocks_come_in_the_asked_order_the_same_with_and_without_read_ahead():
    bounds = [(a, min(100, a + 30)) for a in range(0, 100, 30)]
    src = Source(100)
    order = [2, 0, 3, 1]
    got = {}
    for ahead in (True, False):
        feed = Feed(src, src.x[:, :1].copy(), bounds, prep, CPU, prefetch=ahead)
        got[ahead] = [x.clone() for x, _ in feed.epoch(order)]
    for k, x in zip(order, got[True], strict=True):
        a, b = bounds[k]
        np.testing.assert_array_equal(x.numpy(), src.x[a:b] * 2.0)
    assert all(torch.equal(a, b) for a, b in zip(got[True], got[False], strict=True))
    assert not feed_threads()


def test_the_next_block_is_read_while_this_one_trains():
    src = Source(100)
    feed = Feed(src, np.zeros((100, 1), np.float32), [(0, 50), (50, 100)], prep, CPU)
    it = feed.epoch([1, 0])
    next(it)  # block 1 in hand, not asked for block 0 yet: it is being read already, elsewhere
    assert src.asked.wait(timeout=10)
    assert src.reads[1][0] == 0 and src.reads[1][1].startswith("compress-feed")
    assert len(list(it)) == 1 and not feed_threads()


def test_a_failed_read_reaches_the_loop_and_leaves_no_thread():
    src = Source(100, fail_at=50)
    feed = Feed(src, np.zeros((100, 1), np.float32), [(0, 50), (50, 100)], prep, CPU)
    got = []
    with pytest.raises(OSError, match="row 50 is unreadable"):
        for x, _ in feed.epoch([0, 1]):
            got.append(x)
    assert len(got) == 1 and not feed_threads()


def test_a_loop_that_stops_early_leaves_no_thread():
    src = Source(100)
    feed = Feed(src, np.zeros((100, 1), np.float32), [(a, a + 25) for a in range(0, 100, 25)], prep, CPU)
    for _ in feed.epoch([0, 1, 2, 3]):
        break
    assert not feed_threads()


def test_one_block_is_prepared_once():
    src = Source(40)
    feed = Feed(src, np.zeros((40, 1), np.float32), [(0, 40)], prep, CPU)
    for _ in range(3):
        assert len(list(feed.epoch([0]))) == 1
    assert len(src.reads) == 1


def test_streamed_fit_reads_ahead_and_still_learns():
    x, z = realizable(3000)
    cfg, fc = StudentConfig((12,), 5, 64, 6), FitConfig(epochs=30)
    whole = fit(x[:2700], z[:2700], x[2700:], z[2700:], cfg, fc)
    streamed = fit(x[:2700], z[:2700], x[2700:], z[2700:], cfg, fc, stream_rows=500)  # 6 blocks
    assert streamed.streamed and not whole.streamed and streamed.batch_size == 128
    assert streamed.history[-1]["agreement"] > 0.88
    assert abs(streamed.history[-1]["agreement"] - whole.history[-1]["agreement"]) < 0.05


# ---- the GPU's memory -----------------------------------------------------------------------------


def paper_student(batch=128, rows=1_100_000, free=80 * GiB):
    cfg = StudentConfig((1845,), 192, 400_000, 250)
    return plan_cuda(count_params(cfg), activation_bytes(1845, 250, 400_000, 192), batch, rows,
                     4 * (1845 + 183), free, what="cuda:0")


def test_the_paper_student_and_timit_fit_an_80_gib_gpu_whole():
    plan = paper_student()
    assert (plan.batch, plan.stream_rows, plan.note) == (128, None, None)


def test_a_batch_too_large_for_the_gpu_is_halved_with_a_note():
    plan = paper_student(batch=65536, rows=1000)
    assert plan.batch < 65536 and plan.batch & (plan.batch - 1) == 0  # halved: a power of two here
    assert plan.batch * activation_bytes(1845, 250, 400_000, 192) < 40 * GiB
    assert "--batch-size: 65536" in plan.note and f"training with {plan.batch}" in plan.note


def test_rows_that_do_not_fit_beside_the_student_are_streamed():
    plan = paper_student(rows=20_000_000)  # 152 GiB of rows
    assert plan.batch == 128 and plan.stream_rows is not None
    assert 3 * plan.stream_rows * 4 * (1845 + 183) < 80 * GiB
    assert plan.stream_rows > 1_000_000  # large blocks, not a trickle


def test_a_student_too_large_for_the_gpu_is_refused():
    with pytest.raises(ConfigError, match="--width: .* cuda:0 has 8.0 GiB free"):
        plan_cuda(10**9, 10**6, 128, 10, 10, 8 * GiB, "cuda:0")  # a billion weights: 22 GB of state


def test_ddp_gradient_buckets_are_counted():
    alone = plan_cuda(10**9, 10**6, 128, 10, 10, 26 * GiB, "cuda:0")  # 22 GB of state: fits
    assert alone.batch == 128 and alone.eval_rows == 384
    with pytest.raises(ConfigError, match="--width: .* need 24.2 GiB"):
        plan_cuda(10**9, 10**6, 128, 10, 10, 26 * GiB, "cuda:0", ddp=True)  # 26 GB with the buckets
