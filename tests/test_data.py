import numpy as np
import pytest

from compress.data import load_inputs, load_labels
from compress.errors import DataError


def test_npy_npz_csv_agree(tmp_path):
    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", inputs=x)
    np.savetxt(tmp_path / "c.csv", x, delimiter=",", header="f0,f1,f2,f3", comments="")
    np.savetxt(tmp_path / "d.csv", x, delimiter=",")
    for name in ("a.npy", "b.npz", "c.csv", "d.csv"):
        got = load_inputs(tmp_path / name, (4,))
        assert got.dtype == np.float32 and got.shape == (20, 4)
        np.testing.assert_allclose(got, x, rtol=1e-6)


def test_npz_key(tmp_path):
    np.savez(tmp_path / "m.npz", a=np.zeros((3, 2)), b=np.ones((3, 2)))
    with pytest.raises(DataError, match="pick one with --key"):
        load_inputs(tmp_path / "m.npz", (2,))
    assert load_inputs(tmp_path / "m.npz", (2,), key="b").sum() == 6


def test_flat_rows_reshaped_to_teacher_shape(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((5, 12)))
    assert load_inputs(tmp_path / "flat.npy", (3, 2, 2)).shape == (5, 3, 2, 2)
    assert load_inputs(tmp_path / "flat.npy", (None,)).shape == (5, 12)


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "file not found"),
    (lambda p: p.write_bytes(b""), "file is empty"),
    (lambda p: np.save(p, np.zeros((0, 4))), "no samples"),
    (lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True), "not a valid .npy"),
    (lambda p: p.write_bytes(b"not numpy at all"), "not a valid .npy"),
    (lambda p: np.save(p, np.array([[1.0, np.nan, 0, 0]])), "NaN or inf values \\(first in sample 0\\)"),
    (lambda p: np.save(p, np.array([[0, 0, 0, 0], [1.0, 2, np.inf, 0]])), "first in sample 1"),
    (lambda p: np.save(p, np.zeros((3, 5))), r"shape \(5,\) but the teacher expects \(4,\)"),
    (lambda p: np.save(p, np.array([["a", "b", "c", "d"]])), "expected numbers"),
])
def test_bad_inputs_name_the_file(tmp_path, make, message):
    p = tmp_path / "x.npy"
    make(p)
    with pytest.raises(DataError, match=message) as e:
        load_inputs(p, (4,))
    assert str(e.value).startswith(f"--data {p}")
    assert "\n" not in str(e.value)


def test_unsupported_suffix_and_folder(tmp_path):
    (tmp_path / "x.parquet").write_text("x")
    with pytest.raises(DataError, match="unsupported format"):
        load_inputs(tmp_path / "x.parquet", (4,))
    with pytest.raises(DataError, match="is a folder"):
        load_inputs(tmp_path, (4,))


def test_bad_csv(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n3,oops\n")
    with pytest.raises(DataError, match="not a numeric CSV"):
        load_inputs(tmp_path / "x.csv", (2,))


def test_labels(tmp_path):
    np.save(tmp_path / "y.npy", np.array([0, 1, 2]))
    assert load_labels(tmp_path / "y.npy", 3).tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="has 3 labels but --eval-data has 4 samples"):
        load_labels(tmp_path / "y.npy", 4)
    np.save(tmp_path / "f.npy", np.array([0.0, 1.5]))
    with pytest.raises(DataError, match="whole class numbers"):
        load_labels(tmp_path / "f.npy", 2)
