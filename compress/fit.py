"""Fitting the student to the teacher's logits.

The default loss is the paper's L2 regression on logits, 1/(2T) sum_t ||f(x_t) - z_t||^2
(Ba & Caruana 2014, eq. 1); `loss="kl"` is Hinton et al. (2015)'s softened cross-entropy instead.

Defaults, chosen to work untuned on the tests' teachers and the demo (see README, "Training"):
AdamW, learning rate 3e-3 with a 3% linear warm-up and cosine decay to zero, batch 128, and as many
epochs as give about 4,000 optimizer steps (at least 10, at most 300). Inputs are standardized and
targets scaled while training, and both are folded back afterwards (compress/scaling.py), so the
saved student takes raw inputs and gives raw logits.
A held-out slice scores every epoch (loss and top-1 agreement with the teacher); the best epoch
by held-out loss is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from compress import checkpoint as ckpt
from compress import engine, gpu_step
from compress.data import Rows
from compress.engine import GRAPH_NEEDS_A_GPU, SPLIT_NEEDS_THE_CPU
from compress.errors import ConfigError, DivergedError
from compress.feed import Feed, activation_bytes, plan_cuda
from compress.scaling import CONSTANT_BELOW, _fold, _moments, per_channel, robust_scale, standardize
from compress.student import StudentConfig, build_student, count_params
from compress.threads import torch_threads, training_threads

if TYPE_CHECKING:  # torch is imported where it is used, so that FitConfig stays cheap to import
    import torch
    from torch import nn

# progress(info): steps done ({epoch, epochs, step, steps, samples_per_second}; at an epoch's end also
# loss and agreement), or {note}: something to show the user now
FitProgress = Callable[[dict[str, Any]], None]
PAD = 16  # class count padded to a multiple of this while training
EVAL_ELEMENTS = 2**26  # hidden activations of one held-out scoring chunk (256 MB in float32)


@dataclass(frozen=True)
class FitConfig:
    epochs: int | None = None  # None: about 4,000 steps, clamped to 10..300 epochs
    batch_size: int = 128  # samples per optimizer step
    lr: float = 3e-3  # AdamW peak learning rate
    weight_decay: float = 0.0  # decoupled (AdamW); the paper used none
    loss: str = "l2"  # "l2" (the paper's), "kl" (Hinton 2015), or "ce" (targets are one-hot labels)
    temperature: float = 4.0  # only for loss="kl"
    device: str = "auto"  # "auto" picks cuda when torch sees a GPU
    seed: int = 0  # initialization and shuffling
    # "split" (compress.split_step, CPU), "graph" (compress.gpu_step.GraphStep, one GPU), "autograd",
    # or auto: split on a CPU and graph on a GPU where they pay
    engine: str = "auto"

    def validate(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs: must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size: must be at least 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr: must be a positive number, got {self.lr}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"--temperature: must be a positive number, got {self.temperature}")
        if self.loss not in ("l2", "kl", "ce"):
            raise ConfigError(f"--loss: must be l2, kl or ce, got {self.loss}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device: must be auto, cpu or cuda, got {self.device}")
        if self.engine not in ("auto", "split", "graph", "autograd"):
            raise ConfigError(f"--engine: must be auto, split, graph or autograd, got {self.engine}")
        if self.engine == "graph" and self.device != "cuda":  # said before the teacher runs
            import torch

            if self.device == "cpu" or not torch.cuda.is_available():
                raise ConfigError(GRAPH_NEEDS_A_GPU)
        if self.engine == "split" and self.device == "cuda":
            raise ConfigError(SPLIT_NEEDS_THE_CPU)


@dataclass
class FitResult:
    model: nn.Sequential  # on the CPU, eval mode, taking raw inputs and giving raw logits
    epochs: int
    best_epoch: int
    seconds: float
    samples_per_second: float
    device: str
    history: list[dict[str, float]] = field(default_factory=list)
    world_size: int = 1  # processes that trained it (torchrun)
    engine: str = "autograd"  # what ran the steps: "autograd", "split" or "graph"
    batch_size: int = 0  # samples per step as trained (a GPU's memory may have asked for fewer)
    streamed: bool = False  # the training rows were read in blocks, not held whole
    notes: list[str] = field(default_factory=list)  # what was changed from the request, and why
    resumed_from_epoch: int = 0  # the checkpoint's last finished epoch when resumed; 0: trained afresh
    threads: int = 0  # torch's CPU threads during the fit (compress.threads: a CPU quota may lower them)

    def report(self) -> dict[str, Any]:
        """The report's `train` section, as far as the fit itself knows it."""
        return {"world_size": self.world_size, "engine": self.engine, "streamed": self.streamed,
                "epochs": self.epochs, "best_epoch": self.best_epoch, "seconds": self.seconds,
                "samples_per_second": self.samples_per_second, "device": self.device,
                "batch_size": self.batch_size, "threads": self.threads,
                "resumed_from_epoch": self.resumed_from_epoch,
                "notes": self.notes, "history": self.history}


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda was asked for but torch sees no GPU")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def auto_epochs(n_train: int, batch_size: int, target_steps: int = 4000) -> int:
    steps_per_epoch = math.ceil(n_train / batch_size)
    return max(10, min(300, math.ceil(target_steps / steps_per_epoch)))


