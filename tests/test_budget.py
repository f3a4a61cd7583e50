import json

import pytest
import torch

from budgetune.budget.count import check_live, config_breakdown, count_trainable
from budgetune.budget.plan import check_budget, plan, resolve_auto_rank
from budgetune.cli.budget import show_params, show_plan
from budgetune.config import PACKAGED_MINILM, build_config, merge, parse_overrides
from budgetune.errors import BudgetError
from budgetune.modeling import backbone, methods

ROBERTA = "roberta-base"


def cfg_for(model=ROBERTA, head="default", budget=1_000_000, **method):
    # Explicit targets and alpha: the counts below must not move when config.py's defaults change.
    method.setdefault("target_modules", "query,value")
    method.setdefault("method", "lora")
    if method["method"] != "ia3":
        method.setdefault("rank", 8)
    return build_config({"model": {"model_name_or_path": model, "head": head}, "method": method,
                         "budget": {"max_trainable_params": budget}})


@pytest.mark.parametrize("method, expected", [
    ({"method": "adalora", "rank": 8}, 888_772),
    ({"method": "adalora", "rank": 11}, 999_436),
    ({"method": "lora", "rank": 8}, 888_580),
    ({"method": "lora", "rank": 11}, 999_172),
    ({"method": "lora", "rank": 4, "target_modules": "query,key,value", "bias": "all"}, 916_996),
    ({"method": "dora", "rank": 8}, 907_012),
    ({"method": "ia3", "target_modules": None}, 658_180),
    ({"method": "loha", "rank": 8}, 1_183_492),
])
def test_exact_counts_roberta_base(method, expected):
    bd = config_breakdown(cfg_for(**method), 4)
    assert bd.total_trainable == expected == sum(bd.by_kind.values()) == sum(bd.by_module.values())
    assert bd.head == bd.by_kind["head"] == bd.by_module["head"] == 593_668
    # peft's trainable agrees (ranknum frozen); its "all" adds the head copy and the ranknum scalars.
    assert bd.peft_trainable == expected
    assert bd.peft_all == bd.all_params_once + bd.head_copy + bd.ranknum
    assert bd.head_copy == 593_668


def test_adalora_figures_and_table():
    bd = config_breakdown(cfg_for(method="adalora", rank=8), 4)
    assert bd.peft_all == 125_537_504
    assert bd.ranknum == 24
    assert bd.all_params_once == 125_537_504 - 593_668 - 24
    assert set(bd.by_kind) == {"lora_A", "lora_B", "lora_E", "head"}
    assert bd.by_module["layer.0.attention.self.query"] == 8 * (768 + 768 + 1)
    # Pruned to target_r 4: half the adapter rank is saved, the head in full.
    assert bd.saved_after_pruning == (888_772 - 593_668) // 2 + 593_668
    text = bd.table()
    assert "888,772" in text and "125,537,504" in text and "ranknum" in text and "modules_to_save" in text
    assert json.loads(json.dumps(bd.to_dict()))["fits"] is True


def test_shipped_architecture_is_not_the_bare_default():
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    # Bare RobertaConfig(): 512 positions and 2 token types; roberta-base has 514 and 1 (768 more in all).
    with torch.device("meta"):
        bare = AutoModelForSequenceClassification.from_config(RobertaConfig(vocab_size=50265, num_labels=4))
    shipped = backbone.meta_model(cfg_for(), 4)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(shipped) - count(bare) == 768


@pytest.mark.parametrize("head, trainable_head", [("default", 593_668), ("linear", 3_076), ("frozen_dense", 3_076)])
def test_head_choices(head, trainable_head):
    bd = config_breakdown(cfg_for(head=head), 4)
    assert bd.head == trainable_head
    assert bd.total_trainable == 294_912 + trainable_head


def test_minilm_default_head():
    bd = config_breakdown(cfg_for(model=PACKAGED_MINILM), 4)
    assert bd.head == 384 * 4 + 4 == 1_540


def test_loha_refused_with_overrides_that_fit():
    with pytest.raises(BudgetError) as err:
        check_budget(cfg_for(method="loha", rank=8), 4)
    message = str(err.value)
    assert "1,183,492" in message and "1,000,000" in message
    assert err.value.suggestions
    first = err.value.suggestions[0]
    assert first["override"] in message and first["trainable"] <= 1_000_000
    # The suggestion, applied on top of the refused config, really fits.
    base = {"model": {"model_name_or_path": ROBERTA}, "method": {"method": "loha", "rank": 8,
                                                                  "target_modules": "query,value"}}
    cfg = build_config(merge(base, parse_overrides(first["override"].split())))
    assert check_budget(cfg, 4).total_trainable == first["trainable"]


