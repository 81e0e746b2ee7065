"""The conv students' CPU step (compress/conv_step.py) against autograd + AdamW, and inside `fit`."""

import numpy as np
import pytest
import torch

from compress.conv_step import ConvStep
from compress.fit import FitConfig, fit
from compress.student import StudentConfig, build_student, parse_spec
from tests.test_split_step import check_against_autograd

CASES = [  # (sample shape, spec): 1-D flat, (C, L), 2-D; pools of 1, 2 and 3 with remainders; conv
    ((23,), "3c3-p2-5L-12"),  # after conv; a conv without a pool; rank 0
    ((2, 17), "4c5-3c3-p3-6L-10"),
    ((3, 7, 9), "4c3-p2-3c1-p1-12"),
    ((13,), "2c3-p1-4c3-p2-5L-9"),
    ((2, 19), "3c3-p2-p2-6L-8"),  # pooling after pooling: the first one's ReLU mask outlives the second
    ((20,), "p2-4c3-8L-10"),  # pooling first: the data itself
]


def student(shape, spec, c_pad):
    front, rank, width = parse_spec(spec)
    return build_student(StudentConfig(shape, c_pad, width, rank, front))


@pytest.mark.parametrize("shape,spec", CASES)
@pytest.mark.parametrize("loss", ["l2", "kl"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_conv_step_is_autograd_and_adamw(shape, spec, loss, threads):
    torch.manual_seed(0)
    c, c_pad = 5, 16
    reference = student(shape, spec, c_pad)
    x, z = torch.randn(60, int(np.prod(shape))), torch.randn(60, c)
    check_against_autograd(lambda m, o, f: ConvStep(m, o, f, c, 16, threads, l2=loss == "l2"),
                           reference, loss, x, z, c, [16] * 4 + [2])  # the last shorter than 3 threads


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
