"""The split CPU step (compress/split_step.py) against autograd + AdamW, and inside `fit`."""

import copy
import threading
import time

import numpy as np
import pytest
import torch

from compress.errors import ConfigError
from compress.fit import FitConfig, _loss_fn, fit
from compress.split_step import SplitStep
from compress.student import StudentConfig, build_student
from tests.test_fit import interrupt_and_resume


def check_against_autograd(make_step, reference, loss, x, z, c, batches):
    """A step made by `make_step(model, opt, loss_fn)` on a copy of `reference` against autograd +
    AdamW on `reference`: the same loss at every step (batches of the given sizes, a schedule changing
    the rate through the optimizer), then the same weights and Adam moments."""
    threads_before = torch.get_num_threads()
    model = copy.deepcopy(reference)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    loss_fn = _loss_fn(FitConfig(loss=loss, temperature=2.0), 1.5)
    with make_step(model, opt, loss_fn) as step:
        for i, size in enumerate(batches):
            idx = torch.randint(0, len(x), (size,))
            for group in ref_opt.param_groups + opt.param_groups:
                group["lr"] = 1e-2 / (i + 1)  # a schedule reaches the step through the optimizer
            want = loss_fn(reference(x[idx])[:, :c], z[idx])
            ref_opt.zero_grad()
            want.backward()
            ref_opt.step()
            got = step.step(x, z, idx)
            assert float(got) == pytest.approx(float(want.detach()), rel=1e-5)
        step.to_model()
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[q][key], ref_opt.state[p][key], rtol=1e-3, atol=1e-8)
        assert float(opt.state[q]["step"]) == len(batches)
    assert torch.get_num_threads() == threads_before


@pytest.mark.parametrize("rank", [6, 0])
@pytest.mark.parametrize("loss", ["l2", "kl"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("block", [None, 7])  # one block a thread; blocks of 7 units, the last shorter
def test_split_step_is_autograd_and_adamw(rank, loss, threads, block):
    torch.manual_seed(0)
    c, c_pad = 13, 16
    reference = build_student(StudentConfig((12,), c_pad, 40, rank))
    x, z = torch.randn(100, 12), torch.randn(100, c)
    check_against_autograd(lambda m, o, f: SplitStep(m, o, f, c, 32, threads, l2=loss == "l2", block=block),
                           reference, loss, x, z, c, [32] * 5 + [7])  # the last batch is short


def test_split_step_resumes_from_optimizer_state():
    """Moments written back by `to_model` are where a new split step (after --resume) starts."""
    torch.manual_seed(1)
    model = build_student(StudentConfig((12,), 16, 40, 6))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    loss_fn = _loss_fn(FitConfig(), 1.0)
    x, z = torch.randn(64, 12), torch.randn(64, 16)
    idx = torch.arange(32)
    with SplitStep(model, opt, loss_fn, 16, 32, 2, l2=True) as step:
        step.step(x, z, idx)
        step.to_model()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, fused=True)
    twin_opt.load_state_dict(opt.state_dict())
    for s, (m, o) in enumerate([(model, opt), (twin, twin_opt)]):
        with SplitStep(m, o, loss_fn, 16, 32, 2 + s, l2=True) as step:
            assert step.step_count == 1
            step.step(x, z, idx + 32)
            step.to_model()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_failing_thread_reaches_the_caller_and_nothing_hangs():
    threads_before = torch.get_num_threads()
    model = build_student(StudentConfig((12,), 16, 40, 6))
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    x, z = torch.randn(64, 12), torch.randn(64, 16)
    step = SplitStep(model, opt, _loss_fn(FitConfig(), 1.0), 16, 32, 2, l2=True)
    bad = torch.tensor([0] * 16 + [10_000] * 16)  # only thread 1's rows are out of range
    with pytest.raises(IndexError):
        step.step(x, z, bad)
    step.close()
    assert not any(t.name.startswith("compress-step") for t in threading.enumerate())
    assert torch.get_num_threads() == threads_before


def _interrupted_after_meeting(step, call):
    """Run `call` with a KeyboardInterrupt raised right after its first meeting with the threads:
    the threads have read the job and started it, the caller never runs its share."""
    meet = step._meet

    def meet_then_interrupt():
        meet()
        raise KeyboardInterrupt

    step._meet = meet_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        call()
    del step._meet  # back to the class's method, for close()


@pytest.mark.parametrize("when", ["step", "sync"])
def test_ctrl_c_between_meetings_leaves_no_thread_behind(when):
    """Ctrl-C can land in the caller just after a meeting released the threads into a step (or the
    second half of a sync). close() must not take that for an orderly meeting: it used to, and then
    waited 10 s for a thread stuck in the step's next barrier, and left it running."""
    model = build_student(StudentConfig((12,), 16, 40, 6))
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    x, z = torch.randn(64, 12), torch.randn(64, 16)
    step = SplitStep(model, opt, _loss_fn(FitConfig(), 1.0), 16, 32, 2, l2=True)
    step.step(x, z, torch.arange(32))
    call = step.sync if when == "sync" else lambda: step.step(x, z, torch.arange(32))
    _interrupted_after_meeting(step, call)
    start = time.perf_counter()
    step.close()
    assert time.perf_counter() - start < 2
    assert not any(t.name.startswith("compress-step") for t in threading.enumerate())


def data(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, 20)) * rng.uniform(0.1, 10, 20)).astype(np.float32)
    w = rng.standard_normal((20, 7)).astype(np.float32)
    return x, np.tanh(x @ w / 5) * 4


