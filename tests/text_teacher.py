"""A tiny text classifier with a transformer's interface, built and exported to ONNX in the tests:
int64 `input_ids`, `attention_mask`, `token_type_ids` [batch, sequence] -> `logits` [batch, classes].

One self-attention layer (masked), a ReLU feed-forward layer, mean pooling over the kept tokens, and a
linear head; random weights, scaled so that which tokens a text holds decides its class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

VOCAB, DIM, CLASSES = 300, 32, 4


class TinyText(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = DIM, classes: int = CLASSES, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.types = nn.Embedding(vocab, dim), nn.Embedding(2, dim)
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.ff1, self.ff2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)
        with torch.no_grad():
            self.head.weight.mul_(8.0)

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.emb(input_ids) + self.types(token_type_ids)
        keep = attention_mask.unsqueeze(1).to(h.dtype)  # (N, 1, L)
        scores = self.q(h) @ self.k(h).transpose(1, 2) / DIM**0.5 + (1.0 - keep) * -1e4
        h = h + torch.softmax(scores, dim=-1) @ self.v(h)
        h = h + self.ff2(torch.relu(self.ff1(h)))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


NAMES = ("input_ids", "attention_mask", "token_type_ids")


def balanced() -> TinyText:
    """TinyText with its head's bias set so that each class is about as common as the others."""
    model = TinyText().eval()
    t = {k: torch.from_numpy(v) for k, v in texts(2000, seed=99).items()}
    with torch.no_grad():
        for _ in range(20):  # shift each class's bias until the classes come out about evenly
            share = torch.bincount(model(**t).argmax(1), minlength=CLASSES).float() / 2000
            model.head.bias.sub_(torch.log((share + 0.01) / (1.0 / CLASSES)))
    return model


def export(path: Path, model: nn.Module | None = None, output: str = "logits") -> Path:
    model = (model or balanced()).eval()
    ids = torch.randint(1, VOCAB, (2, 9))
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    axes = {n: {0: "batch", 1: "sequence"} for n in NAMES}
    torch.onnx.export(model, (ids, mask, types), str(path), dynamo=False, input_names=list(NAMES),
                      output_names=[output], dynamic_axes={**axes, output: {0: "batch"}}, opset_version=17)
    return path


def texts(n: int, length: int = 24, seed: int = 0, vocab: int = VOCAB) -> dict[str, np.ndarray]:
    """n token sequences padded to `length`: ids 1..vocab-1 then 0s, a mask of the real tokens, and
    token types 0 (first half of the real tokens) and 1 (the rest)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, length + 1, n)
    pos = np.arange(length)[None, :]
    mask = (pos < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, vocab, (n, length)) * mask
    types = ((pos >= lengths[:, None] // 2) & (mask == 1)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def save_texts(path: Path, n: int, **kw) -> Path:
    np.savez(path, **texts(n, **kw))
    return path
