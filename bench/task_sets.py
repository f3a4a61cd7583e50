"""Measurement sets for issue 24 (pairs, multi-label, class skew), built from AG News's real headlines.

    python bench/task_sets.py                                    # -> bench/data/{pairs,multilabel,skewed}/
    python bench/task_sets.py --train-size 8000 --test-size 4000 --seed 1 --out /tmp/sets

No pair or multi-label corpus can be had offline, so these are built from real text whose topic is known. Every
row of the sets is a real AG News row ("Title Description", as in the source file) and every label follows from
the rows' own AG topics; nothing is paraphrased or generated.

How (fixed seed, --seed, default 0; the same arguments write byte-identical files):

1. The source (`--source`, default ../shared/data/ag_news/train.csv, columns `label,text`; integer labels are
   named by --label-names, default World,Sports,Business,Sci/Tech) is read, blank texts dropped and exact
   duplicate texts kept once. The rows are then split, stratified by topic, into two disjoint pools: a train
   pool and a test pool (--test-fraction, 0.3). Every train.csv and validation.csv row is drawn from the train
   pool, every test.csv row from the test pool, so no headline appears on both sides of any set.
2. Each set draws from its own copy of the pools with its own generator (seeded by --seed and the set's name),
   so the sets do not depend on each other's sizes. Within a set no headline is used twice (train, validation
   and test rows together); across sets a headline may recur.
3. Each set is written as train.csv (--train-size rows, 4,000), validation.csv (--validation-size, 500: the rows
   that choose the model and, for the baseline, C and the thresholds; budgetune reads a folder's validation.csv
   instead of carving its own) and test.csv (--test-size, 2,000: reported only).

The sets:

* pairs/ (columns text,text_pair,label): two different headlines, label `same_topic` or `different_topic`,
  half each (an odd count gives `different_topic` the extra row). Same-topic pairs spread evenly over the four
  topics, different-topic pairs evenly over the twelve ordered topic pairs (whole rounds, then a random few
  for the rest); so every topic appears about equally often on either side and neither side alone says
  anything about the label.
* multilabel/ (columns text,label): the label is a JSON array of topic names in label order, e.g.
  ["World","Business"]. A --single-fraction (0.25) of the rows hold one headline (one label); the rest join two
  headlines drawn at random from the pool, so the topics mix naturally: about a quarter of these pairs share
  their topic (one label), the others have two. One-label rows are thus not only same-topic pairs (with the
  default, 25 % single headlines + ~19 % same-topic pairs + ~56 % two-topic pairs). The two headlines are
  joined with a single space, the way AG News itself joins a title to its description: no separator token
  marks where the second headline starts (a distinctive one, e.g. " || ", would tell the model a row holds two
  headlines). Length still hints at it (a joined row is about twice as long as one headline), and that hint
  is honest information, not a label leak: a two-headline row has one label a quarter of the time.
* skewed/ (columns text,label): single-label AG News where --full-class (Business) keeps its rows and the three
  other topics are cut to --skew-fraction (5 %) of that count: of 4,000 training rows, 3,478 Business and 174
  of each other topic (validation.csv is skewed the same way, as a split carved from the training data would
  be). test.csv is balanced (test-size / 4 rows per topic), so accuracy there is the mean per-topic recall and a
  model that only ever answers the full class scores 25 %. Business stays full because Business and Sci/Tech are
  AG News's most confused pair: a rare Sci/Tech under a full Business is the case class weights are meant for.

No regression set: AG News carries a topic and nothing else, and a number derived from it (a text's length, a
topic's probability) would be a fabricated or trivial target, so none is built.

bench/data/ is gitignored: the sets are rebuilt from the shared data, never committed. Beside the sets,
manifest.json records the arguments, the pools' sizes and each file's rows and label counts.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "ag_news" / "train.csv"
OUT = ROOT / "bench" / "data"
AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
SAME, DIFFERENT = "same_topic", "different_topic"
SETS = ("pairs", "multilabel", "skewed")
SPLITS = ("train", "validation", "test")


class SetError(ValueError):
    """Bad input or sizes the pools cannot fill; the message names the file, column or option."""


def read_source(path: Path, text_column: str, label_column: str,
                label_names: list[str] | None) -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, label ids, label names): blank texts dropped, each exact duplicate text kept once (its first row)."""
    if not path.is_file():
        raise SetError(f"--source {path}: no such file")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
            if column not in (reader.fieldnames or []):
                raise SetError(f"{path}: no column {column!r} ({flag}); the header is {reader.fieldnames}")
        texts, raw, seen = [], [], set()
        for row in reader:
            text = (row[text_column] or "").strip()
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
                raw.append((row[label_column] or "").strip())
    if all(r.lstrip("-").isdigit() for r in raw):
        names = label_names or AG_NEWS_LABELS
        ids = np.array([int(r) for r in raw], dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(names)):
            raise SetError(f"{path}: integer labels run {ids.min()}..{ids.max()} but --label-names names "
                           f"{len(names)} topics")
    else:
        names = label_names or sorted(set(raw))
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise SetError(f"{path}: labels {unknown[:5]} are not in --label-names {names}")
        ids = np.array([names.index(r) for r in raw], dtype=np.int64)
    if len(set(ids.tolist())) < 2:
        raise SetError(f"{path}: needs at least two topics in column {label_column!r}")
    return texts, ids, names


