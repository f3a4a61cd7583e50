"""The training loop: explicit, on accelerate (devices, DDP, mixed precision), one screen of control flow."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from budgetune import artifacts, batching, budget, checkpoint, methods
from budgetune import data as data_lib
from budgetune.config import BUILTIN_DATA, Config, save_yaml
from budgetune.devices import make_accelerator, mixed_precision, token_cap
from budgetune.errors import Interrupted, TrainingError
from budgetune.inference import inference_loader, predict_logits
from budgetune.metrics import classification_metrics, cross_entropy, metrics_text
from budgetune.runlog import MetricsLog

BEST_STATE = "best_state.pt"  # the best step's exact trainable tensors, to finish (or resume) with them




@dataclass
class Splits:
    train: data_lib.TextTable
    validation: data_lib.TextTable
    test: data_lib.TextTable | None
    label_names: list[str]


def load_splits(cfg: Config) -> Splits:
    """Train/validation(/test) tables; validation is carved from train (stratified, seeded) when the data has none."""
    d = cfg.data
    kw = {"text_column": d.text_column_name, "label_column": d.label_column_name, "label_names": d.label_names,
          "dataset_config_name": d.dataset_config_name}
    train = data_lib.load_table(d.dataset_name, split="train", **kw)
    names = train.label_names
    kw["label_names"] = names
    if d.validation_file:
        val = data_lib.load_table(d.validation_file, split="validation", **kw)
    elif data_lib.has_split(d.dataset_name, "validation", d.dataset_config_name):
        val = data_lib.load_table(d.dataset_name, split="validation", **kw)
    else:  # never the test split: it must not choose the model
        train, val = data_lib.train_validation_split(train, d.validation_split_percentage / 100, cfg.train.seed)
    test = None
    if d.test_file:
        test = data_lib.load_table(d.test_file, split="test", **kw)
    elif data_lib.has_split(d.dataset_name, "test", d.dataset_config_name):  # reported only, never selects
        test = data_lib.load_table(d.dataset_name, split="test", **kw)
    if d.max_train_samples:
        train = data_lib.TextTable(train.texts[: d.max_train_samples], train.labels[: d.max_train_samples],
                                   names, train.source)
    if d.max_eval_samples:
        val = data_lib.TextTable(val.texts[: d.max_eval_samples], val.labels[: d.max_eval_samples], names, val.source)
    return Splits(train, val, test, names)


def cache_dir(cfg: Config) -> str:
    return cfg.data.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "budgetune")


def steps_per_epoch(n_batches_per_process: int, accumulation: int) -> int:
    """Optimizer steps per epoch; accelerate steps on the last, partial accumulation of an epoch too."""
    return max(1, math.ceil(n_batches_per_process / accumulation))


def train(cfg: Config, *, on_evaluate=None) -> dict:
    """Train cfg's adapter; returns the best validation metrics. Writes everything into cfg.output.output_dir.

    on_evaluate(step, metrics): called after every validation with the step and {eval_accuracy, eval_macro_f1,
    eval_loss, epoch}; an exception it raises (e.g. optuna.TrialPruned) ends the run and propagates.
    """
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer, get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    t = cfg.train
    out = Path(cfg.output.output_dir)
    resume = checkpoint.find(t.resume_from_checkpoint, out) if t.resume_from_checkpoint else None
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    accelerator = make_accelerator(mixed_precision=mixed_precision(t.mixed_precision),
                                   gradient_accumulation_steps=t.gradient_accumulation_steps,
                                   log_with=cfg.output.report_to or None, project_dir=str(out))
    main = accelerator.is_main_process
    say = accelerator.print

    # The gate comes first: a configuration over budget is refused before data or weights are loaded.
    known_labels = cfg.data.label_names or (data_lib.AG_NEWS_LABELS if cfg.data.dataset_name == BUILTIN_DATA else None)
    if known_labels:
        cfg, note = budget.resolve_auto_rank(cfg, len(known_labels))
        expected = budget.check_budget(cfg, len(known_labels))
    if main:
        artifacts.guard_output_dir(out, cfg.output.overwrite_output_dir, resuming=resume is not None, clear=False)
    accelerator.wait_for_everyone()

    splits = load_splits(cfg)
    names = splits.label_names
    if not known_labels:
        cfg, note = budget.resolve_auto_rank(cfg, len(names))
        expected = budget.check_budget(cfg, len(names))
    if note:
        say(note)
    state = None
    if resume is not None:  # a checkpoint of another configuration is refused before anything is written
        state = checkpoint.load(resume)
        checkpoint.check_compatible(state["config"], cfg.to_dict(), resume)

    model_path = methods.resolve_model_path(cfg.model.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=cfg.model.revision)
    with accelerator.main_process_first():  # one process tokenizes; the others read its cache
        train_ds = data_lib.tokenize(splits.train, tokenizer, cfg.data.max_seq_length, cache_dir(cfg))
        val_ds = data_lib.tokenize(splits.validation, tokenizer, cfg.data.max_seq_length, cache_dir(cfg))
    on_gpu = accelerator.device.type == "cuda"
    pad_multiple = 8 if on_gpu else None  # tensor cores want multiples of 8; on CPU it is only padding
    lengths = train_ds["length"]
    # Batch size is per device. The sampler forms the global batches (per-device x processes) of one process with
    # that batch, and each is split into per-device parts; accelerate hands process i part i. So N processes x B
    # train on exactly the batches of 1 process x N*B (docs/multi_gpu.md), and every process yields as many batches.
    world = accelerator.num_processes
    global_batch = t.per_device_train_batch_size * world
    # Without grouping, a mega-batch is one batch: the same seeded shuffle, no sorting across batches.
    sampler = batching.LengthGroupedBatchSampler(lengths, global_batch, t.seed,
                                                 mega_batch_mult=50 if cfg.data.group_by_length else 1)
    if world > 1:
        sampler = batching.GlobalBatchSplitter(sampler, world, len(lengths), global_batch)
    # Its own generator: starting an epoch's iterator draws a seed, which must not come from the global RNG that
    # dropout uses, or a run resumed mid-epoch (one draw more than the original) would drop out other units.
    train_loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=batching.make_collator(tokenizer, pad_multiple),
                              num_workers=t.dataloader_num_workers, pin_memory=on_gpu,
                              generator=torch.Generator().manual_seed(t.seed))
    val_loader = inference_loader(val_ds, tokenizer, t.per_device_eval_batch_size, pad_multiple,
                                  t.dataloader_num_workers, on_gpu, token_cap(accelerator.device))

    # total_step from the data: batches per process per epoch / accumulation x epochs (AdaLoRA's schedule needs it).
    per_epoch = steps_per_epoch(math.ceil(len(sampler) / accelerator.num_processes), t.gradient_accumulation_steps)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(per_epoch * t.num_train_epochs)
    num_epochs = math.ceil(total_steps / per_epoch)

    set_seed(t.seed)  # before the model: the head's and the adapters' initial weights depend on it
    model, missing = methods.load_base(cfg, names)
    model = methods.wrap(cfg, model, total_steps, missing)
    methods.first_token_last_layer(model)  # evaluation only: in train mode the layer runs in full
    live = budget.check_live(model, cfg, expected)
    if main:  # inputs, weights and checkpoint have loaded: only now is an old run (--overwrite_output_dir) replaced
        artifacts.guard_output_dir(out, cfg.output.overwrite_output_dir, resuming=resume is not None)
        save_yaml(cfg, out / "config.yaml", header=f"# resolved configuration of this run\n# budgetune train "
                  f"--config {out / 'config.yaml'}\n")
        artifacts.atomic_write_json(out / "budget.json", live.to_dict())
        say(live.table())
    is_adalora = cfg.method.method == "adalora"

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "lora_E" in n else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.learning_rate,
                                  fused=on_gpu)
    warmup = int(t.warmup_ratio * total_steps)
    if t.lr_scheduler_type == "linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    if t.torch_compile and on_gpu:
        model = torch.compile(model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    inner = accelerator.unwrap_model(model)
    if cfg.output.report_to:
        accelerator.init_trackers(cfg.output.run_name or out.name, config=_flat(cfg.to_dict()))
    log = MetricsLog(out / "metrics.jsonl", accelerator, enabled=main)

    progress = {"step": 0, "epoch": 0, "batches_done": 0, "best_metric": None, "best_step": None, "bad_evals": 0,
                "samples": 0, "elapsed": 0.0}
    best_state, best_pattern, best_metrics = None, None, None
    if resume is not None:
        checkpoint.restore_model(inner, state["model"])
        optimizer.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        checkpoint.restore_allocator(inner, state["allocator"])
        checkpoint.restore_rng(state["rng"])
        progress = state["progress"]
        saved = state.get("best")  # the best as of that checkpoint: best_state.pt may come from later steps
        if saved is None and (out / BEST_STATE).exists():
            saved = torch.load(out / BEST_STATE, map_location="cpu")
        if saved is not None and saved.get("model") is not None:
            best_state, best_pattern, best_metrics = saved["model"], saved["rank_pattern"], saved["metrics"]
        log.truncate_after(progress["step"])
        say(f"resumed from {resume} at step {progress['step']} (epoch {progress['epoch']}, "
            f"batch {progress['batches_done']})")
    else:
        log.log("budget", step=0, **live.to_dict())

    stop_signal = {"sig": None}

    def on_signal(signum, frame):
        stop_signal["sig"] = signum  # finish the step in flight, then checkpoint and leave

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def save_checkpoint() -> Path:
        folder = out / "checkpoints" / f"step-{progress['step']:06d}"
        if main:
            checkpoint.save(folder, model=inner, optimizer=optimizer.optimizer, scheduler=scheduler,
                            scaler=accelerator.scaler, progress=dict(progress), config=cfg.to_dict(),
                            keep=t.save_total_limit,
                            best={"model": best_state, "rank_pattern": best_pattern, "metrics": best_metrics})
        accelerator.wait_for_everyone()
        return folder

    def last_checkpoint() -> str:
        found = checkpoint.find("auto", out)
        return str(found) if found else "none yet"

    def evaluate_now() -> bool:
        """Evaluate, keep the best adapter, log; True when early stopping says stop."""
        nonlocal best_state, best_pattern, best_metrics
        logits = predict_logits(model, val_loader, accelerator, len(val_ds), desc="validation")
        m = classification_metrics(splits.validation.labels, logits.argmax(-1), names)
        m["loss"] = cross_entropy(logits, splits.validation.labels)
        key = t.metric_for_best_model
        value = m[key]
        better = progress["best_metric"] is None or (
            value < progress["best_metric"] if key == "loss" else value > progress["best_metric"])
        if better:
            progress.update(best_metric=value, best_step=progress["step"], bad_evals=0)
            best_state, best_pattern = checkpoint.trainable_state(inner), methods.rank_pattern_masks(inner)
            best_metrics = {"eval_accuracy": m["accuracy"], "eval_macro_f1": m["macro_f1"], "eval_loss": m["loss"],
                            "step": progress["step"], "epoch": round(progress["step"] / per_epoch, 4)}
            if main:
                save_best(inner, tokenizer, out, cfg, names, live, best_metrics, best_state, best_pattern)
        else:
            progress["bad_evals"] += 1
        log.log("eval", step=progress["step"], epoch=round(progress["step"] / per_epoch, 4), eval_loss=m["loss"],
                eval_accuracy=m["accuracy"], eval_macro_f1=m["macro_f1"], best=better)
        say(f"step {progress['step']}: validation accuracy {m['accuracy']:.4f} loss {m['loss']:.4f}"
            + (" (best)" if better else ""))
        if on_evaluate is not None:
            on_evaluate(progress["step"], {"eval_accuracy": m["accuracy"], "eval_macro_f1": m["macro_f1"],
                                           "eval_loss": m["loss"], "epoch": round(progress["step"] / per_epoch, 4)})
        patience = t.early_stopping_patience
        return patience is not None and progress["bad_evals"] >= patience

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=progress["step"], desc="train", disable=not accelerator.is_main_process)
    model.train()
    stop = progress["step"] >= total_steps
    window_loss, window_n, t0, samples0 = 0.0, 0, time.perf_counter(), progress["samples"]
    try:
        while not stop and progress["epoch"] < num_epochs:
            # accelerate's loader re-sets the sampler's epoch from its own counter, which a `break` at the end of an
            # epoch never advances and skip_first_batches does not pass on: set both, so each epoch (resumed too) has
            # its own order.
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(progress["epoch"])
            sampler.set_epoch(progress["epoch"])
            loader = train_loader
            if progress["batches_done"]:
                loader = accelerator.skip_first_batches(train_loader, progress["batches_done"])
            for batch in loader:
                batch.pop("idx", None)
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"non-finite loss ({loss.item()}) at step {progress['step'] + 1}; lower --learning_rate "
                            f"or check the data. Last good checkpoint: {last_checkpoint()}")
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients and t.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    optimizer.step()
                    stepped = accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped
                    if stepped:
                        scheduler.step()
                        if is_adalora:  # after optimizer.step, before zero_grad: it reads the gradients
                            inner.base_model.update_and_allocate(progress["step"])
                    optimizer.zero_grad(set_to_none=True)
                progress["batches_done"] += 1
                progress["samples"] += batch["input_ids"].shape[0] * accelerator.num_processes
                window_loss += loss.detach().float().item()
                window_n += 1
                if not accelerator.sync_gradients:
                    continue
                progress["step"] += 1
                bar.update(1)
                s = progress["step"]
                if s % t.logging_steps == 0 or s == total_steps:
                    elapsed = time.perf_counter() - t0
                    log.log("train", step=s, epoch=round(s / per_epoch, 4), loss=window_loss / window_n,
                            learning_rate=scheduler.get_last_lr()[0],
                            grad_norm=float(grad_norm) if grad_norm is not None else None,
                            samples_per_second=(progress["samples"] - samples0) / max(elapsed, 1e-9))
                    bar.set_postfix(loss=f"{window_loss / window_n:.4f}")
                    window_loss, window_n = 0.0, 0
                    if is_adalora and (pattern := methods.rank_pattern(inner)):
                        log.log("ranks", step=s, ranks=pattern)
                end_of_epoch = progress["batches_done"] >= len(train_loader)
                if end_of_epoch:
                    progress.update(epoch=progress["epoch"] + 1, batches_done=0)
                do_eval = (t.eval_strategy == "steps" and s % t.eval_steps == 0) or (
                    t.eval_strategy == "epoch" and end_of_epoch) or s == total_steps
                if do_eval:
                    stop = evaluate_now()
                if s >= total_steps:
                    stop = True
                if do_eval or (t.save_steps and s % t.save_steps == 0):
                    save_checkpoint()
                if world > 1:  # a signal reaches processes at different steps: all stop at the same one
                    flag = torch.tensor([stop_signal["sig"] or 0], device=accelerator.device)
                    stop_signal["sig"] = int(accelerator.gather(flag).max()) or None
                if stop_signal["sig"] is not None:
                    folder = save_checkpoint()
                    raise Interrupted(f"stopped by signal {stop_signal['sig']} at step {s}; checkpoint: {folder}. "
                                      f"Resume with: budgetune train --config {out / 'config.yaml'} "
                                      f"--resume_from_checkpoint {out}")
                if stop or end_of_epoch:
                    break
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(
            f"out of GPU memory at step {progress['step'] + 1} with --per_device_train_batch_size "
            f"{t.per_device_train_batch_size}; lower it (and raise --gradient_accumulation_steps to keep the "
            f"global batch) or lower --max_seq_length. Last good checkpoint: {last_checkpoint()}") from None
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    dump_dir = os.environ.get("BUDGETUNE_DUMP_RANK_STATE")  # debug/tests: every process's own final state
    if dump_dir:
        dumped = {"last": checkpoint.trainable_state(inner), "last_rank_pattern": methods.rank_pattern_masks(inner),
                  "progress": dict(progress), "num_processes": world, "total_steps": total_steps,
                  "per_epoch": per_epoch, "batches_per_epoch": len(train_loader)}
    # Finish with the best adapter in the model: final evaluation files describe what was saved.
    if best_state is not None:
        checkpoint.restore_model(inner, best_state)
        if best_pattern is not None:
            inner.peft_config["default"].rank_pattern = best_pattern
    logits = predict_logits(model, val_loader, accelerator, len(val_ds), desc="validation")
    final = classification_metrics(splits.validation.labels, logits.argmax(-1), names)
    final["loss"] = cross_entropy(logits, splits.validation.labels)
    if main:
        artifacts.atomic_write_json(out / "evaluation.json", {"split": "validation", **final})
        artifacts.atomic_write_text(out / "evaluation.txt", metrics_text(final, "validation (best adapter)"))
    if splits.test is not None:
        with accelerator.main_process_first():
            test_ds = data_lib.tokenize(splits.test, tokenizer, cfg.data.max_seq_length, cache_dir(cfg))
        test_loader = accelerator.prepare(inference_loader(test_ds, tokenizer, t.per_device_eval_batch_size,
                                                           pad_multiple, max_tokens=token_cap(accelerator.device)))
        tl = predict_logits(model, test_loader, accelerator, len(test_ds), desc="test")
        tm = classification_metrics(splits.test.labels, tl.argmax(-1), names)
        if main:
            artifacts.atomic_write_json(out / "evaluation_test.json", {"split": "test", **tm})
            artifacts.atomic_write_text(out / "evaluation_test.txt", metrics_text(tm, "test (best adapter)"))
        say(f"test accuracy {tm['accuracy']:.4f}")
    log.log("end", step=progress["step"], best_step=progress["best_step"], best_metric=progress["best_metric"],
            final_ranks=methods.rank_pattern(inner))
    if main:
        try:
            from budgetune.plots import plot_run

            plot_run(out)
        except Exception as e:  # plots are a convenience: never lose a finished run over them
            print(f"warning: plots failed: {e}", file=sys.stderr)
    if dump_dir:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        torch.save({**dumped, "final": checkpoint.trainable_state(inner),
                    "final_rank_pattern": methods.rank_pattern_masks(inner), "validation": final},
                   Path(dump_dir) / f"rank{accelerator.process_index}.pt")
    accelerator.end_training()
    say(f"best validation {t.metric_for_best_model} {progress['best_metric']:.4f} at step {progress['best_step']}; "
        f"adapter: {out / 'adapter'}")
    return {"best_metric": progress["best_metric"], "best_step": progress["best_step"], **(best_metrics or {}),
            "validation": {k: final[k] for k in ("accuracy", "macro_f1", "loss")}}


def save_best(inner, tokenizer, out: Path, cfg: Config, names, live, best_metrics, state, pattern) -> None:
    """The best adapter in peft's format (+ tokenizer, labels, model card) and its exact trainable state."""
    artifacts.save_bundle(inner, tokenizer, out / "adapter", label_names=names, base_model=cfg.model.model_name_or_path
                          if not cfg.model.model_name_or_path.startswith("packaged:")
                          else methods.resolve_model_path(cfg.model.model_name_or_path),
                          head=cfg.model.head, config=cfg.to_dict(), budget=live.to_dict(), metrics=best_metrics)
    artifacts.atomic_torch_save({"model": state, "rank_pattern": pattern, "metrics": best_metrics}, out / BEST_STATE)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out

