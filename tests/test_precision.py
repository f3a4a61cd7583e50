"""Frozen base weights stored in bf16 under bf16 mixed precision (issue 13, item 3): same numbers as autocast,
trainables and everything saved stay fp32, saved adapters reload with plain peft, resume stays exact."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import read_jsonl, tiny_train_args
from safetensors.torch import load_file

from budgetune.config import resolve
from budgetune.hardware import precision
from budgetune.hardware.devices import release_accelerator
from budgetune.training import checkpoint
from budgetune.training.train import setup, train, train_step

pytestmark = pytest.mark.slow  # trains real models


def cfg_of(tiny_roberta, headlines_csv, out, method="lora", **extra):
    flags = {"max_train_samples": 32, "per_device_train_batch_size": 8, "num_train_epochs": 1,
             "mixed_precision": "bf16", "lora_dropout": 0.0, "robust_tolerance": "null"}
    if method == "adalora":  # a schedule that fits a few steps: pruning from step 2, final pattern for the last
        flags.update(tinit=1, tfinal=1, deltaT=1)
    flags.update(extra)
    return resolve(None, tiny_train_args(tiny_roberta, headlines_csv, out, method, **flags)[1:])


@pytest.fixture
def built(tiny_roberta, headlines_csv, tmp_path):
    """setup() of a configuration; accelerate's state released after the test."""
    runs = []

    def build(name: str, method: str = "lora", **extra):
        runs.append(run := setup(cfg_of(tiny_roberta, headlines_csv, tmp_path / name, method, **extra)))
        return run

    yield build
    release_accelerator()


def first_steps(run, n: int = 3) -> tuple[list[float], torch.Tensor, dict[str, torch.Tensor]]:
    """Losses of the first n training steps (dropout and batch order seeded alike), then the logits of the first
    batch in eval mode and the trainable weights."""
    torch.manual_seed(0)
    run.model.train()
    losses, first = [], None
    for i, batch in enumerate(run.train_loader):
        if i == n:
            break
        batch.pop("idx", None)
        first = first or {k: v for k, v in batch.items() if k != "labels"}
        loss, _, _ = train_step(run, batch, i)
        losses.append(float(loss))
    run.model.eval()
    with torch.no_grad():
        logits = run.model(**first).logits.float()
    return losses, logits, checkpoint.trainable_state(run.inner)


@pytest.mark.parametrize("method,head", [("lora", "default"), ("adalora", "frozen_dense")])
def test_frozen_linears_are_bf16_and_trainables_fp32_after_setup(built, method, head):
    run = built("on", method, head=head)
    roles = precision.dtypes_by_role(run.inner)
    assert roles == {"trainable": {torch.float32}, "frozen_linear": {torch.bfloat16}}
    params = dict(run.inner.named_parameters())
    query = next(p for n, p in params.items() if n.endswith("attention.self.query.base_layer.weight"))
    assert query.dtype == torch.bfloat16 and not query.requires_grad
    # LayerNorm and embeddings stay fp32 (autocast runs layer_norm in fp32 and does not cast lookups)
    assert all(p.dtype == torch.float32 for n, p in params.items() if "LayerNorm" in n or "embeddings" in n)
    # the head, frozen parts included, is saved with the adapter: fp32
    assert all(p.dtype == torch.float32 for n, p in params.items() if "modules_to_save" in n)
    if head == "frozen_dense":
        dense = next(p for n, p in params.items() if "modules_to_save.default.dense.weight" in n)
        assert not dense.requires_grad and dense.dtype == torch.float32
    assert all(p.dtype == torch.float32 for g in run.optimizer.optimizer.param_groups for p in g["params"])


def test_the_flag_off_or_no_bf16_leaves_the_base_fp32(built):
    for name, flag in (("off", {"frozen_in_compute_dtype": "false"}), ("fp32", {"mixed_precision": "no"})):
        run = built(name, **flag)
        assert {p.dtype for p in run.inner.parameters()} == {torch.float32}, name
        release_accelerator()


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_first_steps_agree_with_autocast(built, method):
    """bf16-stored weights round exactly as autocast's per-forward cast does: the same losses, step after step."""
    off, logits_off, weights_off = first_steps(built("off", method, lora_dropout=0.1,
                                                     frozen_in_compute_dtype="false"))
    release_accelerator()
    on, logits_on, weights_on = first_steps(built("on", method, lora_dropout=0.1))
    print(f"{method}: losses flag on {on}, off {off}; logits max diff {(logits_on - logits_off).abs().max():.3g}")
    assert len(on) == 3
    assert on == pytest.approx(off, rel=1e-2)  # bf16 tolerance ...
    torch.testing.assert_close(logits_on, logits_off, rtol=1e-2, atol=1e-2)
    # ... but in fact equal: autocast's cast of an fp32 weight rounds as .to(bfloat16) does (CPU, measured)
    assert on == off and torch.equal(logits_on, logits_off)
    assert weights_on.keys() == weights_off.keys()
    assert all(torch.equal(weights_on[k], weights_off[k]) for k in weights_on)


