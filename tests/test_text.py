"""Issue 16 (first part): teachers of token ids, several integer inputs, and the embedding-bag student."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from compress.cli import cli
from compress.student import load_student
from compress.teachers import load_teacher
from compress.teachers.onnx_teacher import onnx_param_count
from compress.tokens import feeds, load_npz, roles
from tests.text_teacher import CLASSES, NAMES, VOCAB, export, save_texts, texts


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """One distill of the tiny transformer on 6,000 synthetic texts (64L-2k student)."""
    d = tmp_path_factory.mktemp("text")
    teacher, data = export(d / "teacher.onnx"), save_texts(d / "x.npz", 6000)
    r = CliRunner().invoke(cli, ["distill", str(teacher), "--data", str(data), "--student", "64L-2k",
                                 "--epochs", "12", "--bench-seconds", "0.05", "--precision", "fp16,int8",
                                 "--out", str(d / "run")])
    assert r.exit_code == 0, r.output
    return d


def test_a_token_teacher_distills_into_an_embedding_bag_student(text_run):
    report = json.loads((text_run / "run" / "report.json").read_text())
    s = report["student"]
    v, k, h, c = VOCAB, 64, 2000, CLASSES
    assert s["spec"] == "64L-2k" and s["layers"] == ["embed", "hidden", "out"]
    assert s["params"] == v * k + k * h + h + h * c + c
    assert onnx_param_count(text_run / "run" / "student.onnx") == s["params"]  # no float constants besides
    assert report["fidelity"]["agreement"] >= 0.7, report["fidelity"]  # 4 balanced classes: chance 0.25
    assert report["export"]["max_abs_diff"] <= 1e-4


def test_the_student_onnx_is_a_drop_in_for_the_teacher(text_run):
    model = onnx.load(str(text_run / "run" / "student.onnx"))
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == list(NAMES)
    for i in inputs.values():
        assert i.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert [o.name for o in model.graph.output] == ["logits"]


def test_shorter_sequences_and_unseen_ids_run_and_match_torch(text_run):
    """Sequences of 5 tokens (the transfer set's were 24), ids at and far above V, token types the
    student ignores: onnxruntime and the torch student agree, and nothing raises."""
    net, _, _ = load_student(str(text_run / "run" / "student.pt"))
    sess = ort.InferenceSession(str(text_run / "run" / "student.onnx"), providers=["CPUExecutionProvider"])
    t = texts(64, length=5, seed=3)
    t["input_ids"][:8, 0] = VOCAB  # the first id past the vocabulary
    t["input_ids"][8:16, :] = 10**9  # nothing but unknown ids
    t["token_type_ids"][:] = 1
    x = np.stack([t[n] for n in NAMES], axis=1)
    got = sess.run(None, feeds(NAMES, ("int64",) * 3, x))[0]
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    assert got.shape == (64, CLASSES) and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    # tokens the mask drops do not count, whatever their ids
    y = x.copy()
    y[:, 0][x[:, 1] == 0] = 7
    np.testing.assert_allclose(sess.run(None, feeds(NAMES, ("int64",) * 3, y))[0], got, atol=1e-6)


def test_roles_come_from_the_names():
    assert (roles(NAMES).ids, roles(NAMES).mask) == (0, 1)
    r = roles(("token_type_ids", "mask", "ids"))
    assert (r.ids, r.mask) == (2, 1)
    assert roles(("tokens",)).mask is None


@pytest.mark.parametrize("edit,words", [
    (lambda t: t.update(input_ids=t["input_ids"].astype(np.float32)), ["'input_ids'", "float32", "integers"]),
    (lambda t: t["input_ids"].__setitem__((0, 0), -5), ["'input_ids'", "negative"]),
    (lambda t: t.pop("token_type_ids"), ["no array 'token_type_ids'"]),
    (lambda t: t.update(attention_mask=t["attention_mask"][:50]), ["'attention_mask'", "50 rows"]),
    (lambda t: t["attention_mask"].__setitem__((0, 0), 2), ["'attention_mask'", "0 and 1"]),
])
def test_bad_token_data_is_one_line_naming_the_key(tmp_path, edit, words):
    teacher = export(tmp_path / "teacher.onnx")
    t = texts(100)
    edit(t)
    np.savez(tmp_path / "bad.npz", **t)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = CliRunner().invoke(cli, ["distill", str(teacher), "--data", str(tmp_path / "bad.npz"),
                                 "--out", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert line.startswith("Error: --data") and "\n" not in line and "Traceback" not in r.output
    assert all(w in line for w in words), line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_plain_npy_for_a_token_teacher_is_refused(tmp_path):
    teacher = export(tmp_path / "teacher.onnx")
    np.save(tmp_path / "x.npy", texts(10)["input_ids"])
    r = CliRunner().invoke(cli, ["distill", str(teacher), "--data", str(tmp_path / "x.npy"),
                                 "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "needs an .npz with one integer array per input" in r.output


class Encoder(torch.nn.Module):
    """An encoder without its head: [batch, sequence, 16] per token, not class scores."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)

    def forward(self, input_ids, attention_mask):
        return self.emb(input_ids) * attention_mask.unsqueeze(-1)


def test_an_encoder_without_a_head_is_refused(tmp_path):
    path = tmp_path / "encoder.onnx"
    ids = torch.randint(0, 50, (2, 7))
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "last_hidden_state": {0: "batch", 1: "seq"}}
    torch.onnx.export(Encoder(), (ids, torch.ones_like(ids)), str(path), dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                      dynamic_axes=axes, opset_version=17)
    np.savez(tmp_path / "x.npz", **{k: v for k, v in texts(20, vocab=50).items() if k != "token_type_ids"})
    r = CliRunner().invoke(cli, ["distill", str(path), "--data", str(tmp_path / "x.npz"),
                                 "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "not per-example class scores" in r.output and "last_hidden_state" in r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec,words", [("8c-p-64L-2k", "no convolution"), ("2k", "needs the bottleneck")])
def test_students_a_token_teacher_cannot_take(tmp_path, spec, words):
    teacher, data = export(tmp_path / "teacher.onnx"), save_texts(tmp_path / "x.npz", 50)
    r = CliRunner().invoke(cli, ["distill", str(teacher), "--data", str(data), "--student", spec,
                                 "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and f"--student {spec}" in r.output and words in r.output, r.output


def test_the_teacher_reads_stacked_npz_rows(tmp_path):
    teacher = load_teacher([export(tmp_path / "teacher.onnx")])
    sig = teacher.signature
    assert sig.tokens and sig.inputs == NAMES and sig.input_dtypes == ("int64",) * 3
    x = load_npz(save_texts(tmp_path / "x.npz", 30), sig.inputs)
    assert x.shape == (30, 3, 24) and x.dtype == np.int64
    z = teacher.logits(x, batch_size=7)
    assert z.shape == (30, CLASSES) and np.isfinite(z).all()


def test_targets_compare_and_vocab_size_take_token_data(text_run, tmp_path):
    teacher, data = text_run / "teacher.onnx", text_run / "x.npz"
    z_path = tmp_path / "z.npy"
    r = CliRunner().invoke(cli, ["targets", str(teacher), "--data", str(data), "--out", str(z_path)])
    assert r.exit_code == 0, r.output
    z = np.load(tmp_path / "z.npy")
    cached = np.load(text_run / "run" / "targets.npy")
    np.testing.assert_allclose(z, cached, rtol=1e-5, atol=1e-5)  # the logits distill labelled with
    r = CliRunner().invoke(cli, ["compare", str(teacher), str(text_run / "run" / "student.onnx"), "--data",
                                 str(data), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["fidelity"]["agreement"] >= 0.7
    r = CliRunner().invoke(cli, ["distill", str(teacher), "--data", str(data), "--student", "16L-500",
                                 "--vocab-size", "100", "--epochs", "1", "--bench-seconds", "0.05",
                                 "--json", "--out", str(tmp_path / "small")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["student"]["params"] == 100 * 16 + 16 * 500 + 500 + 500 * CLASSES + CLASSES


def test_fp16_and_int8_exports_decode_only_the_rows_they_gather(text_run):
    """The embedding table is stored int8 with one scale per row (fp16: as float16), and only the rows
    a batch gathers are decoded; both pass the agreement guard and run on unseen ids."""
    report = json.loads((text_run / "run" / "report.json").read_text())
    fp32 = (text_run / "run" / "student.onnx").stat().st_size
    got = {e["precision"]: e for e in report["exports"]}
    assert got["int8"]["size_bytes"] <= 0.35 * fp32 and got["fp16"]["size_bytes"] <= 0.55 * fp32
    assert got["int8"]["agreement_with_fp32"] >= 0.99 and got["fp16"]["agreement_with_fp32"] >= 0.99
    model = onnx.load(str(text_run / "run" / "student.int8.onnx"))
    table = next(i for i in model.graph.initializer if i.name.endswith("embed.weight_int8"))
    assert table.data_type == onnx.TensorProto.INT8 and list(table.dims) == [VOCAB, 64]
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] == table.name for n in model.graph.node)
    t = texts(16, length=4, seed=5)
    t["input_ids"][:, 0] = 10**6
    x = np.stack([t[n] for n in NAMES], axis=1)
    for name in ("student.int8.onnx", "student.fp16.onnx"):
        sess = ort.InferenceSession(str(text_run / "run" / name), providers=["CPUExecutionProvider"])
        out = sess.run(None, feeds(NAMES, ("int64",) * 3, x))[0]
        assert out.shape == (16, CLASSES) and np.isfinite(out).all()


def test_mask_and_ngram_texts_keep_the_frame_and_the_shape():
    from compress.augment import MASK_P, _token_rows

    t = texts(400, length=30, seed=7)
    x = np.stack([t[n] for n in NAMES], axis=1)
    rng = np.random.default_rng(0)
    masked = _token_rows(x, np.arange(400), "mask", rng, NAMES, mask_id=999)
    assert masked.shape == x.shape and masked.dtype == np.int64
    np.testing.assert_array_equal(masked[:, 1:], x[:, 1:])  # mask and token types untouched
    changed = masked[:, 0] != x[:, 0]
    assert (masked[:, 0][changed] == 999).all()
    lengths = x[:, 1].sum(1)
    assert not changed[np.arange(400), 0].any() and not changed[np.arange(400), lengths - 1].any()
    share = changed.sum() / (lengths - 2).clip(0).sum()
    assert abs(share - MASK_P) < 0.03
    grams = _token_rows(x, np.arange(400), "ngram", rng, NAMES, None)
    for i in range(400):
        n = int(grams[i, 1].sum())
        assert 2 <= n <= lengths[i] and (grams[i, 1, :n] == 1).all() and (grams[i, :, n:] == 0).all()
        ids, src = grams[i, 0, :n], x[i, 0, : lengths[i]]
        assert ids[0] == src[0] and ids[-1] == src[-1]  # the frame: first and last token
        inner = ids[1:-1]
        if inner.size:  # a contiguous window of the text's inner tokens
            k = inner.size
            assert any((src[j : j + k] == inner).all() for j in range(1, lengths[i] - k)), (ids, src)


def test_ngram_augmentation_labels_synthetic_texts_and_helps(text_run, tmp_path):
    plain = json.loads((text_run / "run" / "report.json").read_text())["fidelity"]["agreement"]
    r = CliRunner().invoke(cli, ["distill", str(text_run / "teacher.onnx"), "--data", str(text_run / "x.npz"),
                                 "--student", "64L-2k", "--epochs", "12", "--augment", "ngram:4",
                                 "--bench-seconds", "0.05", "--json", "--out", str(tmp_path / "aug")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["transfer"]["synthetic"] == 3 * rep["transfer"]["real_train"]
    assert rep["fidelity"]["agreement"] > plain, (rep["fidelity"], plain)


def test_hashed_ngrams_in_torch_and_onnx(tmp_path):
    """--ngrams 3: bigrams and trigrams hashed into the buckets join the bag; the ONNX file computes the
    same hashes, on sequences shorter than n too, and unknown ids count with zero rows."""
    from compress.exporters.onnx import export_onnx
    from compress.plan import student_config
    from compress.student import NGRAM_PRIME, build_student, count_params
    from compress.teachers import Signature

    cfg = student_config((3, 6), 4, 32, 8, None, 50, NAMES, ngrams=3, buckets=97)
    assert count_params(cfg) == 50 * 8 + 97 * 8 + 8 * 32 + 32 + 32 * 4 + 4
    torch.manual_seed(0)
    model = build_student(cfg).eval()
    bag = model.embed
    a, b = 7, 11  # one text of two tokens: (E[a] + E[b] + B[bigram]) / 3
    x = torch.tensor([[[a, b], [1, 1], [0, 0]]])
    want = (bag.weight[a] + bag.weight[b] + bag.ngram[((a % 97) * NGRAM_PRIME + b) % 97]) / 3
    torch.testing.assert_close(bag(x)[0], want)
    sig = Signature(input_name="input_ids", sample_shape=(3, 6), input_dtype="int64", output_name="logits",
                    batch=None, inputs=NAMES, input_dtypes=("int64",) * 3)
    check = np.stack([texts(40, length=6, seed=1, vocab=60)[n] for n in NAMES], axis=1)  # ids up to 59
    export_onnx(model, cfg, sig, tmp_path / "s.onnx", check)
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    for length in (1, 2, 3, 9):
        t = texts(20, length=max(length, 3), seed=length, vocab=60)
        xs = np.stack([t[n][:, :length] for n in NAMES], axis=1)
        xs[:, 1, 0] = 1  # at least one kept token
        got = sess.run(None, feeds(NAMES, ("int64",) * 3, xs))[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(xs)).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5, err_msg=f"length {length}")


def test_a_folder_of_npz_shards_is_one_transfer_set(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    parts = [texts(n, seed=n) for n in (30, 20)]
    for i, t in enumerate(parts):
        np.savez(folder / f"part{i}.npz", **t)
    x = load_npz(folder, NAMES)
    assert x.shape == (50, 3, 24)
    np.testing.assert_array_equal(x[30:, 0], parts[1]["input_ids"])
    np.savez(folder / "part2.npz", **texts(5, length=10))
    with pytest.raises(Exception, match="part2.npz: texts of 10 tokens"):
        load_npz(folder, NAMES)


def test_sweep_takes_a_token_teacher(text_run, tmp_path):
    np.save(tmp_path / "y.npy", np.load(text_run / "run" / "targets.npy").argmax(1))
    r = CliRunner().invoke(cli, ["sweep", str(text_run / "teacher.onnx"), "--data", str(text_run / "x.npz"),
                                 "--students", "16L-500,32L-1k", "--train-labels", str(tmp_path / "y.npy"),
                                 "--epochs", "2", "--bench-seconds", "0.02", "--out", str(tmp_path / "sw"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    runs = json.loads(r.stdout)["runs"]
    assert [(x["kind"], x["spec"]) for x in runs] == [("mimic", "16L-500"), ("mimic", "32L-1k"),
                                                     ("labels", "16L-500"), ("labels", "32L-1k")]
    assert runs[0]["params"] == runs[2]["params"] == VOCAB * 16 + 16 * 500 + 500 + 500 * CLASSES + CLASSES
