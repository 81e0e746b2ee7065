"""The student a run trains, planned before the teacher runs: its layer list from the options
(`--student` in the paper's notation, or `--width`/`--rank`, or a token-id student's embedding bag),
with the defaults that fill in what was not given, and a refusal when training it cannot fit in the
memory this process may use."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from compress import tokens
from compress.errors import ConfigError
from compress.fit import FitConfig
from compress.student import StudentConfig, count_params

if TYPE_CHECKING:
    from compress.pipeline import DistillOptions


def check_memory(cfg: StudentConfig, fit: FitConfig, data_bytes: int, option: str | None = None,
                 spec: str | None = None) -> None:
    """Refuse, before the teacher runs, a CPU fit that cannot fit in the memory this process may use
    (compress.memory). A GPU fit plans its own memory (compress.feed.plan_cuda). `spec`: the student as
    the user gave it, named in the message instead of the width; `option`: the option that gave it
    (default --student, or --width without a spec)."""
    from compress.feed import activation_bytes
    from compress.fit import resolve_device
    from compress.memory import available_bytes, gib, training_bytes

    if resolve_device(fit.device).type != "cpu":
        return
    need = training_bytes(count_params(cfg), fit.batch_size,
                          activation_bytes(cfg.input_dim, cfg.rank, cfg.width, cfg.num_classes), data_bytes)
    room = available_bytes()
    if room is not None and need > room:
        option = option or ("--student" if spec else "--width")
        said = f"{option} {spec}" if spec else f"{option} {cfg.width:,}"
        raise ConfigError(f"{said}: training this student ({count_params(cfg):,} weights) "
                          f"needs about {gib(need)} (weights, gradients, Adam moments, the best epoch's "
                          f"copy, activations, data) but this process may use {gib(room)}; use a smaller "
                          + ("student" if spec else "--width or --rank"))


def default_rank(input_dim: int) -> int:
    """250 as in the paper's TIMIT students, but never more than half the input: a bottleneck as
    wide as the input saves no parameters and no time."""
    return min(250, input_dim // 2)


TOKEN_RANK = 64  # a token-id student's default embedding size (fastText's range; Tang et al. 2019)
NGRAM_BUCKETS = 100_000  # default hash rows for --ngrams 2 or 3 (fastText takes 2M; on a few thousand
# texts most rows would never be seen, and each costs k parameters)


def student_config(sample_shape: tuple[int, ...], num_classes: int, width: int,
                   rank: int | None, spec: str | None = None, vocab: int = 0,
                   inputs: tuple[str, ...] = (), ngrams: int = 1,
                   buckets: int | None = None, layout: str = "auto") -> StudentConfig:
    """The student for this teacher: from `spec` (the paper's notation) when given, else width and
    rank (None: default_rank of the input). With `vocab`, a token-id student (compress.tokens) over
    the teacher's `inputs`: the rank is its embedding size (TOKEN_RANK when not given). `layout`: where
    a conv student finds the channels (compress.student.channels_last)."""
    from compress.student import LAYOUTS, channels_last, parse_spec

    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout}: must be one of {', '.join(LAYOUTS)}")

    front: tuple[tuple[str, int, int], ...] = ()
    if spec is not None:
        front, rank, width = parse_spec(spec)
    if vocab:
        if buckets is None:
            buckets = NGRAM_BUCKETS if ngrams > 1 else 0
        cfg = StudentConfig(tuple(sample_shape), num_classes, width, TOKEN_RANK if rank is None else rank,
                            front, vocab, tuple(inputs), ngrams, buckets)
        try:
            cfg.validate()
        except ConfigError as e:
            said = f"--student {spec or cfg.spec}"
            raise ConfigError(str(e).replace(f"--student {cfg.spec}", said)) from None
        return cfg
    last = bool(front) and len(sample_shape) > 1 and channels_last(tuple(sample_shape), layout)
    if layout == "last" and front and len(sample_shape) == 1:
        raise ConfigError(f"--layout last: samples of shape {tuple(sample_shape)} have no channel axis")
    probe = StudentConfig(tuple(sample_shape), num_classes, width, 0, front, channels_last=last)
    try:
        probe.validate()  # shapes through the convolutions and pooling: a bad token is named here
    except ConfigError as e:  # named as the user wrote it, not as normalized (8c -> 8c3)
        raise ConfigError(str(e).replace(f"--student {probe.spec}", f"--student {spec}")) from None
    d = probe.head_dim
    k = default_rank(d) if rank is None else rank
    if k > d:
        option = f"--student {spec}" if spec is not None else "--rank"
        raise ConfigError(f"{option}: a bottleneck of {k} is larger than the {d} features it reads; a "
                          "bottleneck wider than its input saves nothing (use a rank below it, or 0 for "
                          "none)")
    cfg = StudentConfig(tuple(sample_shape), num_classes, width, k, front, channels_last=last)
    cfg.validate()
    return cfg


def student_vocab(x: np.ndarray, inputs: tuple[str, ...], opts: DistillOptions) -> int:
    """A token-id student's V: --vocab-size, else the data's largest id + 1; 0 for float inputs."""
    return (opts.vocab_size or tokens.vocab_size(x, inputs)) if inputs else 0