def split_pools(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train pool, test pool) row indices, stratified by label: each topic gives round(n x fraction)."""
    rng = np.random.default_rng([seed, 0])
    train, test = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(rows) * test_fraction))
        test.append(rows[:k])
        train.append(rows[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class Pool:
    """One pool's rows for one set: per-topic queues in a seeded random order, each row handed out once."""

    def __init__(self, name: str, rows: np.ndarray, texts: list[str], labels: np.ndarray,
                 rng: np.random.Generator):
        self.name, self.texts, self.labels = name, texts, labels
        self.order = list(rng.permutation(rows))  # any topic, for draws at the natural topic mix
        self.queues = {int(c): [r for r in self.order if labels[r] == c] for c in np.unique(labels)}
        self.used: set[int] = set()

    def take(self, topic: int | None = None) -> int:
        """A row of `topic` (None: the next row of any topic), never handed out before."""
        queue = self.order if topic is None else self.queues.get(topic, [])
        while queue and queue[-1] in self.used:
            queue.pop()
        if not queue:
            what = "rows" if topic is None else f"rows of topic {topic}"
            raise SetError(f"the {self.name} pool has run out of {what}: lower --train-size/--validation-size/"
                           f"--test-size, or change --test-fraction")
        row = int(queue.pop())
        self.used.add(row)
        return row


def spread(items: list, n: int, rng: np.random.Generator) -> list:
    """n items: whole rounds of `items`, then a random few of them for what is left; in a random order."""
    return [items[i] for i in rng.permutation(np.resize(rng.permutation(len(items)), n))]


