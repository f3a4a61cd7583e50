"""--cuda_graphs (issue 13, item 4) on CPU: the captured-step code path run on graph_tape's stand-in for CUDA graphs,
which replays only the recorded tensor operators (as a CUDA graph does) and fails a capture that reads a value back
to the host (as CUDA does). A GPU measures the speed; these tests pin down that the captured step trains the same
model as the eager one."""

from __future__ import annotations

import shutil
from pathlib import Path

import graph_tape
import pytest
import torch
from conftest import headline_rows, read_jsonl, tiny_train_args, write_csv

from budgetune.config import resolve
from budgetune.errors import ConfigError
from budgetune.training import graphs
from budgetune.training.train import train


@pytest.fixture(scope="module")
def short_csv(tmp_path_factory) -> Path:
    """Headlines cut to 2-13 words: lengths vary (whole headlines all reach max_seq_length with the tiny BPE)."""
    rows = [(label, " ".join(text.split()[: 2 + i % 12])) for i, (label, text) in enumerate(headline_rows())]
    return write_csv(tmp_path_factory.mktemp("graphs") / "short.csv", ["label", "text"], rows)


def graph_args(tiny_roberta: Path, data: Path, out: Path, method: str, **extra) -> list[str]:
    flags = {"pad_to_buckets": 3, "cuda_graphs": "true", "max_seq_length": 32, "num_train_epochs": 2,
             "per_device_train_batch_size": 20, **extra}  # 432 training rows: each epoch ends on a short batch
    return tiny_train_args(tiny_roberta, data, out, method, **flags)[1:]


def train_with(backend, monkeypatch, args: list[str]) -> dict:
    monkeypatch.setattr(graphs, "BACKEND", backend)
    return train(resolve(None, args))


def events(out: Path, kind: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "samples_per_second")}
            for r in read_jsonl(out / "metrics.jsonl") if r["event"] == kind]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_captured_steps_train_exactly_as_eager_ones(tiny_roberta, short_csv, tmp_path, monkeypatch, capsys, method):
    """Same losses, grad norms, learning rates, validation and AdaLoRA rank patterns, to the bit, with the step
    replayed from graphs (one per bucket) as with it run eagerly (the CPU fallback, same fused AdamW)."""
    eager_out, graph_out = tmp_path / "eager", tmp_path / "graphs"
    train_with(graphs.CudaBackend(), monkeypatch, graph_args(tiny_roberta, short_csv, eager_out, method))
    assert "--cuda_graphs: no CUDA device (training on cpu); training eagerly" in capsys.readouterr().out
    tape = graph_tape.TapeBackend()
    train_with(tape, monkeypatch, graph_args(tiny_roberta, short_csv, graph_out, method))
    out = capsys.readouterr().out
    assert "eager" not in out and f"--cuda_graphs: {len(tape.graphs)} batch shape(s) captured, 0 failed" in out, out[-2000:]
    replays = sum(g.replays for g in tape.graphs)
    steps = events(graph_out, "train")[-1]["step"]
    assert events(graph_out, "graphs") == [{"event": "graphs", "step": steps, "captured": len(tape.graphs),
                                            "failed": 0, "replays": replays}]
    print(f"{len(tape.graphs)} graphs, {replays} of {steps} steps replayed")
    assert 1 < len(tape.graphs) <= 3  # one per bucket seen with a full batch
    assert steps - 2 <= replays < steps  # each epoch's short last batch steps eagerly
    for kind in ("train", "eval", "ranks"):
        assert events(graph_out, kind) == events(eager_out, kind), kind
    assert events(graph_out, "train")[0]["learning_rate"] != events(graph_out, "train")[-1]["learning_rate"]
    if method == "adalora":
        assert events(graph_out, "ranks")[-1]["ranks"] != events(graph_out, "ranks")[0]["ranks"]  # it pruned


@pytest.mark.slow
def test_a_resumed_captured_run_continues_exactly(tiny_roberta, short_csv, tmp_path, monkeypatch, capsys):
    """Killed after a mid-run checkpoint and resumed (new graphs, the optimizer's tensor learning rate restored):
    the same events as the run that was never stopped."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = graph_args(tiny_roberta, short_csv, whole, "adalora", save_steps=10, save_total_limit=100)
    train_with(graph_tape.TapeBackend(), monkeypatch, args)
    shutil.copytree(whole, resumed)
    tape = graph_tape.TapeBackend()
    train_with(tape, monkeypatch,
               graph_args(tiny_roberta, short_csv, resumed, "adalora", save_steps=10, save_total_limit=100,
                          resume_from_checkpoint=str(resumed / "checkpoints" / "step-000030")))
    assert "at step 30 (epoch 1, batch 8)" in capsys.readouterr().out
    assert sum(g.replays for g in tape.graphs) >= 12  # the 14 steps after it, but for the epoch's short batch
    for kind in ("train", "eval", "ranks"):
        assert events(resumed, kind) == events(whole, kind), kind


class HostRead(torch.nn.Module):
    """A step that reads a value back to the host, which a CUDA capture refuses."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, input_ids, labels):
        logits = self.linear(input_ids.float())
        if logits.sum() > 0:  # bool(tensor): a host read
            logits = logits * 2
        return type("Out", (), {"loss": torch.nn.functional.cross_entropy(logits, labels)})()


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 2)
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, input_ids, labels):
        logits = self.linear(self.drop(input_ids.float()))
        return type("Out", (), {"loss": torch.nn.functional.cross_entropy(logits, labels)})()