def test_budget_off_never_raises():
    assert check_budget(cfg_for(method="loha", budget=None), 4).budget is None


@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_resolve_auto_rank_picks_11(method):
    cfg, message = resolve_auto_rank(cfg_for(method=method, rank="auto"), 4)
    assert cfg.method.rank == 11
    assert message.startswith("rank auto: picked 11 (") and "<= 1,000,000" in message


def test_resolve_auto_rank_ia3_and_too_small():
    _, message = resolve_auto_rank(cfg_for(method="ia3", rank="auto", target_modules=None), 4)
    assert "does not apply" in message
    with pytest.raises(BudgetError):
        resolve_auto_rank(cfg_for(method="lora", rank="auto", budget=500_000), 4)


@pytest.fixture(scope="module")
def plan_rows():
    # Two methods keep roberta-base's plan quick; test_plan_command covers every method on MiniLM.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("budgetune.budget.plan.RANK_METHODS", ("adalora", "lora"))
        return plan(cfg_for(method="adalora", rank=8), 4, 1_000_000)


def test_plan_rows_fit_sorted(plan_rows):
    trainable = [r["trainable"] for r in plan_rows]
    assert trainable == sorted(trainable, reverse=True) and max(trainable) <= 1_000_000
    assert plan_rows[0] == {"method": "adalora", "rank": 11, "targets": ["query", "value"], "head": "default",
                            "trainable": 999_436,
                            "override": "--method adalora --rank 11 --target_modules query,value --head default"}
    assert {r["method"] for r in plan_rows} == {"adalora", "lora", "ia3"}