def pairs_rows(pool: Pool, n: int, names: list[str], rng: np.random.Generator) -> list[dict]:
    """n pairs, n // 2 of one topic (spread over the topics) and the rest of two (spread over the ordered topic
    pairs, so each topic is as common on either side as in the other)."""
    k = len(names)
    topics = [(c, c) for c in spread(list(range(k)), n // 2, rng)]
    topics += spread([(a, b) for a in range(k) for b in range(k) if a != b], n - n // 2, rng)
    rows = []
    for i in rng.permutation(len(topics)):
        a, b = topics[i]
        ra, rb = pool.take(a), pool.take(b)
        rows.append({"text": pool.texts[ra], "text_pair": pool.texts[rb], "label": SAME if a == b else DIFFERENT})
    return rows


def multilabel_rows(pool: Pool, n: int, single_fraction: float, names: list[str],
                    rng: np.random.Generator) -> list[dict]:
    """n rows: round(n x single_fraction) single headlines, the rest two random headlines joined by a space."""
    singles = set(rng.permutation(n)[: int(round(n * single_fraction))].tolist())
    rows = []
    for i in range(n):
        parts = [pool.take()] if i in singles else [pool.take(), pool.take()]
        topics = sorted({int(pool.labels[r]) for r in parts})
        rows.append({"text": " ".join(pool.texts[r] for r in parts),
                     "label": json.dumps([names[c] for c in topics])})
    return rows


def skew_counts(n: int, k: int, full: int, fraction: float) -> dict[int, int]:
    """Rows per topic: the full topic round(n / (1 + (k-1) x fraction)), every other topic `fraction` of that."""
    n_full = int(round(n / (1 + (k - 1) * fraction)))
    return {c: n_full if c == full else int(round(n_full * fraction)) for c in range(k)}


def single_rows(pool: Pool, counts: dict[int, int], names: list[str], rng: np.random.Generator) -> list[dict]:
    topics = [c for c, m in counts.items() for _ in range(m)]
    return [{"text": pool.texts[r], "label": names[int(pool.labels[r])]}
            for r in (pool.take(topics[i]) for i in rng.permutation(len(topics)))]


def build_set(name: str, a: argparse.Namespace, texts: list[str], labels: np.ndarray, names: list[str],
              pools: tuple[np.ndarray, np.ndarray]) -> dict[str, list[dict]]:
    """{split: rows} of one set; its generator is seeded by --seed and the set's name."""
    rng = np.random.default_rng([a.seed, zlib.crc32(name.encode())])
    train_pool, test_pool = (Pool(split, rows, texts, labels, rng) for split, rows in zip(("train", "test"), pools))
    sizes = {"train": a.train_size, "validation": a.validation_size, "test": a.test_size}
    out = {}
    for split in SPLITS:
        pool, n = (test_pool if split == "test" else train_pool), sizes[split]
        if name == "pairs":
            out[split] = pairs_rows(pool, n, names, rng)
        elif name == "multilabel":
            out[split] = multilabel_rows(pool, n, a.single_fraction, names, rng)
        elif split == "test":  # skewed: a balanced test set
            out[split] = single_rows(pool, {c: n // len(names) for c in range(len(names))}, names, rng)
        else:
            full = names.index(a.full_class)
            out[split] = single_rows(pool, skew_counts(n, len(names), full, a.skew_fraction), names, rng)
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["text", "label"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def label_counts(rows: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(r["label"] for r in rows).items()))


def build(a: argparse.Namespace) -> dict:
    """Write every set under a.out and return the manifest (also written there as manifest.json)."""
    texts, labels, names = read_source(Path(a.source), a.text_column, a.label_column, a.label_names)
    if a.full_class not in names:
        raise SetError(f"--full-class {a.full_class!r} is not one of the topics {names}")
    pools = split_pools(labels, a.test_fraction, a.seed)
    manifest = {"command": getattr(a, "command", None), "source": str(a.source), "seed": a.seed, "label_names": names, "rows_read": len(texts),
                "pools": {"train": len(pools[0]), "test": len(pools[1])},
                "arguments": {k: v for k, v in vars(a).items() if k not in ("source", "out", "command")}, "sets": {}}
    out = Path(a.out)
    for name in a.sets:
        splits = build_set(name, a, texts, labels, names, pools)
        for split, rows in splits.items():
            write_csv(out / name / f"{split}.csv", rows)
        manifest["sets"][name] = {split: {"rows": len(rows), "labels": label_counts(rows)}
                                  for split, rows in splits.items()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=str(SOURCE), help="labelled CSV to draw from (default: %(default)s)")
    p.add_argument("--text-column", default="text", help="its text column (default: %(default)s)")
    p.add_argument("--label-column", default="label", help="its label column (default: %(default)s)")
    p.add_argument("--label-names", type=lambda s: s.split(","), default=None,
                   help="topic names in label order, comma-separated (default for integer labels: "
                        + ",".join(AG_NEWS_LABELS) + "; for names: sorted)")
    p.add_argument("--out", default=str(OUT), help="output folder, one subfolder per set (default: bench/data)")
    p.add_argument("--sets", type=lambda s: s.split(","), default=list(SETS),
                   help="which sets, comma-separated (default: " + ",".join(SETS) + ")")
    p.add_argument("--seed", type=int, default=0, help="seed of the pools and of every draw (default: 0)")
    p.add_argument("--test-fraction", type=float, default=0.3,
                   help="share of each topic's rows in the test pool (default: 0.3)")
    p.add_argument("--train-size", type=int, default=4000, help="train.csv rows per set (default: 4000)")
    p.add_argument("--validation-size", type=int, default=500, help="validation.csv rows per set (default: 500)")
    p.add_argument("--test-size", type=int, default=2000, help="test.csv rows per set (default: 2000)")
    p.add_argument("--single-fraction", type=float, default=0.25,
                   help="multilabel: share of rows holding one headline (default: 0.25)")
    p.add_argument("--full-class", default="Business", help="skewed: the topic kept whole (default: Business)")
    p.add_argument("--skew-fraction", type=float, default=0.05,
                   help="skewed: every other topic's rows as a share of the full topic's (default: 0.05)")
    return p


def check(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for flag, value in (("--test-fraction", a.test_fraction), ("--single-fraction", a.single_fraction),
                        ("--skew-fraction", a.skew_fraction)):
        if not 0 <= value <= 1:
            p.error(f"{flag} must be between 0 and 1, got {value}")
    for flag, value in (("--train-size", a.train_size), ("--validation-size", a.validation_size),
                        ("--test-size", a.test_size)):
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    unknown = [s for s in a.sets if s not in SETS]
    if unknown:
        p.error(f"--sets: unknown {unknown}; choose from {', '.join(SETS)}")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    check(p, a)
    a.command = " ".join(["python bench/task_sets.py", *argv])
    try:
        manifest = build(a)
    except SetError as e:
        p.error(str(e))
    for name, splits in manifest["sets"].items():
        print(f"{name}: " + ", ".join(f"{s} {v['rows']}" for s, v in splits.items()) + f" rows -> {a.out}/{name}/")
    print(f"pools: train {manifest['pools']['train']}, test {manifest['pools']['test']} of "
          f"{manifest['rows_read']} distinct rows of {a.source}; seed {a.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