def _loss_fn(cfg: FitConfig, z_scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    import torch

    if cfg.loss == "l2":
        return lambda s, z: 0.5 * (s - z).pow(2).sum(dim=1).mean()
    if cfg.loss == "ce":  # a student trained on labels (z one-hot): the paper's baseline
        return lambda s, z: -(z * torch.log_softmax(s, dim=1)).sum(dim=1).mean()
    t = cfg.temperature

    def kl(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # standardized units back to logits (the per-class shift cancels in the softmax)
        log_p = torch.log_softmax(z * z_scale / t, dim=1)
        log_q = torch.log_softmax(s * z_scale / t, dim=1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean() * t * t

    return kl


def _diverged(epoch: int, train_loss: float, val_loss: float, fit_cfg: FitConfig, checkpoint: str | None,
              rank: int) -> str:
    """The one line for a run whose loss stopped being a number."""
    import os

    kept = ""
    if checkpoint and rank == 0 and epoch > 1 and os.path.exists(checkpoint):
        kept = f"; {checkpoint} keeps the last finite epoch"
    return (f"--lr: training diverged at epoch {epoch} (loss {train_loss:g}, held-out {val_loss:g}) "
            f"with --lr {fit_cfg.lr:g}"
            + (f" and --temperature {fit_cfg.temperature:g}" if fit_cfg.loss == "kl" else "")
            + f"; no student was written{kept}. Try a lower --lr (default {FitConfig().lr:g})")


def _snapshot(model: nn.Module, into: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of the model's state: into `into`'s tensors when given (no new memory), else new ones."""
    if into is None:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k, v in model.state_dict().items():
        into[k].copy_(v)
    return into


def _rows(x: Any, mine: np.ndarray) -> Rows:
    """Rows `mine` of x (itself maybe a `Rows`), read only when sliced."""
    return Rows(x.base, x.idx[mine]) if isinstance(x, Rows) else Rows(x, mine)


def fit(x_train: Any, z_train: Any, x_val: np.ndarray, z_val: np.ndarray,
        cfg: StudentConfig, fit_cfg: FitConfig = FitConfig(),
        progress: FitProgress | None = None, stream_rows: int | None = None,
        checkpoint: str | None = None, resume: bool = False, world: Any = None,
        read_ahead: bool = True) -> FitResult:
    """Train a student on (inputs, teacher logits); score on the held-out pair every epoch.

    By default the training set is held in memory as tensors. With `stream_rows`, x_train and
    z_train may be anything sliceable by rows (a memory map, `Shards`, `Rows`): each epoch reads
    blocks of that many rows in a shuffled order and shuffles the rows within each block, so memory
    holds two blocks at a time: the one training and the next (read ahead on a thread of its own
    unless `read_ahead` is False). With `checkpoint`, the state is saved there after every epoch; with
    `resume`, a checkpoint of the same run continues where it stopped. Under torchrun (`world` of
    several ranks) each rank trains on its own equal random shard with DDP; statistics, validation
    and the best epoch are the same on every rank; only rank 0 writes the checkpoint. torch's CPU
    threads are capped by a container's CPU quota for the fit (compress.threads), then restored."""
    threads, note = training_threads()
    with torch_threads(threads):
        result = _fit(x_train, z_train, x_val, z_val, cfg, fit_cfg, progress, stream_rows, checkpoint,
                      resume, world, read_ahead)
    result.threads = threads
    if note:
        result.notes.insert(0, note)
    return result


def _plan_gpu(cfg: StudentConfig, padded: StudentConfig, bs: int, n: int, stream_rows: int | None,
              device: torch.device, ranks: int, notes: list[str]) -> tuple[int, int | None, int]:
    """The batch, the rows held on the GPU at once (None: all) and the held-out rows scored at once,
    sized to the GPU's free memory (compress.feed.plan_cuda); what changed is added to `notes`."""
    import torch

    d, k_pad, c_pad = cfg.input_dim, padded.rank, padded.num_classes
    acts = d + 4 * sum(math.prod(ly.out_shape) for ly in cfg.layers() if ly.kind in ("conv", "pool"))
    plan = plan_cuda(count_params(padded), activation_bytes(acts, k_pad, cfg.width, c_pad),
                     bs, n, 4 * (d + cfg.num_classes), torch.cuda.mem_get_info(device)[0],
                     what=str(device), ddp=ranks > 1)
    bs, plan_rows, eval_rows = plan.batch, plan.stream_rows or n, plan.eval_rows
    if ranks > 1:  # every rank must take the same steps: the tightest GPU decides for all
        import torch.distributed as dist

        both = torch.tensor([bs, plan_rows], device=device)
        dist.all_reduce(both, op=dist.ReduceOp.MIN)
        bs, plan_rows = (int(v) for v in both.tolist())
    if bs < plan.batch:
        notes.append(f"--batch-size: another rank's GPU has less room: every rank trains with {bs}")
    elif plan.note:
        notes.append(plan.note)
    if plan_rows < (stream_rows or n):
        stream_rows = plan_rows
        notes.append(f"the training rows do not fit on {device} beside the student: streamed in "
                     f"blocks of {stream_rows:,} rows")
    return bs, stream_rows, eval_rows


def _statistics(x_train: Any, z_train: Any, cfg: StudentConfig, fit_cfg: FitConfig,
                notes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """What the student's inputs and targets are standardized by: the inputs' mean and spread (per
    feature; per channel for a convolutional student; none for token ids) and the targets' per-class
    mean and one overall scale. Constant features get a spread that makes them zero (a note says so)."""
    d = cfg.input_dim
    if cfg.vocab:  # token ids are indices, not measurements: nothing to standardize
        mu, sd, ignored = np.zeros(0), np.ones(0), 0
    else:
        mu, sd = _moments(x_train, d)
        if cfg.front:  # a convolution sees every position alike: one mean and spread per input channel
            mu, sd = per_channel(mu, sd, cfg.sample_shape, cfg.channels_last)
        sd, ignored = robust_scale(sd)
    if ignored:
        notes.append(f"{ignored:,} of {d:,} input features are constant over the transfer data (spread "
                     f"below {CONSTANT_BELOW:g} of the typical feature's): the student ignores them")
    z_mean, z_sd = _moments(z_train, z_train.shape[1])  # (C,)
    z_scale = float(np.sqrt((z_sd**2).mean())) or 1.0
    if fit_cfg.loss == "ce":  # one-hot targets stay as they are
        z_mean, z_scale = np.zeros_like(z_mean), 1.0
    return mu, sd, z_mean, z_scale


def _training_student(cfg: StudentConfig, padded: StudentConfig, device: torch.device) -> nn.Sequential:
    """The student as it trains on `device`: classes (and, on a GPU, the rank) padded as `padded`
    says, initialized as the real-size student would be."""
    import torch

    model = build_student(dataclasses.replace(padded, rank=cfg.rank))
    if padded.rank > cfg.rank:  # the real-rank student's first weights, and padding units of zero
        with torch.device("meta"):  # weights in and out (hence zero gradients throughout)
            shell = build_student(padded)
        shell.load_state_dict(gpu_step.with_rank(model.state_dict(), padded.rank), assign=True)
        model = shell
    model = model.to(device)
    model.relu.inplace = True  # one activation buffer fewer per step
    if gpu_step.fuse_relu_on(device):
        gpu_step.fuse_hidden_relu(model)
    return model


def _schedule(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate over `total` steps: a linear warm-up over the first 3%, then a cosine to 0."""
    import torch

    warm = max(1, int(0.03 * total))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))


def _real_student(model: nn.Module, cfg: StudentConfig) -> nn.Sequential:
    """The trained (padded) student as the real-size one, on the CPU in float32, in eval mode; it takes
    the trained tensors (no second copy of the student), the padding classes' rows dropped."""
    import torch

    real = slice(0, cfg.num_classes)
    with torch.device("meta"):
        student = build_student(cfg)
    state = {k: v.float().cpu() for k, v in gpu_step.with_rank(model.state_dict(), cfg.rank).items()}
    state["out.weight"] = state["out.weight"][real].clone()
    state["out.bias"] = state["out.bias"][real].clone()
    student.load_state_dict(state, assign=True)
    return student.eval()


def _fit(x_train: Any, z_train: Any, x_val: np.ndarray, z_val: np.ndarray, cfg: StudentConfig,
         fit_cfg: FitConfig, progress: FitProgress | None, stream_rows: int | None,
         checkpoint: str | None, resume: bool, world: Any, read_ahead: bool) -> FitResult:
    """fit(), inside its thread budget."""
    import torch

    fit_cfg.validate()
    cfg.validate()
    device = resolve_device(fit_cfg.device)
    ranks, rank = (world.size, world.rank) if world is not None else (1, 0)
    if ranks > 1 and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    torch.manual_seed(fit_cfg.seed)
    gen = torch.Generator(device="cpu").manual_seed(fit_cfg.seed)
    notes: list[str] = []

    n = len(x_train)
    mu, sd, z_mean, z_scale = _statistics(x_train, z_train, cfg, fit_cfg, notes)

    def prep(x: Any, z: Any, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows a:b, standardized, as CPU tensors (the feed moves them), read a chunk at a time."""
        xs = np.asarray(x[a:b], dtype=np.int64) if cfg.vocab else standardize(x, mu, sd, a, b)
        zs = standardize(z, z_mean, np.full_like(z_mean, z_scale), a, b)
        return torch.from_numpy(xs), torch.from_numpy(zs)

    if ranks > 1:  # an equal random shard per rank: DDP needs the same number of steps everywhere
        per = n // ranks
        mine = np.sort(np.random.default_rng(fit_cfg.seed).permutation(n)[rank * per : (rank + 1) * per])
        x_train, z_train, n = _rows(x_train, mine), _rows(z_train, mine), per  # read when prepared
    # Trained with the class count padded to a multiple of 16: an odd count such as 183 ran the output
    # matmul at 180 GFLOP/s against 309 for 192 on the 2-core CPU (GPU tensor cores want it too). Only
    # the real classes reach the loss; the real-size student is sliced out after training.
    c_pad = -(-cfg.num_classes // PAD) * PAD
    k_pad = gpu_step.padded_rank(cfg.rank, device)
    padded = dataclasses.replace(cfg, num_classes=c_pad, rank=k_pad)
    # held-out rows scored at once: at most EVAL_ELEMENTS hidden activations (2,000 rows of a 400k-wide
    # student at once were 3.2 GB, the largest memory of its fit)
    bs, eval_rows = min(fit_cfg.batch_size, n), max(1, min(8192, EVAL_ELEMENTS // cfg.width))
    if bs < fit_cfg.batch_size:
        notes.append(f"--batch-size {fit_cfg.batch_size:,} is more than the {n:,} training samples: one "
                     f"step an epoch, of {bs:,}")
    if device.type == "cuda":  # the batch and the training rows sized to the GPU's free memory
        bs, stream_rows, eval_rows = _plan_gpu(cfg, padded, bs, n, stream_rows, device, ranks, notes)
    bounds = [(a, min(n, a + (stream_rows or n))) for a in range(0, n, stream_rows or n)]
    feed = Feed(x_train, z_train, bounds, prep, device, prefetch=read_ahead)
    xv, zv = prep(x_val, z_val, 0, len(x_val))
    xv, zv = xv.to(device), zv.to(device)
    # top-1 on the logits themselves: the per-class centring of the targets moves argmaxes
    teacher_top = torch.from_numpy(np.asarray(z_val, dtype=np.float32)).argmax(dim=1).to(device)
    shift = torch.from_numpy((z_mean / z_scale).astype(np.float32)).to(device)

    model = _training_student(cfg, padded, device)
    names = [name for name, _ in model.named_parameters()]
    real = slice(0, cfg.num_classes)
    net = model
    if ranks > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=fit_cfg.lr, weight_decay=fit_cfg.weight_decay,
                            fused=True)  # one kernel over all parameters, on CPU as on GPU
    steps_per_epoch = sum(math.ceil((b - a) / bs) for a, b in bounds)
    epochs = fit_cfg.epochs or auto_epochs(n, bs)
    total = epochs * steps_per_epoch
    sched = _schedule(opt, total)
    loss_fn = _loss_fn(fit_cfg, z_scale)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def evaluate() -> tuple[float, float]:
        model.eval()
        loss, agree = 0.0, 0
        with torch.no_grad(), autocast:
            for i in range(0, xv.shape[0], eval_rows):
                s = model(xv[i : i + eval_rows])[:, real].float()
                loss += float(loss_fn(s, zv[i : i + eval_rows])) * s.shape[0]
                agree += int(((s + shift).argmax(dim=1) == teacher_top[i : i + eval_rows]).sum())
        model.train()
        scale = z_scale**2 if fit_cfg.loss == "l2" else 1.0  # report L2 in logit units
        return loss / xv.shape[0] * scale, agree / xv.shape[0]

    history: list[dict[str, float]] = []
    # the best epoch's weights: none until an epoch is scored, then one copy, overwritten in place (at
    # the paper's size each copy is 0.7 GB)
    best: tuple[float, int, dict[str, Any] | None] = (math.inf, 0, None)
    seen, t0, last_report = 0, time.perf_counter(), 0.0
    step, first_epoch, earlier_seconds = 0, 1, 0.0
    run = {"student": cfg.to_dict(), "fit": {k: v for k, v in fit_cfg.__dict__.items() if k != "device"},
           "samples": n, "epochs": epochs, "input_mean": torch.from_numpy(mu),
           "input_sd": torch.from_numpy(sd)}
    state = ckpt.load(checkpoint, run) if (checkpoint and resume) else None
    resumed_from = 0 if state is None else int(state["epoch"])
    if checkpoint and resume and state is None:
        notes.append(f"--resume: no checkpoint at {checkpoint}: trained from the start")
    earlier = ckpt.finished_epoch(checkpoint, run) if (checkpoint and not resume and rank == 0) else None
    if earlier is not None and progress:  # said now, while there is time to stop and add --resume
        progress({"note": f"{checkpoint} holds epoch {earlier} of {epochs} of an unfinished run with these "
                          "options; this run replaces it when its first epoch ends (stop now and add "
                          "--resume to continue it instead)"})
    if state is not None:  # saved with the real rank (RANK_AXES)
        model.load_state_dict(gpu_step.with_rank(state["model"], k_pad))
        opt.load_state_dict(gpu_step.opt_with_rank(state["opt"], names, k_pad))
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        best = (state["best_val"], state["best_epoch"], gpu_step.with_rank(state["best_state"], k_pad))
        history, seen, step = state["history"], state["seen"], state["step"]
        first_epoch, earlier_seconds = state["epoch"] + 1, state["seconds"]
    model.train()
    graph = (gpu_step.GraphStep(model, opt, loss_fn, real, bs, autocast)
             if engine.use_graph(fit_cfg, device, ranks, cfg, bs) else None)
    split = (engine.split_step(model, opt, loss_fn, cfg, bs, l2=fit_cfg.loss == "l2")
             if engine.use_split(fit_cfg, device, ranks, cfg, bs) else None)

    def autograd_step(xt: torch.Tensor, zt: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        with autocast:
            loss = loss_fn(net(xt[idx])[:, real].float(), zt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    train_step = split.step if split is not None else graph.step if graph is not None else autograd_step
    with contextlib.ExitStack() as stack:
        if split is not None:
            stack.enter_context(split)
            # the scheduler sets the rate the split step reads; opt.step() itself is never called
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        for epoch in range(first_epoch, epochs + 1):
            running = torch.zeros((), device=device)
            epoch_start, epoch_seen = time.perf_counter(), seen
            for xt, zt in feed.epoch(torch.randperm(len(bounds), generator=gen).tolist()):
                rows = xt.shape[0]
                perm = torch.randperm(rows, generator=gen).to(device)
                for i in range(0, rows, bs):
                    idx = perm[i : i + bs]
                    loss = train_step(xt, zt, idx)
                    sched.step()
                    running += loss.detach()
                    seen += idx.shape[0]
                    step += 1
                    now = time.perf_counter()
                    if progress and now - last_report > 0.25:
                        last_report = now
                        progress({"epoch": epoch, "epochs": epochs, "step": step, "steps": total,
                                  "samples_per_second": seen / (now - t0)})
                del xt, zt  # so that the feed holds at most the next block and the one after it
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_seconds = time.perf_counter() - epoch_start  # the steps, and any wait for a block
            if split is not None:
                split.to_model(moments=bool(checkpoint))
                with split.paused():
                    val_loss, agreement = evaluate()
            else:
                val_loss, agreement = evaluate()
            train_loss = float(running) / steps_per_epoch * (z_scale**2 if fit_cfg.loss == "l2" else 1)
            if not (math.isfinite(train_loss) and math.isfinite(val_loss)):  # before the checkpoint
                raise DivergedError(_diverged(epoch, train_loss, val_loss, fit_cfg, checkpoint, rank))
            # the held-out L2 loss as a fraction of the teacher's logit variance (0: exact, 1: no better
            # than predicting each class's mean logit); readable whatever the logits' scale
            residual = val_loss / (0.5 * cfg.num_classes * z_scale**2) if fit_cfg.loss == "l2" else None
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                            "val_residual": residual,
                            "agreement": agreement, "step_seconds": step_seconds,
                            "step_samples_per_second": (seen - epoch_seen) / step_seconds})
            if val_loss < best[0]:
                best = (val_loss, epoch, _snapshot(model, best[2]))
            if checkpoint and rank == 0:
                ckpt.save(checkpoint, {"run": run, "epoch": epoch,
                                       "model": gpu_step.with_rank(model.state_dict(), cfg.rank),
                                       "opt": gpu_step.portable(
                                           gpu_step.opt_with_rank(opt.state_dict(), names, cfg.rank)),
                                       "sched": sched.state_dict(), "gen": gen.get_state(),
                                       "best_val": best[0], "best_epoch": best[1],
                                       "best_state": gpu_step.with_rank(best[2], cfg.rank),
                                       "history": history, "seen": seen, "step": step,
                                       "seconds": earlier_seconds + time.perf_counter() - t0})
            if split is not None:
                opt.state.clear()  # the split step holds the moments; this copy was for the file
            if progress:
                now = time.perf_counter()
                progress({"epoch": epoch, "epochs": epochs, "step": epoch * steps_per_epoch,
                          "steps": total, "samples_per_second": seen / (now - t0), "loss": val_loss,
                          "residual": residual,
                          "agreement": agreement})
    if device.type == "cuda":
        torch.cuda.synchronize()
    ran = "split" if split is not None else "graph" if graph is not None and graph.graph else "autograd"
    if graph is not None and graph.failed:
        notes.append(f"the training step could not be captured as a CUDA graph ({graph.failed}): it ran "
                     "eagerly")
    seconds = earlier_seconds + time.perf_counter() - t0

    if best[2] is not None:
        model.load_state_dict(best[2])
    best = (best[0], best[1], None)
    model = _real_student(model, cfg)
    _fold(model, mu, sd, z_mean, z_scale)
    return FitResult(model=model, epochs=epochs, best_epoch=best[1], seconds=seconds,
                     samples_per_second=seen * ranks / seconds, device=str(device), history=history,
                     world_size=ranks, engine=ran, batch_size=bs,
                     streamed=len(bounds) > 1, notes=notes, resumed_from_epoch=resumed_from)
