"""Every shipped method through the real CLI: the saved adapter reloads with plain transformers + peft and gives the
logits of the exact trained weights (best_state.pt), head included; budget.json counts what really trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_train_args

from budgetune.config import METHODS, resolve
from budgetune.modeling import backbone, classifier_heads, methods

pytestmark = pytest.mark.slow  # trains real models: `pytest -m "not slow"` skips the module

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
TEXTS = ["Stocks rally as rates fall on hopes of a soft landing", "Rookie scores 38 in debut win",
         "New chip ships with faster cores and a bigger cache", "Peace talks resume in Geneva after a week",
         "Quillon Systems accused of collecting location data without consent. Privacy advocates object."]
TOL = 1e-5
CSV_VARIANTS = {"dora", "vera", "lokr", "lora-frozen_dense"}

_RUNS: dict[str, Path] = {}


def trained_run(name: str, tiny_roberta: Path, headlines_csv: Path, root: Path, method: str, **flags) -> Path:
    """Train once per variant (lazily, so each xdist worker only trains what its tests need)."""
    if name not in _RUNS:
        out = root / name
        # Some variants read a CSV with explicit label names, the others the built-in data.
        if name in CSV_VARIANTS:
            data, flags = headlines_csv, {"label_names": ",".join(LABELS), **flags}
        else:
            data = "builtin:headlines"
        run_cli(*tiny_train_args(tiny_roberta, data, out, method, num_train_epochs=1, **flags))
        _RUNS[name] = out
    return _RUNS[name]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("method-runs")


def rebuild_trained(run: Path) -> torch.nn.Module:
    """The trained model in-process: load_base + wrap on the run's config, then best_state's exact tensors."""
    from accelerate.utils import set_seed

    cfg = resolve(str(run / "config.yaml"), [])
    labels = json.loads((run / "adapter" / "budgetune.json").read_text())["label_names"]
    total_step = json.loads((run / "adapter" / "adapter_config.json").read_text()).get("total_step")
    saved = torch.load(run / "best_state.pt", map_location="cpu", weights_only=True)
    set_seed(cfg.train.seed)  # as train() does: frozen head parts (never in best_state) are seeded inits
    base, missing = backbone.load_base(cfg, labels)
    model = methods.wrap(cfg, base, total_step, missing)
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert set(saved["model"]) == trainable, sorted(set(saved["model"]) ^ trainable)
    with torch.no_grad():
        for n, t in saved["model"].items():
            assert params[n].shape == t.shape, n
            params[n].copy_(t)
    if cfg.method.method == "adalora":
        assert saved["rank_pattern"], "AdaLoRA's best state has no rank pattern"
        model.peft_config["default"].rank_pattern = saved["rank_pattern"]
    else:
        assert saved["rank_pattern"] is None
    return model.eval()


def reload_plain(run: Path, tiny_roberta: Path, head: str = "default"):
    """What a user does: a fresh base from transformers, the head swap the model card asks for, then peft."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1234)
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_roberta), num_labels=4)
    if head == "linear":
        classifier_heads.apply_head(base, "linear")
    return PeftModel.from_pretrained(base, str(run / "adapter")).eval()


def batch_for(run: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run / "adapter"))
    return tok(TEXTS, return_tensors="pt", padding=True, truncation=True, max_length=48)


def outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def head_copy(model) -> dict[str, torch.Tensor]:
    """The head peft saved and loaded (modules_to_save copy) vs the fresh base's own random head."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".modules_to_save.default." in n}


def check_roundtrip(run: Path, tiny_roberta: Path, head: str = "default") -> tuple[torch.nn.Module, dict]:
    trained = rebuild_trained(run)
    reloaded = reload_plain(run, tiny_roberta, head)
    batch = batch_for(run)
    want_logits, want_hidden = outputs(trained, batch)
    got_logits, got_hidden = outputs(reloaded, batch)
    assert got_logits.shape == (len(TEXTS), 4)
    assert (got_logits - want_logits).abs().max().item() < TOL, (got_logits, want_logits)
    assert (got_hidden - want_hidden).abs().max().item() < TOL
    # The adapters matter for the comparison: switched off, the encoder's output moves well beyond the tolerance.
    with reloaded.disable_adapter():
        _, plain_hidden = outputs(reloaded, batch)
    assert (plain_hidden - got_hidden).abs().max().item() > 10 * TOL
    # The head really was saved: the loaded copy is not the fresh base's random head.
    saved_head = head_copy(reloaded)
    assert saved_head, "no head among modules_to_save"
    fresh = dict(reloaded.named_parameters())
    for n, t in saved_head.items():
        if not t.any():  # a frozen bias keeps its deterministic zero initialisation in both
            continue
        assert not torch.equal(fresh[n.replace(".modules_to_save.default.", ".original_module.")], t), n
    trained_head = {n: p for n, p in trained.named_parameters() if ".modules_to_save.default." in n}
    assert set(trained_head) == set(saved_head)
    for n, t in saved_head.items():
        assert torch.equal(t, trained_head[n].detach()), n
    return trained, saved_head


def check_folder(run: Path, tiny_roberta: Path, method: str, head: str = "default") -> None:
    adapter = run / "adapter"
    for f in ("adapter_config.json", "adapter_model.safetensors", "budgetune.json", "tokenizer_config.json",
              "tokenizer.json", "README.md"):
        assert (adapter / f).is_file(), f
    info = json.loads((adapter / "budgetune.json").read_text())
    assert info["label_names"] == LABELS
    assert info["head"] == head and info["method"] == method
    card = (adapter / "README.md").read_text()
    assert "base_model:" not in card  # a local folder is no Hub id: the Hub refuses a card naming it there
    assert str(tiny_roberta) in card.split("\n# ", 1)[1].splitlines()[0]
    assert ("apply_head(model, 'linear')" in card) == (head == "linear")
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert acfg["peft_type"] == {"dora": "LORA"}.get(method, method.upper())
    assert acfg.get("use_dora", False) == (method == "dora")
    from transformers import AutoTokenizer

    saved_tok, base_tok = AutoTokenizer.from_pretrained(str(adapter)), AutoTokenizer.from_pretrained(str(tiny_roberta))
    assert saved_tok(TEXTS)["input_ids"] == base_tok(TEXTS)["input_ids"]


def check_budget(run: Path, trained: torch.nn.Module) -> dict:
    recorded = json.loads((run / "budget.json").read_text())
    live = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    best = torch.load(run / "best_state.pt", map_location="cpu", weights_only=True)["model"]
    assert recorded["total_trainable"] == live == sum(t.numel() for t in best.values())
    assert recorded["total_trainable"] <= recorded["budget"]
    return recorded


ADAPTERS = tuple(m for m in METHODS if m != "full")  # full fine-tuning has no adapter: tests/test_distill.py


@pytest.mark.parametrize("method", ADAPTERS)
def test_method_trains_saves_and_reloads_exactly(method, tiny_roberta, headlines_csv, runs_root):
    assert set(ADAPTERS) == {"adalora", "lora", "dora", "ia3", "vera", "loha", "lokr"}
    run = trained_run(method, tiny_roberta, headlines_csv, runs_root, method)
    check_folder(run, tiny_roberta, method)
    trained, _ = check_roundtrip(run, tiny_roberta)
    check_budget(run, trained)
    # Training moved the adapter itself, not only the head.
    from accelerate.utils import set_seed

    cfg = resolve(str(run / "config.yaml"), [])
    set_seed(cfg.train.seed)
    base, missing = backbone.load_base(cfg, LABELS)
    total_step = json.loads((run / "adapter" / "adapter_config.json").read_text()).get("total_step")
    init = dict(methods.wrap(cfg, base, total_step, missing).named_parameters())
    moved = [n for n, p in trained.named_parameters()
             if p.requires_grad and "modules_to_save" not in n and not torch.equal(p, init[n])]
    assert moved, "no adapter tensor changed during training"


def test_linear_head_reloads_after_apply_head(tiny_roberta, headlines_csv, runs_root):
    run = trained_run("lora-linear", tiny_roberta, headlines_csv, runs_root, "lora", head="linear")
    check_folder(run, tiny_roberta, "lora", head="linear")
    trained, saved_head = check_roundtrip(run, tiny_roberta, head="linear")
    assert isinstance(trained.base_model.model.classifier.modules_to_save["default"], classifier_heads.FirstTokenLinear)
    assert sorted(saved_head) == ["base_model.model.classifier.modules_to_save.default.out_proj.bias",
                                  "base_model.model.classifier.modules_to_save.default.out_proj.weight"]
    recorded = check_budget(run, trained)
    assert recorded["head"] == 4 * 32 + 4  # one Linear(hidden 32 -> 4 labels)


def test_frozen_dense_trains_adapters_and_out_proj_only(tiny_roberta, headlines_csv, runs_root):
    run = trained_run("lora-frozen_dense", tiny_roberta, headlines_csv, runs_root, "lora", head="frozen_dense")
    check_folder(run, tiny_roberta, "lora", head="frozen_dense")
    trained, saved_head = check_roundtrip(run, tiny_roberta, head="frozen_dense")
    trainable = [n for n, p in trained.named_parameters() if p.requires_grad]
    head = [n for n in trainable if "classifier" in n]
    assert sorted(head) == ["base_model.model.classifier.modules_to_save.default.out_proj.bias",
                            "base_model.model.classifier.modules_to_save.default.out_proj.weight"]
    adapters = [n for n in trainable if n not in head]
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters), adapters
    recorded = check_budget(run, trained)
    params = dict(trained.named_parameters())
    n_adapters = sum(params[n].numel() for n in adapters)
    assert recorded["head"] == 4 * 32 + 4
    assert recorded["total_trainable"] == n_adapters + 4 * 32 + 4
    # The frozen dense was saved too (the fresh base's dense is another random draw), and it is a real
    # initialisation (std ~ initializer_range 0.02), not uninitialised memory.
    dense = saved_head["base_model.model.classifier.modules_to_save.default.dense.weight"]
    assert 0.01 < dense.std().item() < 0.03 and abs(dense.mean().item()) < 0.01
    assert not params["base_model.model.classifier.modules_to_save.default.dense.weight"].requires_grad