def test_fit_with_the_split_step_learns_like_autograd():
    threads_before = torch.get_num_threads()
    x, z = data()
    cfg = StudentConfig((20,), 7, 128, 8)
    runs = {e: fit(x[:2700], z[:2700], x[2700:], z[2700:], cfg, FitConfig(epochs=8, engine=e))
            for e in ("split", "autograd")}
    assert runs["split"].engine == "split" and runs["autograd"].engine == "autograd"
    assert torch.get_num_threads() == threads_before
    curves = {e: [h["val_loss"] for h in r.history] for e, r in runs.items()}
    assert curves["split"][-1] < 0.5 * curves["split"][0]
    np.testing.assert_allclose(curves["split"], curves["autograd"], rtol=1e-3)
    with torch.no_grad():  # the folded students take raw inputs and agree with each other
        s, a = (runs[e].model(torch.from_numpy(x[2700:])).numpy() for e in ("split", "autograd"))
    np.testing.assert_allclose(s, a, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("front", [(), (("c", 3, 3), ("p", 2, 0))])  # SplitStep; ConvStep
def test_split_fit_resumes_to_the_same_weights(tmp_path, front):
    x, z = data(600)
    cfg, fc = StudentConfig((20,), 7, 64, 6, front), FitConfig(epochs=4, engine="split")
    full = fit(x[:500], z[:500], x[500:], z[500:], cfg, fc)

    ck = str(tmp_path / "checkpoint.pt")
    resumed = interrupt_and_resume(x, z, cfg, fc, ck, stop_epoch=2)
    assert not any(t.name.startswith("compress-step") for t in threading.enumerate())
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_auto_picks_the_split_step_only_where_it_pays():
    x, z = data(600)
    small = fit(x[:500], z[:500], x[500:], z[500:], StudentConfig((20,), 7, 16, 4), FitConfig(epochs=1))
    assert small.engine == "autograd"  # 6 x weights x batch far below 100 MFLOP a step
    wide = fit(x[:500], z[:500], x[500:], z[500:], StudentConfig((20,), 7, 20_000, 0),
               FitConfig(epochs=1, batch_size=128))
    assert wide.engine == "split"
    with pytest.raises(ConfigError, match="--engine"):
        FitConfig(engine="threads").validate()
    with pytest.raises(ConfigError, match="--engine split: only for single-process CPU training"):
        FitConfig(engine="split", device="cuda").validate()  # before anything is read or labelled


def test_the_graph_step_is_chosen_for_small_steps_on_one_gpu():
    from compress.engine import use_graph as _use_graph

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object; nothing runs on it
    small = StudentConfig((40,), 10, 2000, 32, (("c", 64, 5), ("p", 2, 0)))
    paper = StudentConfig((1845,), 183, 400_000, 250)
    assert _use_graph(FitConfig(), cuda, 1, small, 256)
    assert not _use_graph(FitConfig(), cuda, 1, paper, 128)  # 133 GFLOP a step: measured slower as a graph
    assert not _use_graph(FitConfig(), cuda, 2, small, 256)  # DDP keeps its own hooks
    assert not _use_graph(FitConfig(), cpu, 1, small, 256)
    assert not _use_graph(FitConfig(engine="autograd"), cuda, 1, small, 256)
    assert _use_graph(FitConfig(engine="graph"), cuda, 1, paper, 4096)
    for device, ranks in ((cpu, 1), (cuda, 2)):
        with pytest.raises(ConfigError, match="--engine graph: only for training on one GPU"):
            _use_graph(FitConfig(engine="graph"), device, ranks, small, 256)


def test_a_checkpoint_holds_the_learning_rate_as_a_number():
    """GraphStep's optimizer keeps its rate in a tensor on the GPU; the checkpoint must load anywhere."""
    from compress.gpu_step import portable

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=torch.tensor(0.01), fused=True)
    w.grad = torch.ones(3)
    opt.step()
    state = portable(opt.state_dict())
    assert type(state["param_groups"][0]["lr"]) is float and state["param_groups"][0]["capturable"] is False
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # the running optimizer is left as it was
    again = torch.optim.AdamW([w], lr=0.5, fused=True)
    again.load_state_dict(state)
    assert again.param_groups[0]["lr"] == pytest.approx(0.01)
    again.step()