def test_plan_overrides_reproduce_counts(plan_rows):
    base = {"model": {"model_name_or_path": ROBERTA}}
    picks = [plan_rows[0], plan_rows[len(plan_rows) // 2], plan_rows[-1]]
    picks += [next(r for r in plan_rows if r["method"] == "ia3")]
    for row in picks:
        cfg = build_config(merge(base, parse_overrides(row["override"].split())))
        assert config_breakdown(cfg, 4).total_trainable == row["trainable"], row


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-roberta")
    RobertaModel(RobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=80, type_vocab_size=1,
                               pad_token_id=1)).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("method", ["adalora", "lora", "dora", "ia3", "vera", "loha", "lokr"])
@pytest.mark.parametrize("head", ["default", "frozen_dense"])
def test_live_count_equals_meta(tiny_roberta, method, head):
    cfg = cfg_for(model=tiny_roberta, head=head, method=method, **({"rank": 4} if method != "ia3" else {}))
    expected = config_breakdown(cfg, 3)
    model, missing = backbone.load_base(cfg, ["a", "b", "c"])
    live = methods.wrap(cfg, model, cfg.method.tinit + cfg.method.tfinal + 1000, missing)
    assert next(live.parameters()).device.type == "cpu"
    got = check_live(live, cfg, expected)
    assert got.total_trainable == expected.total_trainable and got.by_kind == expected.by_kind
    assert got.peft_trainable == live.get_nb_trainable_parameters()[0] == expected.total_trainable


def test_check_live_refuses_extra_trainable(tiny_roberta):
    cfg = cfg_for(model=tiny_roberta)
    expected = config_breakdown(cfg, 3)
    model, missing = backbone.load_base(cfg, ["a", "b", "c"])
    live = methods.wrap(cfg, model, None, missing)
    live.get_base_model().roberta.embeddings.LayerNorm.weight.requires_grad_(True)
    assert count_trainable(live).by_kind["LayerNorm"] == 32
    with pytest.raises(BudgetError, match="disagree|config-only"):
        check_live(live, cfg, expected)


def test_params_command(capsys):
    args = ["--model_name_or_path", ROBERTA, "--method", "adalora", "--rank", "auto",
            "--target_modules", "query,value"]
    assert show_params(None, args, False, 4) == 0
    out = capsys.readouterr().out
    assert "picked 11" in out and "999,436" in out
    assert show_params(None, args, True, 4) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_trainable"] == 999_436 and data["rank"] == 11


def test_plan_command(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  model_name_or_path: packaged:all-MiniLM-L6-v2\nmethod:\n  method: lora\n"
                      "  target_modules: [query, value]\n")
    assert show_plan(str(config), ["--rank", "2"], "60k", True) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["budget"] == 60_000 and data["rows"]
    assert all(r["trainable"] <= 60_000 for r in data["rows"])
    assert {r["method"] for r in data["rows"]} == {"adalora", "lora", "dora", "vera", "loha", "lokr", "ia3"}
    base = {"model": {"model_name_or_path": PACKAGED_MINILM}}
    for row in [next(r for r in data["rows"] if r["method"] == m) for m in ("lokr", "vera", "dora")]:
        cfg = build_config(merge(base, parse_overrides(row["override"].split())))
        assert config_breakdown(cfg, 4).total_trainable == row["trainable"], row
    assert show_plan(str(config), ["--rank", "2"], "60k", False) == 0  # counts cached: quick
    out = capsys.readouterr().out
    assert "fit 60,000" in out and f"{data['rows'][0]['trainable']:,}" in out


def test_adalora_rank_auto_never_picks_a_rank_training_refuses():
    """AdaLoRA trains only above target_r (at least rank 2): --rank auto starts there, and says so when even that
    is over the budget (it picked rank 1, or target_r itself, which training then refused)."""
    from budgetune.adalora import phases

    cfg, _ = resolve_auto_rank(cfg_for(method="adalora", rank="auto", budget=680_000), 4)  # rank 2: 667,444
    phases.check_ranks(cfg.method)  # training's own check passes
    assert cfg.method.rank == 2
    with pytest.raises(BudgetError, match="even the lowest rank needs 667,444"):
        resolve_auto_rank(cfg_for(method="adalora", rank="auto", budget=630_000), 4)  # rank 1 fits, and cannot train
    with pytest.raises(BudgetError, match="even the lowest rank needs"):
        resolve_auto_rank(cfg_for(method="adalora", rank="auto", target_r=8, budget=888_772), 4)  # rank 9 is over
    assert resolve_auto_rank(cfg_for(method="adalora", rank="auto", target_r=8), 4)[0].method.rank == 11


def test_target_r_means_nothing_to_other_methods():
    cfg = cfg_for(method="lora", rank=4, target_r=8)  # AdaLoRA's option, refused beside --rank 4 only for AdaLoRA
    assert resolve_auto_rank(cfg_for(method="lora", rank="auto", target_r=8, budget=700_000), 4)[0].method.rank == 2
    assert config_breakdown(cfg, 4).total_trainable == config_breakdown(cfg_for(method="lora", rank=4), 4).total_trainable


def test_a_suggested_other_method_clears_this_methods_options():
    cfg = cfg_for(method="vera", rank=8, budget=600_000, method_options={"d_initial": 0.2})
    with pytest.raises(BudgetError) as info:
        check_budget(cfg, 4)
    others = [s["override"] for s in info.value.suggestions if "--method" in s["override"]]
    assert others and all("--method_options {}" in o for o in others)


def test_ia3_on_all_linear_layers_counts_on_every_architecture(tiny_encoder):
    """peft has no feed-forward defaults for a regex on MPNet, DistilBERT or ELECTRA: budgetune gives its own."""
    for arch in ("mpnet", "distilbert", "electra"):
        cfg = build_config({"model": {"model_name_or_path": str(tiny_encoder(arch))},
                            "method": {"method": "ia3", "target_modules": "all-linear"}})
        assert config_breakdown(cfg, 4).by_kind["ia3_l"] > 0


def test_the_size_after_adalora_pruning_is_a_range_where_modules_differ_in_width(tiny_encoder):
    """peft keeps target_r x modules ranks where they score best: on layers of other widths the saved size depends
    on where they land, so the table gives the fewest and the most, not one exact-looking figure."""
    cfg = build_config({"model": {"model_name_or_path": str(tiny_encoder("bert"))},
                        "method": {"method": "adalora", "rank": 4, "target_r": 2, "target_modules": "all-linear"}})
    bd = config_breakdown(cfg, 4)
    # 8 attention projections (32+32+1 a rank) and 4 feed-forward layers (32+64+1): 24 ranks kept of 48
    rest = bd.total_trainable - sum(bd.by_kind[k] for k in ("lora_A", "lora_B", "lora_E"))
    assert bd.saved_range == (rest + 24 * 65, rest + 16 * 97 + 8 * 65)
    assert "about (1,692 to 2,204 as the ranks land)" in bd.table()
    assert config_breakdown(cfg_for(method="adalora", rank=8), 4).saved_range is None  # q,v of one width: exact
