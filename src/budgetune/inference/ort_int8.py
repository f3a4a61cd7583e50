"""`--precision int8` through onnxruntime: the merged model written once as an ONNX graph, dynamically quantized to
int8 (inference.onnx_graph, as `budgetune export --format onnx --quantize int8` writes it) and cached on disk by the
model's content; run by a torch module whose forward returns the logits as a torch tensor, so that the inference
loop (runner.predict_logits, serve's batcher, precision_choice's measurement) takes it as it takes a torch model."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from budgetune import fileio
from budgetune.inference import onnx_graph

CACHE_VERSION = 1  # part of every cache key: raise it when what a cached graph holds changes
CHECK_LENGTH = 128  # tokens: where export_merged's check texts are cut (or at the tokenizer's model_max_length)


class OrtModel(nn.Module):
    """An onnxruntime session behind a torch forward: forward(**batch) feeds the graph's inputs (the batch's other
    tensors are ignored) and returns a SequenceClassifierOutput whose logits are a CPU torch tensor."""

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__()
        self.path = Path(path)
        # torch's own thread count: the process's --threads / OMP_NUM_THREADS setting holds for onnxruntime too
        self.session = onnx_graph.session(self.path, threads or torch.get_num_threads())
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, **batch: torch.Tensor):
        from transformers.modeling_outputs import SequenceClassifierOutput

        feed = {n: batch[n].detach().cpu().numpy() for n in self.input_names}
        return SequenceClassifierOutput(logits=torch.from_numpy(self.session.run(["logits"], feed)[0]))


def cache_folder(cache_dir: str | Path | None = None) -> Path:
    """Where the int8 graphs are kept: under --cache_dir (a run's data.cache_dir), else budgetune's user cache."""
    return Path(cache_dir or fileio.user_cache()) / "onnx-int8"


def plain(model: nn.Module) -> nn.Module:
    """The plain transformers model that `export --format onnx` writes: a peft model's adapter (already merged into
    the base weights, as int8 requires) unloaded and its trained head put in place (methods.merge_and_unload), so
    that nothing unused (peft's copy of the untrained head, the adapter's own weights) enters the graph or its
    cache key. The peft model is taken apart in the process."""
    if not hasattr(model, "get_base_model"):
        return model
    from budgetune.modeling import methods

    with warnings.catch_warnings():  # merged already: peft notes that there is nothing left to merge
        warnings.filterwarnings("ignore", message="(Already following adapters were merged|All adapters are "
                                "already merged)")
        return methods.merge_and_unload(model)


def cache_key(model: nn.Module, names: list[str]) -> str:
    """A digest of everything the int8 graph is built from: every weight of the merged model (so a new adapter,
    another adapter scale or another base model gives another key), its class and config, the graph's inputs, and
    the versions of the tools that write and quantize it."""
    import onnxruntime

    h = hashlib.blake2b(digest_size=20)
    facts = {"version": CACHE_VERSION, "class": type(model).__name__, "inputs": names, "opset": onnx_graph.OPSET,
             "per_channel": onnx_graph.PER_CHANNEL, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
             "config": model.config.to_dict() if hasattr(model, "config") else None}
    h.update(json.dumps(facts, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def build(model: nn.Module, tokenizer, path: Path) -> None:
    """Write the model's int8 graph at `path` (atomically): the fp32 graph, checked against the model's logits
    (onnx_graph.write_checked), then quantized."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build.", dir=path.parent) as tmp, fileio.atomic_path(path) as target:
        fp32 = Path(tmp) / "model.onnx"
        onnx_graph.write_checked(model, tokenizer, min(tokenizer.model_max_length, CHECK_LENGTH), fp32,
                                 "--precision int8 (onnxruntime)")
        onnx_graph.quantize_int8(fp32, target)


def int8_model(model: nn.Module, tokenizer, cache_dir: str | Path | None = None) -> OrtModel:
    """The merged `model` as onnxruntime int8, built once per model content (cache_key) under
    cache_folder(cache_dir) and reused by every later predict, evaluate or serve of the same bundle at the same
    adapter scale."""
    model = plain(model).eval()
    path = cache_folder(cache_dir) / f"{cache_key(model, onnx_graph.input_names(model, tokenizer))}.onnx"
    if not path.is_file():
        print(f"--precision int8: writing the merged model as an onnxruntime int8 graph, once, into {path}",
              file=sys.stderr)
        build(model, tokenizer, path)
    return OrtModel(path)