def test_saved_adapter_is_fp32_and_reloads_with_plain_peft(tiny_roberta, headlines_csv, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    train(cfg_of(tiny_roberta, headlines_csv, out, "lora", head="frozen_dense"))
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
    assert any("classifier.dense" in k for k in saved)  # the frozen part of the head travels, fp32
    info = json.loads((out / "adapter" / "budgetune.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(tiny_roberta, num_labels=len(info["label_names"]))
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert 0 <= evaluation["accuracy"] <= 1  # finish() scored the plain-peft reload


def test_full_model_bundle_stays_fp32(tiny_roberta, headlines_csv, tmp_path):
    """Method full trains every weight: nothing is frozen, nothing cast, the bundle is fp32."""
    out = tmp_path / "full"
    train(cfg_of(tiny_roberta, headlines_csv, out, "full", max_trainable_params="null"))
    weights = load_file(out / "adapter" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_resume_under_bf16_is_exact(tiny_roberta, headlines_csv, tmp_path):
    """A run resumed from its mid-run checkpoint ends where the uninterrupted one ends (bf16 base, fp32 state)."""
    extra = {"num_train_epochs": 2, "save_steps": 2, "save_total_limit": 10, "deterministic": "true"}
    ref = tmp_path / "ref"
    train(cfg_of(tiny_roberta, headlines_csv, ref, "adalora", **extra))
    got = tmp_path / "resumed"
    shutil.copytree(ref / "checkpoints" / "step-000002", got / "checkpoints" / "step-000002")
    train(cfg_of(tiny_roberta, headlines_csv, got, "adalora", resume_from_checkpoint=str(got), **extra))

    def events(out, kind):
        return [{k: v for k, v in e.items() if k != "samples_per_second"}
                for e in read_jsonl(out / "metrics.jsonl") if e["event"] == kind]

    assert min(e["step"] for e in events(got, "train")) > 2  # it resumed, it did not start again
    assert events(got, "eval") == events(ref, "eval") and events(ref, "eval")
    assert [e for e in events(got, "train") if e["step"] > 2] == [e for e in events(ref, "train") if e["step"] > 2]
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (ref, got))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_resumes_across_the_switch(tiny_roberta, headlines_csv, tmp_path):
    """The flag changes no number, so a checkpoint written with it on resumes with it off (and older checkpoints,
    written before the flag existed, still resume)."""
    extra = {"num_train_epochs": 2, "save_steps": 2, "save_total_limit": 10, "deterministic": "true"}
    ref = tmp_path / "ref"
    train(cfg_of(tiny_roberta, headlines_csv, ref, **extra))
    got = tmp_path / "switched"
    shutil.copytree(ref / "checkpoints" / "step-000002", got / "checkpoints" / "step-000002")
    train(cfg_of(tiny_roberta, headlines_csv, got, resume_from_checkpoint=str(got), frozen_in_compute_dtype="false",
                 **extra))
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (ref, got))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_scale_and_merge_work_on_a_bf16_base(built, method):
    """The adapter-scale machinery and the inference merge, run on the training model itself (bf16 base):
    merged and unmerged agree within bf16 rounding at scale 1 and 0.5, and the base weights stay bf16."""
    from budgetune.modeling import methods, scaling

    run = built("on", method)
    model = run.inner.eval()
    with torch.no_grad():  # a trained-looking adapter: lora_B starts at zero, which would make any merge agree
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_E" in n:
                p.normal_(0, 3.0)
    batch = next(iter(run.train_loader))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    def logits() -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**inputs).logits.float()

    unmerged = {s: (scaling.apply_scale(model, s), logits())[1] for s in (1.0, 0.5)}
    by_scale = (unmerged[1.0] - unmerged[0.5]).abs().max()
    assert methods.merge_for_inference(model)
    for s in (0.5, 1.0):
        scaling.apply_scale(model, s)  # merged: unmerged, scaled, merged again
        by_merge = (logits() - unmerged[s]).abs().max()
        print(f"{method} scale {s}: merged vs unmerged {by_merge:.3g}, scale 1 vs 0.5 {by_scale:.3g}")
        assert by_merge < 0.1 * by_scale  # bf16 rounding of the merged weight, far below what the scale moves
    assert precision.dtypes_by_role(model)["frozen_linear"] == {torch.bfloat16}
