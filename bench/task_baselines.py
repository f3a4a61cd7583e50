"""Plain baselines on bench/task_sets.py's sets: TF-IDF + logistic regression (scikit-learn), per set.

    python bench/task_sets.py && python bench/task_baselines.py       # -> bench/results/task_baselines.md

Every baseline fits on the set's train.csv, chooses what it chooses (the inverse regularisation C of
LogisticRegression among C_GRID; multi-label thresholds) on validation.csv, and is scored once on test.csv, the
same three files a budgetune run of the set trains, validates and tests on. Metrics come from sklearn.metrics.

* Features: TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2), fitted on the training texts only
  (both sides of the pairs).
* pairs: a pair (a, b) of vectors becomes [abs(a - b), a * b] (element-wise): what the sides share and where they
  differ, the features a linear model can use to tell "same topic" (the label depends on how the sides relate,
  which no weighting of a's and b's own words can express: [a, b], the two vectors side by side, is shown as
  the reference). Two kinds of vectors: the sparse TF-IDF itself (two headlines of one topic rarely share
  words, so a * b is mostly zero), and TF-IDF reduced by LSA (TruncatedSVD fitted on the training texts, unit
  length; its size among LSA_DIMS chosen on validation), where headlines of one topic point alike without
  sharing words. C chosen by macro-F1. Metrics: accuracy and macro-F1 (same_topic / different_topic).
* multilabel: one-vs-rest logistic regression over the topics (the JSON array label column read into a 0/1
  matrix by MultiLabelBinarizer), a label predicted where its probability is >= 0.5, and again with one threshold
  per label tuned on validation (the label's F1 over 0.05, 0.10, ..., 0.95). C chosen by micro-F1 at 0.5. A row
  may be predicted with no label. Metrics: micro-F1, macro-F1 and subset accuracy (the exact label set).
* skewed: multinomial logistic regression with class_weight None, and with class_weight="balanced" (n / (classes
  x count), what budgetune's --class_weights balanced computes). Each chooses its own C by macro-F1 on the
  (skewed) validation.csv; the test set is balanced. Metrics: accuracy and macro-F1.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import MultiLabelBinarizer, normalize

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data"
OUT = ROOT / "bench" / "results" / "task_baselines.md"
C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
LSA_DIMS = (50, 100, 300)
THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))
SPLITS = ("train", "validation", "test")


def read(folder: Path) -> dict[str, list[dict]]:
    out = {}
    for split in SPLITS:
        path = folder / f"{split}.csv"
        if not path.is_file():
            raise SystemExit(f"task_baselines.py: error: {path} is missing; run python bench/task_sets.py first")
        with open(path, encoding="utf-8", newline="") as f:
            out[split] = list(csv.DictReader(f))
    return out


def tfidf(texts: list[str]) -> TfidfVectorizer:
    return TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2).fit(texts)


def logistic(c: float, class_weight: str | None = None) -> LogisticRegression:
    return LogisticRegression(C=c, class_weight=class_weight, max_iter=3000)


def choose_c(make, x_train, y_train, x_val, y_val, score) -> tuple[float, object]:
    """(C, model fitted on train) with the best validation score (the smaller C on a tie)."""
    best = None
    for c in C_GRID:
        model = make(c).fit(x_train, y_train)
        s = score(y_val, model.predict(x_val))
        if best is None or s > best[0]:
            best = (s, c, model)
    return best[1], best[2]


def macro_f1(y, p) -> float:
    return f1_score(y, p, average="macro")


def micro_f1(y, p) -> float:
    return f1_score(y, p, average="micro")


def pair_features(a, b, kind: str):
    """[|a - b|, a * b] (element-wise), or [a, b] for kind "sides"; sparse or dense as a and b are."""
    if kind == "sides":
        return sp.hstack([a, b]).tocsr() if sp.issparse(a) else np.hstack([a, b])
    if sp.issparse(a):
        return sp.hstack([abs(a - b), a.multiply(b)]).tocsr()
    return np.hstack([np.abs(a - b), a * b])


def lsa(vec: TfidfVectorizer, data: dict[str, list[dict]], dims: int) -> dict:
    """{split: (a, b)}: each side's TF-IDF projected on the training texts' first `dims` singular vectors, unit
    length."""
    sides = {s: [vec.transform([r[k] for r in data[s]]) for k in ("text", "text_pair")] for s in SPLITS}
    svd = TruncatedSVD(dims, random_state=0).fit(sp.vstack(sides["train"]))
    return {s: [normalize(svd.transform(m)) for m in sides[s]] for s in SPLITS}


def pair_baseline(name: str, variants: dict, y: dict) -> dict:
    """Fit each variant ({label: {split: (a, b)}}, e.g. one per LSA size) over C_GRID; the best on validation is
    scored on test."""
    best = None
    for label, sides in variants.items():
        x = {s: pair_features(*sides[s], "sides" if "[a, b]" in name else "interaction") for s in SPLITS}
        c, model = choose_c(logistic, x["train"], y["train"], x["validation"], y["validation"], macro_f1)
        score = macro_f1(y["validation"], model.predict(x["validation"]))
        if best is None or score > best[0]:
            best = (score, label, c, model.predict(x["test"]))
    _, label, c, p = best
    return {"set": "pairs", "baseline": name.format(label), "C": c, "accuracy": accuracy_score(y["test"], p),
            "macro_f1": macro_f1(y["test"], p)}


def pairs(data: dict[str, list[dict]]) -> list[dict]:
    vec = tfidf([r[k] for r in data["train"] for k in ("text", "text_pair")])
    y = {s: np.array([r["label"] for r in data[s]]) for s in SPLITS}
    sparse = {"": {s: [vec.transform([r[k] for r in data[s]]) for k in ("text", "text_pair")] for s in SPLITS}}
    sizes = sorted({min(dims, len(vec.vocabulary_) - 1) for dims in LSA_DIMS})  # a small vocabulary caps them
    reduced = {dims: lsa(vec, data, dims) for dims in sizes}
    return [pair_baseline("TF-IDF [abs(a-b), a*b] + LR{}", sparse, y),
            pair_baseline("TF-IDF -> LSA {} dims, [abs(a-b), a*b] + LR", reduced, y),
            pair_baseline("TF-IDF [a, b] + LR{} (reference: no interaction)", sparse, y)]


def tune_thresholds(y: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """Per label, the threshold of THRESHOLDS with the best F1 on (y, prob) (the lowest on a tie)."""
    return np.array([max(THRESHOLDS, key=lambda t, j=j: (f1_score(y[:, j], prob[:, j] >= t, zero_division=0), -t))
                     for j in range(y.shape[1])])


def multilabel_scores(y: np.ndarray, p: np.ndarray) -> dict:
    return {"micro_f1": f1_score(y, p, average="micro", zero_division=0),
            "macro_f1": f1_score(y, p, average="macro", zero_division=0), "subset_accuracy": accuracy_score(y, p)}


def multilabel(data: dict[str, list[dict]], names: list[str]) -> list[dict]:
    vec = tfidf([r["text"] for r in data["train"]])
    binarizer = MultiLabelBinarizer(classes=names)
    y = {s: binarizer.fit_transform([json.loads(r["label"]) for r in data[s]]) for s in SPLITS}
    x = {s: vec.transform([r["text"] for r in data[s]]) for s in SPLITS}
    c, model = choose_c(lambda c: OneVsRestClassifier(logistic(c)), x["train"], y["train"], x["validation"],
                        y["validation"], micro_f1)
    prob = {s: model.predict_proba(x[s]) for s in ("validation", "test")}
    thresholds = tune_thresholds(y["validation"], prob["validation"])
    tuned = ", ".join(f"{n} {t:.2f}" for n, t in zip(names, thresholds))
    return [{"set": "multilabel", "baseline": "TF-IDF + one-vs-rest LR, threshold 0.5", "C": c,
             **multilabel_scores(y["test"], (prob["test"] >= 0.5).astype(int))},
            {"set": "multilabel", "baseline": f"... thresholds tuned on validation ({tuned})", "C": c,
             **multilabel_scores(y["test"], (prob["test"] >= thresholds).astype(int))}]


def skewed(data: dict[str, list[dict]]) -> list[dict]:
    vec = tfidf([r["text"] for r in data["train"]])
    x = {s: vec.transform([r["text"] for r in data[s]]) for s in SPLITS}
    y = {s: np.array([r["label"] for r in data[s]]) for s in SPLITS}
    out = []
    for weight in (None, "balanced"):
        c, model = choose_c(lambda c, w=weight: logistic(c, w), x["train"], y["train"], x["validation"],
                            y["validation"], macro_f1)
        p = model.predict(x["test"])
        per_class = f1_score(y["test"], p, average=None, labels=model.classes_)
        out.append({"set": "skewed", "baseline": f"TF-IDF + LR, class_weight={weight}", "C": c,
                    "accuracy": accuracy_score(y["test"], p), "macro_f1": macro_f1(y["test"], p),
                    "per_class_f1": dict(zip(model.classes_.tolist(), per_class.tolist()))})
    return out


def machine() -> str:
    """The CPU, its cores and the matrix instructions it reports (AVX512-BF16, VNNI, AMX), and the library."""
    import os

    import sklearn

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = info.splitlines()
    model = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), platform.processor())
    flags = set(next((x.split(":", 1)[1].split() for x in lines if x.startswith("flags")), []))
    has = [name for name, flag in (("AVX512-BF16", "avx512_bf16"), ("VNNI", "avx512_vnni"), ("AMX", "amx_bf16"))
           if flag in flags]
    lacks = [name for name, flag in (("AMX", "amx_bf16"),) if flag not in flags]
    return (f"{model} ({', '.join(has) or 'no AVX512-BF16/VNNI'}{', no ' + ', '.join(lacks) if lacks else ''}), "
            f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; Python {platform.python_version()}, scikit-learn "
            f"{sklearn.__version__}")


def table(rows: list[dict]) -> str:
    cols = ("accuracy", "macro_f1", "micro_f1", "subset_accuracy")
    lines = ["| set | baseline | C | " + " | ".join(cols) + " |", "|---|---|---:|" + "---:|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.4f}" if c in r else "" for c in cols]
        lines.append(f"| {r['set']} | {r['baseline']} | {r['C']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def set_sizes(manifest: dict, names: list[str]) -> str:
    out = []
    for name in names:
        parts = [f"{split} {v['rows']}" for split, v in manifest["sets"][name].items()]
        out.append(f"* {name}: " + ", ".join(parts) + " rows; labels in train: "
                   + ", ".join(f"{k} {n}" for k, n in manifest["sets"][name]["train"]["labels"].items()))
    return "\n".join(out)


def report(rows: list[dict], manifest: dict, names: list[str], argv: list[str], seconds: float) -> str:
    a = manifest["arguments"]
    command = " ".join(["python bench/task_baselines.py", *argv]).strip()
    per_class = [f"* {r['baseline']}: " + ", ".join(f"{k} {v:.4f}" for k, v in r["per_class_f1"].items())
                 for r in rows if "per_class_f1" in r]
    return f"""# Plain baselines on the issue-24 sets (TF-IDF + logistic regression)

