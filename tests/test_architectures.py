"""Every common encoder architecture, by the seed's names: BERT (MiniLM), RoBERTa, ELECTRA, DistilBERT, MPNet and
DeBERTa-v2/v3 as tiny random models; attention kernels each architecture has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, tiny_train_args
from test_methods import check_budget, check_folder, check_roundtrip

from budgetune.budget import count, plan
from budgetune.config import build_config, resolve
from budgetune.errors import ConfigError


def short_run(model: Path, out: Path, method: str = "lora", **extra) -> list[str]:
    return tiny_train_args(model, "builtin:headlines", out, method, max_steps=2, max_train_samples=32,
                           max_eval_samples=16, robust_tolerance="null", **extra)


def test_mpnet_trains_with_attention_auto(tiny_encoder, tmp_path: Path):
    """transformers has no SDPA path for MPNet: the default (auto) trains it with eager attention and says so."""
    out = tmp_path / "run"
    proc = run_cli(*short_run(tiny_encoder("mpnet"), out, target_modules="q,v"))  # MPNet's own names
    header = [line for line in proc.stdout.splitlines() if line.startswith("attention:")]
    assert header == ["attention: eager (auto: MPNetForSequenceClassification has no SDPA attention in transformers "
                      f"{__import__('transformers').__version__})"], proc.stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["attn_implementation"] == "eager"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_attention_auto_is_sdpa_where_the_architecture_has_it(tiny_roberta: Path, tmp_path: Path):
    out = tmp_path / "run"
    proc = run_cli(*short_run(tiny_roberta, out))
    assert "attention: sdpa (auto)" in proc.stdout.splitlines(), proc.stdout
    # the run records what it used: a resumed run of another default resolves to the same and may go on
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["attn_implementation"] == "sdpa"


def test_explicit_sdpa_on_mpnet_names_the_flag(tiny_encoder, tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    proc = run_cli(*short_run(tiny_encoder("mpnet"), out, target_modules="q,v", attn_implementation="sdpa"), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()  # (library warnings may come before it)
    assert "Traceback" not in proc.stderr and [x for x in lines if x.startswith("budgetune")] == lines[-1:], lines
    assert lines[-1].startswith("budgetune: error: --attn_implementation sdpa: MPNetForSequenceClassification")
    assert "--attn_implementation auto" in lines[-1]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ---- every architecture x every method, by the seed's names --------------------------------------------------------

ARCHITECTURES = ("bert", "roberta", "electra", "distilbert", "mpnet", "deberta-v2")
ADAPTERS = ("adalora", "lora", "dora", "ia3", "vera", "loha", "lokr")
# `query,value` in each architecture's own names (adapter_config.json holds these: plain peft reloads them).
QV = {"bert": {"query", "value"}, "roberta": {"query", "value"}, "electra": {"query", "value"},
      "distilbert": {"q_lin", "v_lin"}, "mpnet": {"q", "v"}, "deberta-v2": {"query_proj", "value_proj"}}
# The quick lane trains one method per architecture (each method but DoRA, LoRA's sibling, once); the slow lane
# the whole cross product.
QUICK = {"bert": "lora", "roberta": "ia3", "electra": "lokr", "distilbert": "vera", "mpnet": "adalora",
         "deberta-v2": "loha"}
MATRIX = [pytest.param(arch, method, id=f"{arch}-{method}", marks=() if QUICK[arch] == method else pytest.mark.slow)
          for arch in ARCHITECTURES for method in ADAPTERS]


def matrix_config(model: Path, out: Path, method: str, **extra):
    flags = {"max_steps": 4, "tinit": 1, "tfinal": 1, "deltaT": 1} if method == "adalora" else {"max_steps": 3}
    args = tiny_train_args(model, "builtin:headlines", out, method, max_train_samples=48, max_eval_samples=16,
                           robust_tolerance="null", per_device_train_batch_size=8, learning_rate=2e-2,
                           **{**flags, **extra})
    return resolve(None, args[1:])


@pytest.mark.parametrize("arch,method", MATRIX)
def test_architecture_trains_saves_and_reloads_with_plain_peft(arch, method, tiny_encoder, tmp_path):
    from budgetune.training.train import train

    model, out = tiny_encoder(arch), tmp_path / "run"
    cfg = matrix_config(model, out, method)  # target_modules query,value: the seed's names
    train(cfg)
    check_folder(out, model, method)
    assert set(json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"]) == QV[arch]
    trained, _ = check_roundtrip(out, model)  # the exact trained weights and plain peft give the same logits
    recorded = check_budget(out, trained)  # budget.json == live trainable == the saved best state
    assert recorded["total_trainable"] == count.config_breakdown(cfg, 4).total_trainable  # == `budgetune params`


# Trainable head parameters of the tiny models (hidden 32, 4 labels): a dense layer 32x32+32, the output 32x4+4.
DENSE, OUT = 32 * 32 + 32, 32 * 4 + 4
HEAD_COUNTS = {"bert": {"default": OUT, "linear": OUT},  # BERT's pooler belongs to the encoder: frozen
               **{arch: {"default": DENSE + OUT, "linear": OUT, "frozen_dense": OUT}
                  for arch in ("roberta", "electra", "mpnet", "distilbert", "deberta-v2")}}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_heads_are_counted_for_each_architecture(arch, tiny_encoder):
    for head in ("default", "linear", "frozen_dense"):
        cfg = build_config({"model": {"model_name_or_path": str(tiny_encoder(arch)), "head": head},
                            "method": {"method": "lora", "rank": 4, "target_modules": "query,value"}})
        if head not in HEAD_COUNTS[arch]:
            with pytest.raises(ConfigError, match="--head frozen_dense: BertForSequenceClassification's head has no"):
                count.config_breakdown(cfg, 4)
            continue
        bd = count.config_breakdown(cfg, 4)
        assert bd.head == HEAD_COUNTS[arch][head], head
        # LoRA r4 on query and value of 2 layers: (32 + 32) x 4 x 4 modules, whatever the architecture calls them
        assert bd.total_trainable - bd.head == 64 * 4 * 4, (head, bd.by_module)



@pytest.mark.parametrize("flags", [{"bias": "all"}, {"target_modules": "dense"}],
                         ids=["bias-all", "dense-targets"])
def test_the_count_knows_the_head_parts_a_checkpoint_lacks(tiny_encoder, flags):
    """A masked-LM BERT checkpoint has no pooler: a live run saves it frozen (modules_to_save), which keeps peft's
    biases and LoRA off it; the weight-free count must do the same or training stops at the live recount."""
    import torch

    from budgetune.modeling import backbone, methods

    cfg = build_config({"model": {"model_name_or_path": str(tiny_encoder("bert"))},
                        "method": {"method": "lora", "rank": 2, "target_modules": "query,value", **flags}})
    torch.manual_seed(0)
    model, missing = backbone.load_base(cfg, ["a", "b", "c", "d"])
    assert "bert.pooler.dense" in missing
    live = count.count_trainable(methods.wrap(cfg, model, 1000, missing))
    counted = count.config_breakdown(cfg, 4)
    assert (counted.total_trainable, counted.by_kind) == (live.total_trainable, live.by_kind)

HEAD_RUNS = [pytest.param(arch, head, id=f"{arch}-{head}",
                          marks=() if (arch, head) in {("mpnet", "frozen_dense"), ("distilbert", "linear")}
                          else pytest.mark.slow)
             for arch in ARCHITECTURES for head in HEAD_COUNTS[arch] if head != "default"]


@pytest.mark.parametrize("arch,head", HEAD_RUNS)
def test_heads_are_saved_for_each_architecture(arch, head, tiny_encoder, tmp_path):
    from budgetune.training.train import train

    model, out = tiny_encoder(arch), tmp_path / "run"
    train(matrix_config(model, out, "lora", head=head))
    trained, saved_head = check_roundtrip(out, model, head=head)
    assert check_budget(out, trained)["head"] == OUT
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad and ".modules_to_save." in n}
    assert sum(dict(trained.named_parameters())[n].numel() for n in trainable) == OUT
    if arch in ("mpnet", "roberta", "electra") and head == "frozen_dense":  # the frozen dense travels with it
        assert any(".dense." in n for n in saved_head) and not any(".dense." in n for n in trainable)
    if arch == "distilbert":  # pre_classifier stays as loaded (random here), frozen, and is saved
        assert any("pre_classifier" in n for n in saved_head) and not any("pre_classifier" in n for n in trainable)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_plan_rank_auto_and_search_space_work_on_each_architecture(arch, tiny_encoder):
    from budgetune.recipes.search import search_space

    cfg = build_config({"model": {"model_name_or_path": str(tiny_encoder(arch))},
                        "method": {"method": "lora", "rank": "auto", "target_modules": "query,value"},
                        "budget": {"max_trainable_params": 4000}})
    rows = plan.plan(cfg, 4, 4000)
    assert {r["method"] for r in rows} == set(ADAPTERS), arch  # IA3 too: peft has no defaults for some of them
    assert {search_space.targets_text(r["targets"]) for r in rows} == {"query,value", "query,key,value",
                                                                       "all-linear", "null"}
    resolved, message = plan.resolve_auto_rank(cfg, 4)
    # LoRA on query,value costs 2 x (32 + 32) per rank, beyond the head
    head = HEAD_COUNTS[arch]["default"]
    assert resolved.method.rank == (4000 - head) // 256 and message.startswith("rank auto: picked")
    dims = search_space.parse_search_group({"target_modules": ["query,value"], "method": ["adalora", "lora", "ia3"]})
    space = search_space.build_space(cfg, 4, dims, 4000)
    assert {s.method for s in space.shapes} == {"adalora", "lora"}  # IA3's row targets its defaults (null)


def test_a_target_the_model_lacks_is_named(tiny_encoder):
    """`--target_modules q,v` (MPNet's own names) on BERT: an error naming the flag and the layers' Linear modules."""
    proc = run_cli("params", "--model_name_or_path", str(tiny_encoder("bert")), "--target_modules", "q,v",
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "budgetune: error: --target_modules q,v: BertForSequenceClassification has no module 'q'; its layers' Linear "
        "modules are attention.output.dense, attention.self.key, attention.self.query, attention.self.value, "
        "intermediate.dense, output.dense (seed names query, key, value, dense and all-linear work on every "
        "architecture)")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attention_dropout_reaches_each_architectures_attention(arch, tiny_encoder):
    """--attention_dropout sets the attention-probability dropout under each architecture's own config name, and
    the attention modules train with it."""
    import torch

    from budgetune.modeling import backbone

    model, _ = backbone.load_pretrained(str(tiny_encoder(arch)), ["a", "b"], attention_dropout=0.37)
    names = [k for k in backbone.ATTENTION_DROPOUT_KEYS if hasattr(model.config, k)]
    assert names and all(getattr(model.config, k) == 0.37 for k in names)
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p == 0.37}
    probs = {getattr(m, "dropout", None) for m in model.modules() if isinstance(getattr(m, "dropout", None), float)}
    assert rates or probs == {0.37}, (arch, names)  # nn.Dropout modules, or the float SDPA/eager attention reads


def test_attention_dropout_is_refused_where_the_model_has_none():
    from transformers import PretrainedConfig

    from budgetune.modeling.backbone import set_attention_dropout

    with pytest.raises(ConfigError, match=r"--attention_dropout: model type 'plain' has no attention dropout"):
        set_attention_dropout(type("Plain", (PretrainedConfig,), {"model_type": "plain"})(), 0.0)
    with pytest.raises(ConfigError, match=r"--attention_dropout must be in \[0, 1\) or null, got 1.5"):
        build_config({"model": {"attention_dropout": 1.5}}, "test")
