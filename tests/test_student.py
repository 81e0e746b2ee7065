import pytest
import torch

from compress.errors import ConfigError
from compress.plan import default_rank, student_config
from compress.student import StudentConfig, build_student, count_params, parse_width


@pytest.mark.parametrize("text,value", [("8000", 8000), ("8k", 8000), ("400k", 400_000),
                                        ("1.5M", 1_500_000), ("2K", 2000), ("1_000", 1000), (64, 64)])
def test_parse_width(text, value):
    assert parse_width(text) == value


@pytest.mark.parametrize("text", ["", "k", "0", "-5", "1.5", "8kk", "eight", "0.0001k"])
def test_parse_width_rejects(text):
    with pytest.raises(ValueError):
        parse_width(text)


@pytest.mark.parametrize("shape,k", [((64,), 32), ((64,), 0), ((3, 4, 5), 7), ((1845,), 250)])
def test_count_params_matches_built_model(shape, k):
    cfg = StudentConfig(shape, 11, 300, k)
    model = build_student(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())


def test_count_params_formula_of_the_issue():
    assert count_params(StudentConfig((64,), 10, 2000, 32)) == 64 * 32 + 32 * 2000 + 2000 + 2000 * 10 + 10
    assert count_params(StudentConfig((64,), 10, 2000, 0)) == 64 * 2000 + 2000 + 2000 * 10 + 10


def test_paper_size_student():
    # Ba & Caruana's TIMIT student: 1845 inputs, rank 250, 400k hidden units, 183 outputs
    cfg = StudentConfig((1845,), 183, parse_width("400k"), 250)
    weights = 1845 * 250 + 250 * 400_000 + 400_000 * 183
    assert count_params(cfg) == weights + 400_000 + 183
    assert 173e6 < weights < 174e6


def test_student_flattens_images():
    model = build_student(StudentConfig((3, 4, 5), 6, 20, 8))
    assert model(torch.zeros(2, 3, 4, 5)).shape == (2, 6)
    assert not hasattr(model, "bottleneck") or model.bottleneck.bias is None


def test_rank_rules():
    assert default_rank(1845) == 250 and default_rank(64) == 32 and default_rank(1) == 0
    assert student_config((64,), 10, 100, None).rank == 32
    with pytest.raises(ConfigError, match="--rank"):
        student_config((64,), 10, 100, 65)
    with pytest.raises(ConfigError, match="--width"):
        student_config((64,), 10, 0, 4)
