"""Tests for budgetune.config: shipped YAMLs, overrides, exact error messages, help text, config.yaml round trip."""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, headline_rows, run_cli

from budgetune import cli
from budgetune.budget.count import config_breakdown
from budgetune.budget.plan import resolve_auto_rank
from budgetune.config import (
    GROUPS,
    METHODS,
    Config,
    ConfigError,
    build_config,
    field_docs,
    load_yaml,
    resolve,
)
from budgetune.modeling import backbone

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert len(CONFIGS) >= 2, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses_names_itself_and_fits_its_budget(path: Path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#"), first
    assert re.search(rf"budgetune (train|search) --config configs/{re.escape(path.name)}( |$)", first), first
    raw = load_yaml(path)
    raw.pop("search", None)  # a search recipe's own group (budgetune.search_space validates it)
    cfg = build_config(raw, str(path))
    assert isinstance(cfg, Config)
    # Every key of the file arrived in the Config (compared after the Config's own normalisation).
    for group, values in raw.items():
        for key, value in (values or {}).items():
            got = getattr(getattr(cfg, group), key)
            if key == "target_modules" and isinstance(value, str) and value != "all-linear":
                value = value.split(",")
            assert got == value, (path.name, group, key, got, value)
    resolved, _ = resolve_auto_rank(cfg, 4)
    assert isinstance(resolved.method.rank, int)
    bd = config_breakdown(resolved, 4)
    assert bd.budget == cfg.budget.max_trainable_params
    if bd.budget is not None:
        assert 0 < bd.total_trainable <= bd.budget, (path.name, bd.table())
    if path.name in ("seed_adalora_roberta_agnews.yaml", "seed_adalora_mpnet_agnews.yaml"):  # the same shapes
        assert bd.total_trainable == 888_772, bd.table()
        assert bd.head == 593_668
        assert bd.total_trainable - bd.head == 295_104


# ---------------------------------------------------------------- overrides


@pytest.fixture()
def base_yaml(tmp_path: Path) -> Path:
    p = tmp_path / "base.yaml"
    p.write_text("train:\n  learning_rate: 5.0e-4\n  seed: 11\nmethod:\n  method: adalora\n  rank: 8\n"
                 "  target_modules: [query, value]\n")
    return p


def test_flat_override_beats_the_file(base_yaml):
    assert resolve(str(base_yaml), []).train.learning_rate == 5e-4
    cfg = resolve(str(base_yaml), ["--learning_rate", "1e-3"])
    assert cfg.train.learning_rate == 1e-3
    assert isinstance(cfg.train.learning_rate, float)
    assert cfg.train.seed == 11  # untouched keys of the file survive
    assert cfg.method.method == "adalora"


def test_dotted_and_equals_overrides(base_yaml):
    cfg = resolve(str(base_yaml), ["--train.seed", "3", "--method.rank=6"])
    assert cfg.train.seed == 3 and isinstance(cfg.train.seed, int)
    assert cfg.method.rank == 6 and isinstance(cfg.method.rank, int)
    assert cfg.train.learning_rate == 5e-4


def test_list_override_and_default_target_modules(base_yaml):
    assert resolve(None, []).method.target_modules == "all-linear"
    assert resolve(str(base_yaml), []).method.target_modules == ["query", "value"]
    assert resolve(str(base_yaml), ["--target_modules", "query,key"]).method.target_modules == ["query", "key"]
    assert resolve(None, ["--target_modules", "all-linear"]).method.target_modules == "all-linear"


def test_null_and_counts_for_the_budget():
    assert resolve(None, []).budget.max_trainable_params == 1_000_000
    assert resolve(None, ["--max_trainable_params", "null"]).budget.max_trainable_params is None
    assert resolve(None, ["--max_trainable_params", "250000"]).budget.max_trainable_params == 250_000
    assert resolve(None, ["--max_trainable_params", "1M"]).budget.max_trainable_params == 1_000_000
    assert resolve(None, ["--max_trainable_params", "250k"]).budget.max_trainable_params == 250_000


def test_rank_auto_and_integer_rank():
    assert resolve(None, ["--rank", "auto"]).method.rank == "auto"
    rank = resolve(None, ["--rank", "12"]).method.rank
    assert rank == 12 and isinstance(rank, int)


def test_bare_flag_is_true():
    cfg = resolve(None, ["--overwrite_output_dir", "--seed", "5"])
    assert cfg.output.overwrite_output_dir is True
    assert cfg.train.seed == 5


# ---------------------------------------------------------------- exact error messages


def _error(config_file, overrides) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(config_file, overrides)
    return str(info.value)


def test_unknown_key_in_a_yaml_section(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("train:\n  learnig_rate: 1.0e-3\n")
    assert _error(str(p), []) == f"{p}: unknown key 'learnig_rate' in section 'train' (did you mean 'learning_rate'?)"
    # The file is validated alone first, so the message names it even when overrides are given.
    assert _error(str(p), ["--seed", "1"]).startswith(f"{p}: unknown key 'learnig_rate'")


def test_unknown_section_in_a_yaml(tmp_path):
    p = tmp_path / "section.yaml"
    p.write_text("trian:\n  seed: 1\n")
    assert _error(str(p), []) == (f"{p}: unknown section 'trian' (did you mean 'train'?); sections are "
                                  "model, data, method, budget, train, output")


def test_wrong_type_names_the_flag():
    assert _error(None, ["--learning_rate", "abc"]) == "command line: train.learning_rate: expected a number, got 'abc'"
    assert _error(None, ["--seed", "1.5"]) == "command line: train.seed: expected an integer, got '1.5'"
    assert _error(None, ["--group_by_length", "maybe"]) == (
        "command line: data.group_by_length: expected true or false, got 'maybe'")


def test_wrong_type_in_a_yaml_names_the_file(tmp_path):
    p = tmp_path / "type.yaml"
    p.write_text("train:\n  learning_rate: fast\n")
    assert _error(str(p), []) == f"{p}: train.learning_rate: expected a number, got 'fast'"


def test_unknown_option_on_the_command_line():
    assert _error(None, ["--learning_rat", "1"]) == "unknown option --learning_rat (did you mean --learning_rate?)"
    assert _error(None, ["--zzzzzz", "1"]) == "unknown option --zzzzzz"
    assert _error(None, ["oops"]) == "unexpected argument 'oops'; options look like --learning_rate 1e-3"


def test_unknown_method_through_the_real_cli(tmp_path):
    proc = run_cli("train", "--method", "adalorra", "--output_dir", str(tmp_path / "run"), check=False, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    expected = ("budgetune: error: --method 'adalorra' is unknown (did you mean 'adalora'?); choose one of "
                "adalora, lora, dora, ia3, vera, loha, lokr, full")
    assert expected in proc.stderr.splitlines(), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(("flags", "message"), [
    (["--validation_split_percentage", "0"], "--validation_split_percentage must be between 0 and 100, got 0.0"),
    (["--validation_split_percentage", "100"], "--validation_split_percentage must be between 0 and 100, got 100.0"),
    (["--max_seq_length", "4"], "--max_seq_length must be at least 8, got 4"),
    (["--rank", "0"], "--rank must be a positive integer or auto, got 0"),
    (["--method", "adalora", "--rank", "8", "--target_r", "9"], "--target_r must be between 1 and --rank (8), got 9"),
    (["--lora_dropout", "1"], "--lora_dropout must be in [0, 1), got 1.0"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1, got 0"),
    (["--learning_rate", "0"], "--learning_rate must be a positive number, got 0.0"),
    (["--warmup_ratio", "1"], "--warmup_ratio must be in [0, 1), got 1.0"),
    (["--max_trainable_params", "0"], "--max_trainable_params must be positive or null, got 0"),
    (["--lr_scheduler_type", "cosin"], "--lr_scheduler_type must be one of linear, cosine, cosine_with_restarts, "
     "polynomial, constant, constant_with_warmup, inverse_sqrt, reduce_lr_on_plateau, cosine_with_min_lr, "
     "cosine_warmup_with_min_lr, warmup_stable_decay, greedy, got 'cosin'"),
    (["--head", "mlp"], "--head must be default, linear or frozen_dense, got 'mlp'"),
])
def test_out_of_range_values(flags, message):
    assert _error(None, flags) == message


def test_out_of_range_value_in_a_yaml_names_the_file(tmp_path):
    p = tmp_path / "range.yaml"
    p.write_text("data:\n  validation_split_percentage: 0\n")
    assert _error(str(p), []) == f"{p}: --validation_split_percentage must be between 0 and 100, got 0.0"


def test_method_error_lists_every_method():
    msg = _error(None, ["--method", "adalorra"])
    assert msg.endswith("choose one of " + ", ".join(METHODS))


# ---------------------------------------------------------------- help


def test_train_help_lists_every_option_with_its_docstring(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    n = 0
    for group, cls in GROUPS.items():
        assert f"{group}:" in out
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert re.search(rf"^  --{f.name} \(default: ", out, re.M), f.name
            assert docs.get(f.name), f"{group}.{f.name} has no docstring"
            assert docs[f.name] in flat, (f.name, docs[f.name])
            n += 1
    assert n == len({f.name for cls in GROUPS.values() for f in dataclasses.fields(cls)})
    # A few by hand: the help is the docstrings, not something else.
    assert "--learning_rate (default: 0.001)" in out
    assert "Peak learning rate of the optimizer." in flat
    assert "AdaLoRA: average rank kept at the end; default rank // 2" in flat
    assert "Hard cap on trainable parameters (adapters + head + anything unfrozen); null switches the gate off." in flat



@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["params", "--help"]])
def test_help_into_a_closed_pipe_ends_without_a_traceback(argv):
    """`budgetune train --help | head`: the reader has gone when budgetune writes; exit 1, nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "budgetune", *argv], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, timeout=120)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (1, "")


# ---------------------------------------------------------------- config.yaml of a run


def test_resolved_config_of_a_run_reparses_to_the_same_config(tiny_roberta, tmp_path):
    from budgetune.training.train import train

    data = tmp_path / "small.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows(headline_rows()[:64])
    out = tmp_path / "run"
    overrides = ["--model_name_or_path", str(tiny_roberta), "--dataset_name", str(data), "--output_dir", str(out),
                 "--label_names", "World,Sports,Business,Sci/Tech", "--method", "lora", "--rank", "auto",
                 "--max_trainable_params", "5000", "--target_modules", "query,value", "--max_steps", "1",
                 "--per_device_train_batch_size", "8", "--max_seq_length", "32", "--validation_split_percentage",
                 "25", "--learning_rate", "2e-3", "--early_stopping_patience", "null", "--cache_dir",
                 str(tmp_path / "cache"), "--seed", "5", "--method_options", "{use_rslora: true}"]
    cfg = resolve(None, overrides)
    train(cfg)
    written = out / "config.yaml"
    assert written.read_text().startswith("# resolved configuration of this run\n")
    assert f"budgetune train --config {written}" in written.read_text().splitlines()[1]
    again = resolve(str(written), [])
    expected, _ = backbone.resolve_attention(resolve_auto_rank(cfg, 4)[0])
    assert isinstance(again.method.rank, int) and again.method.rank > 1  # auto was resolved before writing
    assert again.model.attn_implementation == "sdpa"  # so was --attn_implementation auto
    assert again == expected
    assert again.method.method_options == {"use_rslora": True}
    assert again.data.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert again.budget.max_trainable_params == 5000
    # build_config of the dict form is the identity as well.
    assert build_config(again.to_dict()) == again


@pytest.mark.parametrize("content, message", [
    (b"train:\n  learning_rate: 1e-3\n  seed: \xff\n", r"cfg.yaml, line 3: not UTF-8 text \(byte 0xff at offset 37\)"),
    (b"[" * 5000 + b"]" * 5000, "nested too deeply|not valid YAML"),
    (b'data:\n  label_names: ["a\\ud800b", "c"]\n', r"data.label_names.0: the value is not valid Unicode "
     r"\(unpaired surrogate \\ud800 at character 2\)"),
    (b'train:\n  "\\udc00": 1\n', "train: a key is not valid Unicode"),
])
def test_hostile_config_files_are_a_config_error_naming_the_file(tmp_path, content, message):
    """Sibling of the hostile data files (issue 20, item 14): the config YAML is read through the same checks."""
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        resolve(str(path), [])


def test_a_flag_value_that_is_not_unicode_is_refused_naming_the_flag():
    """argv bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)."""
    with pytest.raises(ConfigError, match=r"--label_names: the value is not valid Unicode"):
        resolve(None, ["--label_names", "a,b\udcff"])


def test_a_hostile_config_through_the_real_cli_is_exit_2(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"model:\n  model_name_or_path: \xfe\xfe\n")
    proc = subprocess.run([sys.executable, "-m", "budgetune", "train", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cfg.yaml, line 2: not UTF-8 text" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- a flag on top of a file, odd values


def test_a_flag_completes_or_corrects_the_file(tmp_path):
    p = tmp_path / "graphs.yaml"
    p.write_text("train:\n  cuda_graphs: true\n")
    assert resolve(str(p), ["--pad_to_buckets", "6"]).data.pad_to_buckets == 6  # the file alone is refused
    q = tmp_path / "metric.yaml"
    q.write_text("train:\n  metric_for_best_model: mse\n")
    assert resolve(str(q), ["--task", "regression"]).train.metric_for_best_model == "mse"
    assert _error(str(p), ["--seed", "3"]).startswith(f"{p}: ")  # a flag that does not fix it: the file is named


@pytest.mark.parametrize("value, message", [
    ("inf", "--max_trainable_params: expected a whole count like 1000000, 1M or 250k, got 'inf'"),
    ("1.5", "--max_trainable_params: expected a whole count like 1000000, 1M or 250k, got '1.5'"),
    ("1e400", "--max_trainable_params: expected a whole count like 1000000, 1M or 250k, got '1e400'"),
])
def test_a_budget_that_is_no_whole_count_is_refused(value, message):
    assert _error(None, ["--max_trainable_params", value]) == message


def test_report_to_none_and_odd_yaml_are_errors_or_nothing_not_tracebacks(tmp_path):
    assert resolve(None, ["--report_to", "none"]).output.report_to == []
    p = tmp_path / "null.yaml"
    p.write_text("output:\n  report_to: null\n")
    assert resolve(str(p), []).output.report_to == []
    assert _error(None, ["--method_options", "{a:[}"]).startswith("command line: method.method_options: not a YAML")
    p.write_text("1:\n  seed: 3\n")
    assert "unknown section 1" in _error(str(p), [])


def test_plan_refuses_a_budget_below_one(capsys):
    assert cli.main(["plan", "--budget", "0"]) == 2
    assert "--budget must be a positive count, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--weight_decay", "nan"], "--weight_decay must be a number of at least 0, got nan"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be a number of at least 0, got -1.0"),
    (["--num_train_epochs", "inf"], "--num_train_epochs must be a positive number (or set --max_steps), got inf"),
    (["--lora_alpha", "0"], "--lora_alpha must be a positive number, got 0.0"),
    (["--beta1", "5"], "--beta1 must be in [0, 1), got 5.0"),
    (["--method", "loha", "--bias", "all"], "--bias all: peft's loha has no bias option"),
])
def test_values_that_would_train_nonsense_or_be_ignored_are_refused(flags, message):
    assert _error(None, flags).startswith(message)
