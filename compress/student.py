"""The student: a wide, shallow net with a linear bottleneck (Ba & Caruana 2014, section 2.2).

    x -> flatten -> Linear(D, k, no bias) -> Linear(k, H) -> ReLU -> Linear(H, C)

k is the rank (0: no bottleneck, `Linear(D, H)`), H the width. The bottleneck factors the D x H
input weights into D x k and k x H, which is what made training a 400k-wide SNN-MIMIC net feasible.

A student may put convolution and pooling layers first (the paper's SNN-CNN-MIMIC, `64c-p-1200L-30k`):
`parse_spec` reads the paper's notation into a StudentConfig, and `StudentConfig.layers()` is the one
layer list, with every shape worked out, that building, counting, the ONNX writer and the report
read. Which convolution the teacher's sample shape picks: (C, H, W) 2-D, channels first; (C, L) 1-D;
(L,) 1-D over one channel. A convolutional student standardizes its input inside the model (a `norm`
layer: per-channel mean and scale, two constants per input feature, not counted as parameters) rather
than in its first weights: folding a per-feature scale into a convolution is not exact where the
convolution reads zero padding.
torch is imported only where a model is built, so parsing options stays cheap.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from compress.errors import ConfigError

if TYPE_CHECKING:
    import torch

_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000}
FORMAT = "compress-student/1"  # student.pt's format tag; load_student reads this one only


NGRAM_PRIME = 1_000_003  # the n-gram hash: h = (h * P + id) mod buckets, token by token
MAX_BUCKETS = 10_000_000  # keeps h * P inside int64
CONV_KERNEL = 3  # `<N>c` alone: a 3-wide (or 3x3) kernel, as in the paper's and Urban et al.'s students
POOL_WINDOW = 2  # `p` alone: max pooling over 2 (or 2x2), stride the same


@dataclass(frozen=True)
class Layer:
    """One layer of a student, with its shapes per sample (no batch axis). `kind`: transpose, norm,
    unsqueeze, conv, pool, flatten, bottleneck, hidden, out (the ReLUs after conv and hidden are
    implied)."""

    kind: str
    name: str  # the module's name in the torch Sequential and the prefix of its weights
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    size: int = 0  # filters (conv), units (bottleneck, hidden, out), window (pool)
    kernel: int = 0  # conv kernel width
    params: int = 0  # trained weights and biases
    flops: int = 0  # 2 x multiply-adds per sample, forward

    @property
    def token(self) -> str:
        return {"conv": f"{self.size}c{self.kernel}", "pool": f"p{self.size}"}.get(self.kind, self.kind)


@dataclass(frozen=True)
class StudentConfig:
    sample_shape: tuple[int, ...]  # one input sample, without the batch axis
    num_classes: int  # C, the teacher's logits
    width: int  # H, hidden ReLU units
    rank: int  # k, the linear bottleneck; 0 = none
    front: tuple[tuple[str, int, int], ...] = ()  # ("c", filters, kernel) / ("p", window, 0), in order
    # A token-id student (compress.tokens): V, the rows of its embedding bag, and the teacher's inputs
    # in order (a sample is their (I, L) stack); vocab 0 for a student of float inputs.
    vocab: int = 0
    inputs: tuple[str, ...] = ()
    ngrams: int = 1  # token students: n-grams up to this n join the bag, hashed into `buckets` rows
    buckets: int = 0
    # A conv student of a teacher whose samples hold their channels last, (H, W, C) or (L, C), as
    # Keras / TensorFlow models converted to ONNX take them: the first layer moves them first.
    channels_last: bool = False

    @property
    def input_dim(self) -> int:
        """Features of one raw input sample."""
        return math.prod(self.sample_shape)

    @property
    def head_dim(self) -> int:
        """D of the head: features reaching the bottleneck (or the hidden layer), after any conv/pool."""
        return math.prod(self.layers()[-4 if self.rank > 0 else -3].in_shape)

    @property
    def spec(self) -> str:
        """The student in the paper's notation: `64c3-p2-1200L-30k`, `250L-400k`, `8k`."""
        tokens = [f"{a}c{b}" if kind == "c" else f"p{a}" for kind, a, b in self.front]
        return "-".join([*tokens, *([f"{self.rank}L"] if self.rank else []), format_width(self.width)])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sample_shape"] = list(self.sample_shape)
        d["front"] = [list(t) for t in self.front]
        d["inputs"] = list(self.inputs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudentConfig:
        front = tuple((str(t[0]), int(t[1]), int(t[2])) for t in d.get("front", []))
        return cls(tuple(int(v) for v in d["sample_shape"]), int(d["num_classes"]), int(d["width"]),
                   int(d["rank"]), front, int(d.get("vocab", 0)), tuple(str(n) for n in d.get("inputs", ())),
                   int(d.get("ngrams", 1)), int(d.get("buckets", 0)), bool(d.get("channels_last", False)))

    def validate(self) -> None:
        if self.width < 1:
            raise ConfigError(f"--width: must be at least 1, got {self.width}")
        if self.rank < 0:
            raise ConfigError(f"--rank: must be 0 (no bottleneck) or more, got {self.rank}")
        self.layers()

    def layers(self) -> tuple[Layer, ...]:
        """The layer list every stage reads, shapes worked out; ConfigError naming a token that
        cannot apply to this input (a conv on a flat vector of features is fine: (L,) is a signal)."""
        out: list[Layer] = []
        shape = tuple(self.sample_shape)
        if self.vocab:
            return self._token_layers()
        if self.front:
            if len(shape) not in (1, 2, 3):
                raise ConfigError(f"--student {self.spec}: convolution needs a teacher input of shape (L,), "
                                  f"(C, L) or (C, H, W); this teacher's samples are {shape}")
            if self.channels_last:
                if len(shape) == 1:
                    raise ConfigError(f"--layout last: samples of shape {shape} have no channel axis")
                moved = (shape[-1], *shape[:-1])
                out.append(Layer("transpose", "transpose", shape, moved))
                shape = moved
            out.append(Layer("norm", "norm", shape, shape))
            if len(shape) == 1:
                out.append(Layer("unsqueeze", "unsqueeze", shape, (1, shape[0])))
                shape = (1, shape[0])
            for i, (kind, a, b) in enumerate(self.front):
                if kind == "c":
                    spatial = math.prod(shape[1:])
                    w = a * shape[0] * b ** (len(shape) - 1)
                    new = (a, *shape[1:])
                    out.append(Layer("conv", f"conv{i}", shape, new, a, b, w + a, 2 * w * spatial))
                else:
                    new = (shape[0], *(n // a for n in shape[1:]))
                    if min(new[1:]) < 1:
                        raise ConfigError(f"--student {self.spec}: token 'p{a}' pools {shape[1:]} below 1")
                    out.append(Layer("pool", f"pool{i}", shape, new, a))
                shape = new
        d = math.prod(shape)
        out.append(Layer("flatten", "flatten", shape, (d,)))
        if self.rank > 0:
            out.append(Layer("bottleneck", "bottleneck", (d,), (self.rank,), self.rank, 0, d * self.rank,
                             2 * d * self.rank))
            d = self.rank
        out.append(Layer("hidden", "hidden", (d,), (self.width,), self.width, 0, d * self.width + self.width,
                         2 * d * self.width))
        out.append(Layer("out", "out", (self.width,), (self.num_classes,), self.num_classes, 0,
                         self.width * self.num_classes + self.num_classes, 2 * self.width * self.num_classes))
        return tuple(out)


    def _token_layers(self) -> tuple[Layer, ...]:
        """embed (a V x k bag of the ids, the mean over the tokens the mask keeps) -> hidden -> out."""
        if self.front:
            raise ConfigError(f"--student {self.spec}: a token-id teacher takes no convolution or pooling "
                              "here; use <k>L-<H> (an embedding bag of k, then the wide layer)")
        if self.rank < 1:
            raise ConfigError(f"--student {self.spec}: a token-id teacher needs the bottleneck, the size of "
                              "its embedding bag: give <k>L-<H> or --rank k (e.g. 64L-2k)")
        if self.ngrams not in (1, 2, 3) or (self.ngrams > 1) != (self.buckets > 0):
            raise ConfigError(f"--ngrams {self.ngrams}: 1, 2 or 3, with --buckets > 0 for 2 and 3")
        if self.buckets > MAX_BUCKETS:
            raise ConfigError(f"--buckets {self.buckets:,}: at most {MAX_BUCKETS:,}")
        k, h, c, tokens = self.rank, self.width, self.num_classes, self.sample_shape[-1]
        return (Layer("embed", "embed", tuple(self.sample_shape), (k,), k, 0, (self.vocab + self.buckets) * k,
                      2 * self.ngrams * tokens * k),
                Layer("hidden", "hidden", (k,), (h,), h, 0, k * h + h, 2 * k * h),
                Layer("out", "out", (h,), (c,), c, 0, h * c + c, 2 * h * c))


LAYOUTS = ("auto", "first", "last")  # --layout: where a conv student finds the channels of a sample


def channels_last(sample_shape: tuple[int, ...], layout: str = "auto") -> bool:
    """Whether a conv student reads the channels of these samples from their last axis. `auto`: for
    (H, W, C) images whose last axis is 1, 3 or 4 (grey, RGB, RGBA) and whose first is not (a Keras /
    TensorFlow model's NHWC input); `first`/`last` as said. A (C, L) / (L, C) signal is channels first
    unless --layout last says otherwise: nothing in two sizes tells them apart."""
    if layout == "auto":
        return len(sample_shape) == 3 and sample_shape[-1] in (1, 3, 4) and sample_shape[0] not in (1, 3, 4)
    return layout == "last"


def conv_kind(sample_shape: tuple[int | None, ...] | None, layout: str = "auto") -> str:
    """What a conv token (`<N>c`) means for a teacher with samples of this shape (`compress inspect`)."""
    if sample_shape is None or any(not isinstance(v, int) or v < 1 for v in sample_shape):
        return ("decided by the data's sample shape: (C, H, W) 2-D, (C, L) 1-D, (L,) 1-D over one channel; "
                "(H, W, C) with C of 1, 3 or 4 is channels last (--layout)")
    shape = tuple(int(v) for v in sample_shape)  # type: ignore[arg-type]
    if len(shape) in (2, 3) and channels_last(shape, layout):
        c, *s = shape[-1], *shape[:-1]
        return (f"{len(s)}-D over {c} channel(s) of {'x'.join(map(str, s))}, channels last (moved first in "
                "the student's first node; --layout first to read them as (C, ...))")
    if len(sample_shape) == 3:
        return f"2-D over {sample_shape[0]} channel(s) of {sample_shape[1]}x{sample_shape[2]}"
    if len(sample_shape) == 2:
        return f"1-D over {sample_shape[0]} channel(s) of length {sample_shape[1]}"
    if len(sample_shape) == 1:
        return f"1-D over one channel of length {sample_shape[0]} (a flat signal)"
    return f"none: samples of shape {tuple(sample_shape)} take MLP students only (--width/--rank, <k>L-<H>)"


def format_width(n: int) -> str:
    """30000 -> '30k', 1500000 -> '1.5M', 512 -> '512': what parse_width reads back to n."""
    for suffix, unit in (("M", 1_000_000), ("k", 1_000)):
        if n >= unit and n % (unit // 1000 if unit > 1000 else 1) == 0:
            v = n / unit
            if v == int(v):
                return f"{int(v)}{suffix}"
            if n % (unit // 10) == 0 and suffix == "M":
                return f"{v:g}{suffix}"
    return str(n)


def parse_spec(text: str) -> tuple[tuple[tuple[str, int, int], ...], int, int]:
    """The paper's notation -> (front, rank, width). Tokens joined by '-', input to output: `<N>c[<K>]`
    a convolution (N filters, odd kernel K, default CONV_KERNEL, stride 1, same padding) + ReLU; `p[<K>]`
    max pooling (window and stride K, default POOL_WINDOW); `<k>L` the linear bottleneck; `<H>` the wide
    ReLU layer, last (8k, 30k, 400k, 1.5M). ConfigError naming the offending token."""
    tokens = [t.strip() for t in str(text).split("-")]

    def bad(token: str, why: str) -> ConfigError:
        return ConfigError(f"--student {text}: token '{token}' {why}")

    if not tokens or not tokens[-1]:
        raise ConfigError(f"--student {text}: empty; use e.g. 250L-8k or 64c-p-1200L-30k")
    front: list[tuple[str, int, int]] = []
    rank = 0
    for i, t in enumerate(tokens[:-1]):
        if m := re.fullmatch(r"(\d+)c(\d*)", t):
            if rank:
                raise bad(t, "is a convolution after the bottleneck; convolutions and pooling come first")
            n, k = int(m.group(1)), int(m.group(2) or CONV_KERNEL)
            if n < 1 or k < 1 or k % 2 == 0:
                raise bad(t, "needs at least 1 filter and an odd kernel (same padding on both sides)")
            front.append(("c", n, k))
        elif m := re.fullmatch(r"p(\d*)", t):
            if rank:
                raise bad(t, "is pooling after the bottleneck; convolutions and pooling come first")
            k = int(m.group(1) or POOL_WINDOW)
            if k < 1:
                raise bad(t, "needs a window of at least 1")
            front.append(("p", k, 0))
        elif m := re.fullmatch(r"(\d+)L", t):
            if rank or i != len(tokens) - 2:
                raise bad(t, "must be the one bottleneck, right before the hidden width")
            rank = int(m.group(1))
            if rank < 1:
                raise bad(t, "needs at least 1 unit (leave the token out for no bottleneck)")
        else:
            try:
                parse_width(t)
            except ValueError:
                raise bad(t, "is not <N>c[<K>], p[<K>], <k>L or a width") from None
            raise bad(t, "is a width before the end; the wide layer is last (a conv or pool after it "
                         "cannot be)")
    last = tokens[-1]
    if re.fullmatch(r"\d+c\d*|p\d*", last):
        raise bad(last, "comes after everything; the last token is the hidden width (e.g. 8k)")
    try:
        width = parse_width(last)
    except ValueError:
        raise bad(last, "is not a width (8000, 8k, 400k, 1.5M); the last token is the hidden layer"
                  ) from None
    return tuple(front), rank, width


def parse_width(text: str | int) -> int:
    """'8000', '8k', '400k', '1.5M' -> int. Raises ValueError with a readable message."""
    s = str(text).strip().lower().replace("_", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([km]?)", s)
    if not m:
        raise ValueError(f"'{text}' is not a width; use a whole number like 8000, 8k, 400k or 1.5M")
    value = float(m.group(1)) * _SUFFIX[m.group(2)]
    if value != int(value):
        raise ValueError(f"'{text}' is not a whole number of units")
    if value < 1:
        raise ValueError(f"'{text}': the width must be at least 1")
    return int(value)


def count_params(cfg: StudentConfig) -> int:
    """Trained weights, from the layer list: D*k + k*H + H + H*C + C with a bottleneck, D*H + H + H*C + C
    without, plus each convolution's filters and biases (D then counts the features after them)."""
    return sum(layer.params for layer in cfg.layers())


def flops_per_sample(cfg: StudentConfig) -> int:
    """Multiply-adds x 2 for one forward pass, convolutions included; forward + backward is about 3x."""
    return sum(layer.flops for layer in cfg.layers())


def build_student(cfg: StudentConfig) -> torch.nn.Sequential:
    """The student as a torch module; layer names are what `student.pt` and the exporter use."""
    from collections import OrderedDict

    from torch import nn

    from compress import conv

    cfg.validate()
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    listed = cfg.layers()
    for i, layer in enumerate(listed):
        # a conv's ReLU moves after a pooling layer right after it (compress.conv.MaxPool)
        pooled = i + 1 < len(listed) and listed[i + 1].kind == "pool" and layer.kind == "conv"
        if layer.kind == "embed":
            from compress.tokens import roles

            r = roles(cfg.inputs)
            layers["embed"] = _embedding_bag_class()(cfg.vocab, layer.size, r.ids, r.mask, cfg.ngrams,
                                                     cfg.buckets)
        # A conv front runs on channels-last activations (compress.conv), from the norm's output to
        # the flatten, which restores the channels-first order of the layer list and the ONNX graph.
        elif layer.kind == "norm":
            layers["norm"] = _standardize_class()(layer.in_shape)  # identity until fit sets it
        elif layer.kind == "unsqueeze":
            layers["unsqueeze"] = nn.Unflatten(1, (layer.in_shape[0], 1))  # (N, L) -> (N, L, 1)
        elif layer.kind == "transpose":  # (N, *S, C) -> (N, C, *S), a view
            layers["transpose"] = conv.ChannelsFirst(layer.in_shape)
        elif layer.kind == "conv":  # + its ReLU
            layers[layer.name] = conv.Conv(layer.in_shape[0], layer.size, layer.kernel,
                                           len(layer.in_shape) - 1, relu=not pooled)
        elif layer.kind == "pool":
            layers[layer.name] = conv.MaxPool(layer.size, relu=listed[i - 1].kind == "conv")
        elif layer.kind == "flatten":  # (N, ...) -> (N, D)
            layers["flatten"] = conv.ChannelsFirstFlatten() if cfg.front else nn.Flatten()
        elif layer.kind == "bottleneck":
            layers["bottleneck"] = nn.Linear(layer.in_shape[0], layer.size, bias=False)  # (N, D) -> (N, k)
        elif layer.kind == "hidden":
            layers["hidden"] = nn.Linear(layer.in_shape[0], layer.size)  # (N, k or D) -> (N, H)
            layers["relu"] = nn.ReLU()
        else:
            layers["out"] = nn.Linear(layer.in_shape[0], layer.size)  # (N, H) -> (N, C)
    return nn.Sequential(layers)


@functools.cache
def _embedding_bag_class() -> type:
    from torch import nn

    class EmbeddingBag(nn.Module):
        """(N, I, L) stacked token inputs -> (N, k): the mean of the ids' rows over the tokens the mask
        keeps, and with `ngrams` n > 1 of the rows of their n-grams (all tokens kept), hashed into
        `buckets` rows (NGRAM_PRIME): the mean over tokens and n-grams together. An id at or above V
        (and an n-gram holding one) counts with a zero row, never an index error."""

        def __init__(self, vocab: int, dim: int, ids: int, mask: int | None, ngrams: int = 1,
                     buckets: int = 0) -> None:
            import torch

            super().__init__()
            self.vocab, self.ids, self.mask, self.ngrams, self.buckets = vocab, ids, mask, ngrams, buckets
            self.weight = nn.Parameter(torch.randn(vocab, dim))
            if ngrams > 1:
                self.ngram = nn.Parameter(torch.randn(buckets, dim))

        def forward(self, x: Any) -> Any:
            import torch
            import torch.nn.functional as F

            ids = x[:, self.ids]
            keep = (x[:, self.mask] > 0) if self.mask is not None else torch.ones_like(ids, dtype=torch.bool)
            known = keep & (ids < self.vocab)
            row = ids.clamp(0, self.vocab - 1)
            dtype = self.weight.dtype
            bag = F.embedding_bag(row, self.weight, mode="sum", per_sample_weights=known.to(dtype))
            count = keep.sum(dim=1, keepdim=True)
            length = ids.shape[1]
            for n in range(2, self.ngrams + 1):
                if length < n:
                    break
                h = torch.zeros_like(row[:, : length - n + 1])
                kept = whole = torch.ones_like(h, dtype=torch.bool)
                for j in range(n):  # h = ((id_1 mod B) * P + id_2) mod B, and so on for id_3
                    part = slice(j, length - n + 1 + j)
                    h = (h * NGRAM_PRIME + row[:, part]) % self.buckets
                    kept, whole = kept & keep[:, part], whole & known[:, part]
                bag = bag + F.embedding_bag(h, self.ngram, mode="sum", per_sample_weights=whole.to(dtype))
                count = count + kept.sum(dim=1, keepdim=True)
            return bag / count.to(dtype).clamp_min(1.0)

    return EmbeddingBag


@functools.cache
def _standardize_class() -> type:
    from torch import nn

    class Standardize(nn.Module):
        """(x - mean) * scale with constant per-feature buffers (per channel, repeated over positions):
        a convolutional student's input standardization, kept in the model so that it is exact at
        the convolution's zero-padded borders. Buffers, not parameters: nothing trains them."""

        def __init__(self, shape: tuple[int, ...]) -> None:
            import torch

            super().__init__()
            self.register_buffer("mean", torch.zeros(shape))
            self.register_buffer("scale", torch.ones(shape))

        def forward(self, x: Any) -> Any:  # (N, *shape), or (N, D) as training feeds it
            y = (x.reshape(x.shape[0], *self.mean.shape) - self.mean) * self.scale
            return y.movedim(1, -1).contiguous() if y.dim() > 2 else y  # channels last (compress.conv)

    return Standardize




def save_student(model: torch.nn.Module, cfg: StudentConfig, path: str, meta: dict[str, Any],
                 check_inputs: Any = None) -> None:
    """`student.pt`: config, teacher signature, state dict, and a few held-out inputs that later
    exports are checked on; loadable with weights_only=True."""
    import torch

    from compress.atomic import atomic_path

    payload = {"format": FORMAT, "config": cfg.to_dict(), "meta": meta,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if check_inputs is not None:
        payload["check_inputs"] = torch.as_tensor(check_inputs,
                                                  dtype=torch.int64 if cfg.vocab else torch.float32)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: a full disk raises OSError
        torch.save(payload, f)


def load_student(path: str) -> tuple[torch.nn.Sequential, StudentConfig, dict[str, Any]]:
    """The model, its config, and its meta (with `check_inputs` as a numpy array when stored)."""
    # No pickled code is ever executed: weights_only=True.
    import torch

    def bad(why: str) -> ConfigError:
        return ConfigError(f"STUDENT {path}: not a usable student.pt written by compress ({why})")

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"STUDENT {path}: file not found") from None
    except Exception as e:
        raise bad(type(e).__name__) from None
    if not isinstance(payload, dict):
        raise bad(f"holds {type(payload).__name__}")
    if payload.get("format") != FORMAT:
        raise bad(f"format {payload.get('format')!r}; this version reads {FORMAT!r}")
    try:
        cfg = StudentConfig.from_dict(payload["config"])
        cfg.validate()
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise bad(f"config: {type(e).__name__} {e}") from None
    model = build_student(cfg)
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise bad("no state_dict")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise bad(f"weights: {str(e).splitlines()[0][:160]}") from None
    model.eval()
    meta = dict(payload.get("meta", {})) if isinstance(payload.get("meta"), dict) else {}
    sig = meta.get("signature")
    needed = {"input_name": str, "sample_shape": (list, tuple), "input_dtype": str, "output_name": str}
    if not isinstance(sig, dict) or any(not isinstance(sig.get(k), t) for k, t in needed.items()):
        raise bad("no teacher signature (input and output names, shape, dtype)")
    if list(sig["sample_shape"]) != list(cfg.sample_shape):
        raise bad(f"signature shape {sig['sample_shape']} vs config {list(cfg.sample_shape)}")
    if "check_inputs" in payload:
        check = payload["check_inputs"]
        if not isinstance(check, torch.Tensor) or check.ndim < 1 or check.shape[0] == 0 or \
                tuple(check.shape[1:]) not in (tuple(cfg.sample_shape), (cfg.input_dim,)):
            raise bad("check_inputs are empty or not shaped like the student's input")
        meta["check_inputs"] = check.numpy()
    return model, cfg, meta
