"""The conv students' CPU step (compress/conv_step.py) against autograd + AdamW, and inside `fit`."""

import copy

import numpy as np
import pytest
import torch

from compress.conv_step import ConvStep
from compress.fit import FitConfig, _loss_fn, fit
from compress.student import StudentConfig, build_student, parse_spec

CASES = [  # (sample shape, spec): 1-D flat, (C, L), 2-D; pools of 1, 2 and 3 with remainders; conv
    ((23,), "3c3-p2-5L-12"),  # after conv; a conv without a pool; rank 0
    ((2, 17), "4c5-3c3-p3-6L-10"),
    ((3, 7, 9), "4c3-p2-3c1-p1-12"),
    ((13,), "2c3-p1-4c3-p2-5L-9"),
    ((2, 19), "3c3-p2-p2-6L-8"),  # pooling after pooling: the first one's ReLU mask outlives the second
]


def student(shape, spec, c_pad):
    front, rank, width = parse_spec(spec)
    return build_student(StudentConfig(shape, c_pad, width, rank, front))


@pytest.mark.parametrize("shape,spec", CASES)
@pytest.mark.parametrize("loss", ["l2", "kl"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_conv_step_is_autograd_and_adamw(shape, spec, loss, threads):
    threads_before = torch.get_num_threads()
    torch.manual_seed(0)
    c, c_pad = 5, 16
    reference = student(shape, spec, c_pad)
    model = copy.deepcopy(reference)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    loss_fn = _loss_fn(FitConfig(loss=loss, temperature=2.0), 1.5)
    d = int(np.prod(shape))
    x, z = torch.randn(60, d), torch.randn(60, c)
    with ConvStep(model, opt, loss_fn, c, 16, threads, l2=loss == "l2") as step:
        for i in range(5):
            idx = torch.randint(0, 60, (16 if i < 4 else 2,))  # the last batch shorter than 3 threads
            for group in ref_opt.param_groups + opt.param_groups:
                group["lr"] = 1e-2 / (i + 1)
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
        assert float(opt.state[q]["step"]) == 5
    assert torch.get_num_threads() == threads_before


def test_fit_trains_a_conv_student_with_the_cpu_step_like_autograd():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 24)).astype(np.float32)
    z = np.stack([x[:, :12].sum(1), np.abs(x[:, 12:]).max(1), x[:, ::3].mean(1)], 1).astype(np.float32)
    front, rank, width = parse_spec("4c3-p2-8L-32")
    cfg = StudentConfig((24,), 3, width, rank, front)
    results = {}
    for engine in ("split", "autograd"):
        torch.manual_seed(0)
        r = fit(x[:500], z[:500], x[500:], z[500:], cfg, FitConfig(epochs=15, batch_size=32, engine=engine))
        assert r.report()["engine"] == engine
        results[engine] = r
    agree = {e: r.history[-1]["val_loss"] for e, r in results.items()}
    assert agree["split"] == pytest.approx(agree["autograd"], rel=0.05)
