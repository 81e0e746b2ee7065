"""Issue 4: synthetic transfer data (MUNGE, noise, mixup)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from compress.augment import generate, parse_augment
from compress.cli import cli
from compress.errors import ConfigError


@pytest.mark.parametrize("method", ["munge", "noise", "mixup"])
def test_generate_shapes_and_bounded_chunks(tmp_path, method, monkeypatch):
    import compress.augment as aug

    monkeypatch.setattr(aug, "_ROWS", 1000)  # several chunks
    x = np.random.default_rng(0).random((300, 2, 4)).astype(np.float32)
    syn = generate(x, method, 11, tmp_path / "s.npy", seed=1)
    assert isinstance(syn, np.memmap) and syn.shape == (3000, 2, 4) and syn.dtype == np.float32
    assert np.isfinite(syn).all()
    assert not np.array_equal(np.asarray(syn[:300]), x)  # new samples, not copies
    again = generate(x, method, 11, tmp_path / "t.npy", seed=1)
    np.testing.assert_array_equal(syn, again)  # seeded
    if method == "mixup":  # convex mixes stay inside the data's range
        assert syn.min() >= x.min() - 1e-6 and syn.max() <= x.max() + 1e-6


def test_munge_keeps_or_redraws_near_the_neighbour(tmp_path):
    x = np.array([[0.0, 0.0], [1.0, 10.0], [5.0, 5.0], [5.2, 5.4]], np.float32)
    syn = np.asarray(generate(x, "munge", 201, tmp_path / "m.npy", seed=0)).reshape(200, 4, 2)
    third = syn[:, 2, :]  # sample 2 = (5, 5); its neighbour is (5.2, 5.4)
    assert (np.isclose(third, x[2]) | (np.abs(third - x[3]) < 1.0)).all()
    assert (~np.isclose(third, x[2])).mean() == pytest.approx(0.5, abs=0.1)  # p = 0.5


@pytest.mark.parametrize("text", ["munge", "munge:1", "munge:x", "smote:5"])
def test_bad_augment(text):
    with pytest.raises(ConfigError, match="--augment"):
        parse_augment(text)


def test_munge_helps_with_100_real_samples(tmp_path, digits, digits_files):
    np.save(tmp_path / "few.npy", digits["x"][:100])
    f = digits_files
    base = ["distill", str(f["teacher"]), "--data", str(tmp_path / "few.npy"), "--eval-data",
            str(f["x_test"]), "--eval-labels", str(f["y_test"]), "--width", "2k", "--rank", "32",
            "--bench-seconds", "0.05", "--json"]
    plain = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "plain")])
    munged = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "munge"), "--augment", "munge:20"])
    assert plain.exit_code == 0 and munged.exit_code == 0, plain.output + munged.output
    a, b = json.loads(plain.stdout), json.loads(munged.stdout)
    assert b["transfer"] == {**b["transfer"], "real_train": 90, "synthetic": 90 * 19, "augment": "munge:20"}
    assert b["student"]["accuracy"] >= 0.95
    assert b["student"]["accuracy"] >= a["student"]["accuracy"]
