import numpy as np
import torch

from compress.data import Rows
from compress.fit import FitConfig, _fold, auto_epochs, fit, standardize
from compress.student import StudentConfig, build_student


def test_fold_is_exact():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for rank in (3, 0):
        model = build_student(StudentConfig((5,), 4, 16, rank)).double()
        x = rng.standard_normal((7, 5)) * 10 + 3
        mu, sd = rng.standard_normal(5), rng.uniform(0.5, 2, 5)
        z_mean, z_scale = rng.standard_normal(4), 2.5
        with torch.no_grad():
            want = model(torch.from_numpy((x - mu) / sd)).numpy() * z_scale + z_mean
            _fold(model, mu, sd, z_mean, z_scale)
            got = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def realizable(n=3000, seed=0):
    """Inputs with very different feature scales, labelled by a random net of the student's kind."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, 12)) * rng.uniform(0.01, 100, 12) + 5).astype(np.float32)
    teacher = build_student(StudentConfig((12,), 5, 32, 6))
    with torch.no_grad():
        z = teacher(torch.from_numpy((x - 5) / np.abs(x).std(0))).numpy() * 10
    return x, z


def test_fit_recovers_a_realizable_teacher():
    x, z = realizable()
    res = fit(x[:2700], z[:2700], x[2700:], z[2700:], StudentConfig((12,), 5, 256, 6),
              FitConfig())  # the defaults: about 4,000 steps
    with torch.no_grad():
        s = res.model(torch.from_numpy(x[2700:])).numpy()  # raw inputs in, raw logits out
    assert (s.argmax(1) == z[2700:].argmax(1)).mean() > 0.95
    assert res.history[-1]["val_loss"] < 0.1 * res.history[0]["val_loss"]
    assert res.history[res.best_epoch - 1]["val_loss"] == min(h["val_loss"] for h in res.history)
    assert res.samples_per_second > 0 and res.device == "cpu"


def test_fit_is_seeded():
    x, z = realizable(400)
    cfg, fc = StudentConfig((12,), 5, 32, 4), FitConfig(epochs=2, seed=3)
    a = fit(x[:300], z[:300], x[300:], z[300:], cfg, fc).model.state_dict()
    b = fit(x[:300], z[:300], x[300:], z[300:], cfg, fc).model.state_dict()
    c = fit(x[:300], z[:300], x[300:], z[300:], cfg, FitConfig(epochs=2, seed=4)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_kl_loss_trains():
    x, z = realizable(1000)
    res = fit(x[:900], z[:900], x[900:], z[900:], StudentConfig((12,), 5, 64, 6),
              FitConfig(loss="kl", temperature=1.0))
    assert res.history[-1]["agreement"] > 0.9


def test_auto_epochs():
    assert auto_epochs(1080, 128) == 300 and auto_epochs(190_000, 128) == 10
    assert auto_epochs(40_000, 128) == 13


def interrupt_and_resume(x, z, cfg, fc, ck, stop_epoch):
    """Fit on x[:500] with a checkpoint, stopped (KeyboardInterrupt) after `stop_epoch`; then resume."""
    import pytest

    def stop(info):
        if info.get("epoch") == stop_epoch and "loss" in info:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(x[:500], z[:500], x[500:], z[500:], cfg, fc, stop, checkpoint=ck)
    return fit(x[:500], z[:500], x[500:], z[500:], cfg, fc, checkpoint=ck, resume=True)


def test_interrupted_fit_resumes_to_the_same_weights(tmp_path):
    import pytest

    from compress.errors import ConfigError

    x, z = realizable(600)
    cfg, fc = StudentConfig((12,), 5, 64, 6), FitConfig(epochs=6)
    full = fit(x[:500], z[:500], x[500:], z[500:], cfg, fc)

    ck = str(tmp_path / "checkpoint.pt")
    resumed = interrupt_and_resume(x, z, cfg, fc, ck, stop_epoch=3)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    timing = ("step_seconds", "step_samples_per_second")
    strip = [[{k: v for k, v in h.items() if k not in timing} for h in r.history] for r in (resumed, full)]
    assert strip[0] == strip[1]
    with pytest.raises(ConfigError, match="--resume: .* belongs to another run \\(differs in fit\\)"):
        fit(x[:500], z[:500], x[500:], z[500:], cfg, FitConfig(epochs=6, lr=1e-2), checkpoint=ck, resume=True)
    with pytest.raises(ConfigError, match="input_mean"):
        fit(x[:500] + 1, z[:500], x[500:], z[500:], cfg, fc, checkpoint=ck, resume=True)
    assert (full.resumed_from_epoch, resumed.resumed_from_epoch) == (0, 3)
    assert resumed.report()["resumed_from_epoch"] == 3 and not resumed.notes
    none = tmp_path / "none.pt"
    fresh = fit(x[:500], z[:500], x[500:], z[500:], cfg, fc, checkpoint=str(none), resume=True)
    assert fresh.resumed_from_epoch == 0
    assert fresh.notes == [f"--resume: no checkpoint at {none}: trained from the start"]


def test_standardize_in_chunks_matches_the_float64_formula():
    x, _ = realizable(100)
    mu, sd = x.astype(np.float64).mean(0), x.astype(np.float64).std(0)
    got = standardize(x, mu, sd, chunk=7)  # 15 chunks, the last one short
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, (x - mu) / sd, rtol=1e-5, atol=1e-5)
    part = standardize(Rows(x, np.arange(0, 100, 2)), mu, sd, 5, 40, chunk=8)  # rows of a view
    np.testing.assert_allclose(part, ((x - mu) / sd)[10:80:2], rtol=1e-5, atol=1e-5)
    images = standardize(x.reshape(100, 3, 4), mu, sd, 90)  # samples of any shape, flattened
    np.testing.assert_allclose(images, ((x - mu) / sd)[90:], rtol=1e-5, atol=1e-5)


def test_a_fresh_run_says_when_it_will_replace_a_resumable_checkpoint(tmp_path):
    """Without --resume, a checkpoint of the same run is replaced after the first epoch: said at the
    start, while the user can still stop and add --resume; a checkpoint of another run is not."""
    x, z = realizable(600)
    cfg, fc = StudentConfig((12,), 5, 64, 6), FitConfig(epochs=2)
    ck = str(tmp_path / "checkpoint.pt")
    fit(x[:500], z[:500], x[500:], z[500:], cfg, fc, checkpoint=ck)  # fit leaves it; distill removes it

    def notes_of(cfg, fc, resume=False):
        seen = []
        fit(x[:500], z[:500], x[500:], z[500:], cfg, fc, lambda info: seen.append(info.get("note")),
            checkpoint=ck, resume=resume)
        return [n for n in seen if n]

    (note,) = notes_of(cfg, fc)
    assert note.startswith(f"{ck} holds epoch 2 of 2 of an unfinished run") and "--resume" in note
    assert notes_of(cfg, fc, resume=True) == []  # resumed: nothing is replaced
    assert notes_of(StudentConfig((12,), 5, 32, 6), fc) == []  # another run's checkpoint


def pad_rank_on_cpu(monkeypatch):
    """Train as on a GPU, here on the CPU's autograd path: the rank padded to compress.gpu_step.RANK_ALIGN,
    and the hidden layer fused with its ReLU."""
    from compress import gpu_step

    align = gpu_step.RANK_ALIGN
    monkeypatch.setattr(gpu_step, "padded_rank", lambda rank, device: -(-rank // align) * align)
    monkeypatch.setattr(gpu_step, "fuse_relu_on", lambda device: True)


def held_out_l2(res, x, z):
    with torch.no_grad():
        s = res.model(torch.from_numpy(x)).numpy()
    return 0.5 * ((s - z) ** 2).sum(axis=1).mean()


def test_a_padded_rank_trains_exactly_the_real_rank_student(monkeypatch):
    """The padding units start at zero and stay zero: the real-rank student that fit returns scores what
    the padded one scored on the held-out rows (the best epoch's loss), to float precision; and the
    fused hidden layer trains the same function as the plain one."""
    import pytest

    pad_rank_on_cpu(monkeypatch)
    x, z = realizable(1500)
    cfg = StudentConfig((12,), 5, 64, 6)  # rank 6, trained as 8
    res = fit(x[:1200], z[:1200], x[1200:], z[1200:], cfg, FitConfig(epochs=30, engine="autograd"))
    assert tuple(res.model.bottleneck.weight.shape) == (6, 12) and res.model.hidden.in_features == 6
    assert held_out_l2(res, x[1200:], z[1200:]) == pytest.approx(res.history[res.best_epoch - 1]["val_loss"],
                                                                 rel=1e-4)
    assert res.history[-1]["agreement"] > 0.7
    plain = fit(x[:1200], z[:1200], x[1200:], z[1200:], cfg, FitConfig(epochs=30, engine="autograd"))
    # the same first weights and steps up to float rounding (8-wide products instead of 6-wide)
    assert res.history[-1]["val_loss"] == pytest.approx(plain.history[-1]["val_loss"], rel=0.02)


def test_a_checkpoint_keeps_the_real_rank_and_resumes_padded_or_not(tmp_path, monkeypatch):
    """A run stopped on a GPU (padded rank) resumes on a CPU (real rank) from the same file, and back."""
    x, z = realizable(600)
    cfg, fc = StudentConfig((12,), 5, 64, 6), FitConfig(epochs=6, engine="autograd")
    ck = tmp_path / "checkpoint.pt"
    with monkeypatch.context() as m:
        pad_rank_on_cpu(m)
        resumed = interrupt_and_resume(x, z, cfg, fc, str(ck), stop_epoch=2)  # padded, then padded
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    state = torch.load(ck, weights_only=True)
    assert tuple(state["model"]["bottleneck.weight"].shape) == (6, 12)
    assert tuple(state["model"]["hidden.weight"].shape) == (64, 6)
    moments = state["opt"]["state"][1]  # hidden.weight's
    assert tuple(moments["exp_avg"].shape) == tuple(moments["exp_avg_sq"].shape) == (64, 6)

    def stop(info):
        if info.get("epoch") == 3 and "loss" in info:
            raise KeyboardInterrupt

    ck.unlink()
    import pytest

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        pad_rank_on_cpu(m)
        fit(x[:500], z[:500], x[500:], z[500:], cfg, fc, stop, checkpoint=str(ck))
    unpadded = fit(x[:500], z[:500], x[500:], z[500:], cfg, fc, checkpoint=str(ck), resume=True)
    assert unpadded.resumed_from_epoch == 3 and [h["epoch"] for h in unpadded.history] == list(range(1, 7))
    assert unpadded.history[-1]["val_loss"] < unpadded.history[2]["val_loss"]


def test_the_fused_hidden_layer_has_the_gradients_of_linear_then_relu():
    import copy

    from compress.gpu_step import fuse_hidden_relu

    torch.manual_seed(0)
    for rank in (6, 0):  # the hidden layer's input from the bottleneck, or the raw input (no gradient)
        plain = build_student(StudentConfig((12,), 5, 40, rank))
        fused = copy.deepcopy(plain)
        fuse_hidden_relu(fused)
        x = torch.randn(33, 12)
        outs = []
        for model in (plain, fused):
            s = model(x)
            (s**2).sum().backward()
            outs.append((s.detach(), {n: p.grad for n, p in model.named_parameters()}))
        torch.testing.assert_close(outs[1][0], outs[0][0])
        assert outs[1][1].keys() == outs[0][1].keys()
        for name, grad in outs[0][1].items():
            torch.testing.assert_close(outs[1][1][name], grad, msg=name)