def toy_steps(n: int, graphed: bool, reload_at: int | None = None) -> tuple[torch.Tensor, int]:
    """n steps of Toy (dropout, a decaying learning rate); optimizer state reloaded from itself before step
    `reload_at` (as a resume does: new state and learning-rate tensors). (weights, graphs captured)."""
    model, tape = Toy(), graph_tape.TapeBackend()
    optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.1), fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.8 ** s)
    step = graphs.StepGraphs(model, optimizer, 1.0, full_batch=4, backend=tape)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(2)
    for i in range(n):
        if i == reload_at:
            optimizer.load_state_dict(optimizer.state_dict())
        batch = {"input_ids": torch.randint(0, 5, (4, 4), generator=g), "labels": torch.randint(0, 2, (4,), generator=g)}
        if not graphed or step.step(batch) is None:
            step.body(batch)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return model.linear.weight.detach().clone(), len(tape.graphs)


def test_graphs_are_captured_anew_when_the_optimizer_state_is_replaced():
    """A graph reads the learning rate and AdamW's moments in place: after load_state_dict (a resume) it would
    read the old, freed tensors. StepGraphs notices and captures again; the weights stay the eager ones."""
    eager, _ = toy_steps(6, graphed=False)
    graphed, captured = toy_steps(6, graphed=True)
    assert torch.equal(graphed, eager) and captured == 1
    reloaded, captured = toy_steps(6, graphed=True, reload_at=3)
    assert captured == 2 and torch.equal(reloaded, eager)


def test_a_shape_whose_capture_fails_steps_eagerly_saying_why():
    model, said = HostRead(), []
    optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.1), fused=True)
    before = [p.detach().clone() for p in model.parameters()]
    step = graphs.StepGraphs(model, optimizer, 1.0, full_batch=4, say=said.append, backend=graph_tape.TapeBackend())
    batch = {"input_ids": torch.ones(4, 4, dtype=torch.long), "labels": torch.zeros(4, dtype=torch.long)}
    assert step.step(batch) is None and step.step(batch) is None  # tried once per shape
    assert len(said) == 1 and "train eagerly: capture failed" in said[0] and "(4, 4)" in said[0], said
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # warm-up steps undone
    assert not optimizer.state or all(float(s["step"]) == 0 for s in optimizer.state.values())


@pytest.mark.parametrize("read", [lambda x: x.sum().item(), lambda x: bool(x.sum() > 0), lambda x: x.nonzero(),
                                  lambda x: x[x > 0], lambda x: x.unique()])
def test_the_tape_refuses_what_a_cuda_capture_refuses(read):
    graph = graph_tape.TapeGraph()
    with pytest.raises(RuntimeError, match="reads a value back to the host"):
        with graph_tape.TapeBackend().capture(graph):
            read(torch.arange(-2.0, 3.0))


def test_the_tape_replays_only_tensor_operators():
    """What makes the tape a fair stand-in: a learning rate passed as a float is baked into the capture (a replay
    keeps stepping with it after the scheduler lowered it), a tensor one is read at every replay. (The first step
    is eager, as graphs.StepGraphs warms up: AdamW creates its state lazily, and a capture of that creation would
    zero the moments at every replay.)"""

    def final_weights(lr) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)
        x = torch.ones(2, 3)
        model(x).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        graph = graph_tape.TapeGraph()
        with graph_tape.Recorder(graph.ops):
            model(x).sum().backward()
            optimizer.step()
        scheduler.step()
        for _ in range(3):
            graph.replay()
            scheduler.step()
        return model.weight.detach().clone()

    def eager_weights() -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.1), fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)
        for _ in range(5):
            optimizer.zero_grad()
            model(torch.ones(2, 3)).sum().backward()
            optimizer.step()
            scheduler.step()
        return model.weight.detach().clone()

    assert torch.equal(final_weights(torch.tensor(0.1)), eager_weights())
    assert not torch.allclose(final_weights(0.1), eager_weights())


def test_cuda_graphs_needs_buckets_and_names_the_option(tiny_roberta, short_csv, tmp_path):
    with pytest.raises(ConfigError, match="--cuda_graphs true needs --pad_to_buckets"):
        resolve(None, graph_args(tiny_roberta, short_csv, tmp_path / "x", "lora", pad_to_buckets=0))


def test_fallback_reasons_name_what_stops_capture(tiny_roberta, short_csv, tmp_path):
    class Acc:
        device, num_processes, mixed_precision = torch.device("cuda"), 1, "bf16"

    def why(custom_loss=False, acc=None, **extra):
        return graphs.unsupported(resolve(None, graph_args(tiny_roberta, short_csv, tmp_path, "lora", **extra)),
                                  acc or Acc(), custom_loss)

    assert why() is None
    assert "accumulation" in why(gradient_accumulation_steps=2)
    assert "custom training loss" in why(custom_loss=True)
    assert "--torch_compile" in why(torch_compile="true")
    assert why(optim="adafactor") == "--optim adafactor is not captured (AdamW only)"
    assert why(optim="adamw_torch_fused", lr_scheduler_type="cosine") is None
    assert "greedy" in why(lr_scheduler_type="greedy")
    fp16, ddp = Acc(), Acc()
    fp16.mixed_precision, ddp.num_processes = "fp16", 2
    assert "fp16" in why(acc=fp16) and "2 processes" in why(acc=ddp)
