"""Every common encoder architecture, by the seed's names: BERT (MiniLM), RoBERTa, ELECTRA, DistilBERT, MPNet and
DeBERTa-v2/v3 as tiny random models; attention kernels each architecture has."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import run_cli, tiny_train_args


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
