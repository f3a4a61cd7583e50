"""`budgetune serve` on loopback against offline `budgetune predict`, same adapter, same texts, one run.

For 1, 8 and 64 concurrent clients (each sends one text per request, waits for the answer, sends the next):
texts/s and p50/p99 latency, with dynamic batching and without it (--no_dynamic_batching), beside the offline
throughput of predict's own path (load_for_inference + table_logits) over the same texts. Bounded: each level
stops after --requests answers or --seconds, whichever comes first.

    flock /tmp/budgetune-measure.lock python bench/serve.py                      # packaged MiniLM, a short adapter
    python bench/serve.py --run runs/x --texts 512 --clients 1,8,64 --requests 512

Without --run it trains the default adapter (packaged MiniLM, LoRA, built-in headlines) for --train_steps steps
into --workdir first: throughput does not depend on how well it learnt.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
AG_NEWS = ROOT.parent / "shared" / "data" / "ag_news" / "train.csv"


def texts(n: int, path: Path) -> list[str]:
    """The first n texts of a CSV with a text column (AG News: real lengths), else the built-in headlines, repeated."""
    from budgetune.data.readers import builtin_path

    path = path if path.is_file() else builtin_path()
    with open(path, encoding="utf-8") as f:
        rows = [r["text"] for r in csv.DictReader(f)][:n]
    return (rows * (n // len(rows) + 1))[:n]


def train_adapter(workdir: Path, steps: int) -> Path:
    run = workdir / "serve-bench-run"
    if not (run / "adapter" / "budgetune.json").is_file():
        subprocess.run([sys.executable, "-m", "budgetune", "train", "--output_dir", str(run), "--max_steps",
                        str(steps), "--overwrite_output_dir", "true"], check=True, cwd=ROOT)
    return run


def offline(run: Path, sample: list[str], repeats: int, precision: str = "auto") -> float:
    """Texts/s of predict's path (model loading excluded) in `precision`, best of `repeats`."""
    from budgetune.cli.quiet import library_output
    from budgetune.data.readers import TextTable
    from budgetune.hardware.devices import release_accelerator
    from budgetune.inference.loading import load_for_inference
    from budgetune.inference.runner import table_logits

    release_accelerator()
    with library_output(verbose=False):  # as `budgetune predict` loads it: no library load reports or warnings
        accelerator, model, tokenizer, info = load_for_inference(run, precision=precision)
    table = TextTable(sample, None, None, "bench")
    table_logits(model, tokenizer, TextTable(sample[:64], None, None, "warm"), accelerator, 256,
                 info["max_seq_length"])
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        table_logits(model, tokenizer, table, accelerator, 256, info["max_seq_length"])
        best = max(best, len(sample) / (time.perf_counter() - t))
    return best


def start(run: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "budgetune", "serve", str(run), "--port", "0",
                             "--max_texts", "256", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    m = re.search(r"(http://[\d.]+:\d+)/", proc.stdout.readline())
    if m is None:
        proc.kill()
        raise SystemExit("server did not start")
    import httpx

    with httpx.Client(base_url=m.group(1)) as c:
        while c.get("/health").status_code != 200:
            time.sleep(0.1)
    return proc, m.group(1)


def load(url: str, sample: list[str], clients: int, requests: int, seconds: float) -> dict:
    """Closed-loop clients, one text per request; texts/s over the whole level, latency percentiles in ms."""
    import httpx

    latencies: list[float] = []
    lock, counter = threading.Lock(), iter(range(requests))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t = time.perf_counter()
                r = c.post("/v1/classify", json={"texts": [sample[i % len(sample)]]})
                r.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - t)

    with httpx.Client(base_url=url, timeout=60) as c:  # warm-up
        for t in sample[:16]:
            c.post("/v1/classify", json={"texts": [t]}).raise_for_status()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    deadline = t0 + seconds
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if not latencies:
        raise SystemExit(f"no answers at {clients} clients within {seconds} s")
    ms = np.asarray(latencies) * 1000
    return {"n": len(ms), "texts_s": len(ms) / wall, "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run folder (default: train a short default adapter into --workdir)")
    p.add_argument("--workdir", default="/work/measure/serve")
    p.add_argument("--texts_file", type=Path, default=AG_NEWS, help="CSV with a text column (default: AG News in "
                   "../shared; the built-in headlines when it is absent)")
    p.add_argument("--train_steps", type=int, default=20)
    p.add_argument("--texts", type=int, default=1024, help="texts for the offline pass and the requests")
    p.add_argument("--clients", default="1,8,64")
    p.add_argument("--requests", type=int, default=1024, help="answers per level, at most")
    p.add_argument("--seconds", type=float, default=60, help="time per level, at most")
    p.add_argument("--repeats", type=int, default=2, help="offline passes (best kept)")
    p.add_argument("--precisions", default="auto", help="the servers' --precision, comma-separated (e.g. "
                   "fp32,int8): one dynamic-batching server and one offline pass each, side by side")
    p.add_argument("--no_batching", default="true", choices=("true", "false"),
                   help="also run a server without dynamic batching (in the first precision)")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = Path(a.run) if a.run else train_adapter(Path(a.workdir), a.train_steps)
    sample = texts(a.texts, a.texts_file)
    levels = [int(c) for c in a.clients.split(",")]
    precisions = a.precisions.split(",")
    off = {pr: offline(run, sample, a.repeats, pr) for pr in precisions}
    servers = [(f"dynamic batching, {pr}", ["--precision", pr], pr) for pr in precisions]
    if a.no_batching == "true":
        servers.append((f"no batching, {precisions[0]}", ["--no_dynamic_batching", "--precision", precisions[0]],
                        precisions[0]))
    results = {}
    for label, extra, _ in servers:
        proc, url = start(run, extra)
        try:
            results[label] = {c: load(url, sample, c, a.requests, a.seconds) for c in levels}
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"run {run}, {len(sample)} texts (from {a.texts_file if a.texts_file.is_file() else 'the built-in headlines'}), "
          f"{os.cpu_count()} CPUs")
    for pr, rate in off.items():
        print(f"offline (predict's path, --precision {pr}, best of {a.repeats}): {rate:.1f} texts/s")
    print(f"| clients | server | answers | texts/s | x {servers[0][0]} | vs offline (same precision) | p50 ms | p99 ms |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in levels:
        first = results[servers[0][0]][c]["texts_s"]
        for label, _, pr in servers:
            r = results[label][c]
            print(f"| {c} | {label} | {r['n']} | {r['texts_s']:.1f} | {r['texts_s'] / first:.2f} | "
                  f"{100 * r['texts_s'] / off[pr]:.0f} % | {r['p50']:.1f} | {r['p99']:.1f} |")


if __name__ == "__main__":
    main()