Data, built by `{manifest.get('command', 'python bench/task_sets.py')}` (seed {manifest['seed']}):

* source: the {manifest['rows_read']} distinct rows of `{manifest['source']}` (AG News), split by topic into a
  train pool of {manifest['pools']['train']} rows and a disjoint test pool of {manifest['pools']['test']} (test
  fraction {a['test_fraction']});
* per set: train {a['train_size']}, validation {a['validation_size']}, test {a['test_size']} rows;
* multi-label: {a['single_fraction']:g} of the rows hold one headline;
* skewed: {a['full_class']} whole, the other topics at {a['skew_fraction']:g} of its count; test balanced.

Then:

    {command}

Each baseline fits on train.csv, chooses C (and LSA's size, multi-label thresholds) on validation.csv and is
scored once on test.csv: every figure below is on the test split. The docstrings of bench/task_sets.py and
bench/task_baselines.py say how the sets and the features are made.

{table(rows)}

Per-topic F1 on the balanced skewed test set:

{chr(10).join(per_class)}

Rows:

{set_sizes(manifest, names)}

Machine: {machine()}; all {len(rows)} baselines in {seconds:.0f} s.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA), help="bench/task_sets.py's output folder (default: bench/data)")
    p.add_argument("--out", default=str(OUT), help="the report (default: bench/results/task_baselines.md)")
    p.add_argument("--sets", type=lambda s: s.split(","), default=["pairs", "multilabel", "skewed"],
                   help="which sets, comma-separated (default: pairs,multilabel,skewed)")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    manifest_path = Path(a.data) / "manifest.json"
    if not manifest_path.is_file():
        p.error(f"{manifest_path} is missing; run python bench/task_sets.py first")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    unknown = [s for s in a.sets if s not in manifest["sets"]]
    if unknown:
        p.error(f"--sets: {unknown} not in {manifest_path} (it has {', '.join(manifest['sets'])})")
    start, rows = time.perf_counter(), []
    for name in a.sets:
        data = read(Path(a.data) / name)
        rows += pairs(data) if name == "pairs" else skewed(data) if name == "skewed" else \
            multilabel(data, manifest["label_names"])
    text = report(rows, manifest, a.sets, argv, time.perf_counter() - start)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text, encoding="utf-8")
    print(table(rows))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
