"""Training: `setup` -> `fit` -> `finish`, on accelerate (devices, DDP, mixed precision), explicit control flow."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from budgetune import fileio, tasks
from budgetune.adalora import lean_step, phases, rank_masks
from budgetune.budget.count import Breakdown, check_live
from budgetune.budget.plan import check_budget, resolve_auto_rank
from budgetune.config import BUILTIN_DATA, Config, save_yaml
from budgetune.data import batching
from budgetune.data import readers as data_lib
from budgetune.data.splits import Splits, cache_dir, load_splits, scores
from budgetune.errors import ConfigError, Interrupted, RunFolderError, TrainingError
from budgetune.hardware import precision
from budgetune.hardware.devices import (
    make_accelerator,
    release_accelerator,
    resolve_precision,
    settle_collectives,
    token_cap,
)
from budgetune.inference.runner import inference_loader, predict_logits
from budgetune.metrics import improves
from budgetune.modeling import backbone, fast_forward, methods
from budgetune.training import checkpoint, graphs, losses, optim
from budgetune.training.finish import BEST_STATE, finish, save_best
from budgetune.training.optim import make_optimizer
from budgetune.training.runlog import MetricsLog
from budgetune.training.runstate import Best, LossFn, Run, TrainState

OnEvaluate = Callable[[int, dict], None]


def steps_per_epoch(n_batches_per_process: int, accumulation: int) -> int:
    """Optimizer steps per epoch; accelerate steps on the last, partial accumulation of an epoch too."""
    return max(1, math.ceil(n_batches_per_process / accumulation))


def default_loss(model, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def gate(cfg: Config, label_names: list[str] | None) -> tuple[Config, Breakdown | None, str]:
    """rank: auto resolved, AdaLoRA's ranks and the budget checked, as soon as the number of labels is known; the
    optimizer's and schedule's arguments checked at once (before any data or weights load)."""
    optim.check_schedule(cfg.train)
    if not label_names:
        return cfg, None, ""
    cfg, note = resolve_auto_rank(cfg, len(label_names))
    if cfg.method.method == "adalora":
        phases.check_ranks(cfg.method)
    return cfg, check_budget(cfg, len(label_names)), note


def known_labels(cfg: Config) -> list[str] | None:
    """The label names (regression: the target column) known before the data loads, for the budget gate."""
    d = cfg.data
    if d.task == tasks.REGRESSION:
        return tasks.target_columns(d.task, d.label_column_name)
    builtin = d.dataset_name == BUILTIN_DATA and d.task == tasks.SINGLE_LABEL
    return d.label_names or (data_lib.AG_NEWS_LABELS if builtin else None)


def make_loaders(cfg: Config, accelerator, splits: Splits, tokenizer):
    """(sampler, train loader, validation loader) over the tokenized splits (cached on disk)."""
    t = cfg.train
    with accelerator.main_process_first():  # one process tokenizes; the others read its cache
        train_ds = data_lib.tokenize(splits.train, tokenizer, cfg.data.max_seq_length, cache_dir(cfg))
        val_ds = data_lib.tokenize(splits.validation, tokenizer, cfg.data.max_seq_length, cache_dir(cfg))
    on_gpu = accelerator.device.type == "cuda"
    pad = 8 if on_gpu else None  # tensor cores want multiples of 8; on CPU it is only padding
    # Batch size is per device. The sampler forms the global batches (per-device x processes) of one process with
    # that batch, and each is split into per-device parts; accelerate hands process i part i. So N processes x B
    # train on exactly the batches of 1 process x N*B (docs/multi_gpu.md), and every process yields as many batches.
    world = accelerator.num_processes
    global_batch = t.per_device_train_batch_size * world
    sampler = batching.LengthGroupedBatchSampler(train_ds["length"], global_batch, t.seed,
                                                 mega_batch_mult=50 if cfg.data.group_by_length else 1)
    if world > 1:
        sampler = batching.GlobalBatchSplitter(sampler, world, len(train_ds), global_batch)
    # Its own generator: starting an epoch's iterator draws a seed, which must not come from the global RNG that
    # dropout uses, or a run resumed mid-epoch (one draw more than the original) would drop out other units.
    buckets = train_buckets(cfg, train_ds["length"], sampler, pad or 8)
    train_loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=batching.make_collator(tokenizer, pad, buckets),
                              num_workers=t.dataloader_num_workers, pin_memory=on_gpu,
                              generator=torch.Generator().manual_seed(t.seed))
    val_loader = inference_loader(val_ds, tokenizer, t.per_device_eval_batch_size, pad, t.dataloader_num_workers,
                                  on_gpu, token_cap(accelerator.device))
    return sampler, train_loader, val_loader


def train_buckets(cfg: Config, lengths, sampler, multiple: int) -> list[int]:
    """--pad_to_buckets' fixed lengths: those that pad the first epoch's batches least (later epochs shuffle the
    same length groups, so their batches' lengths are alike); [] when off."""
    if not cfg.data.pad_to_buckets:
        return []
    sampler.set_epoch(0)
    return batching.length_buckets(batching.batch_maxima(lengths, sampler), cfg.data.pad_to_buckets, multiple)


def setup(cfg: Config, splits: Splits | None = None, loss_fn: LossFn | None = None) -> Run:
    """Gate, data, model, optimizer, logger; nothing of an old run is replaced until all inputs have loaded."""
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    t, out = cfg.train, Path(cfg.output.output_dir)
    chosen = resolve_precision(t.mixed_precision)
    accelerator = make_accelerator(mixed_precision=chosen.mixed_precision,
                                   gradient_accumulation_steps=t.gradient_accumulation_steps,
                                   log_with=cfg.output.report_to or None, project_dir=str(out),
                                   kwargs_handlers=autocast_kwargs(t.cuda_graphs))
    accelerator.print(chosen.line())  # the run's header: what it computes in, and why
    # The gate comes first: a configuration over budget is refused before data or weights are loaded.
    known = splits.label_names if splits else known_labels(cfg)
    cfg, expected, note = gate(cfg, known)
    cfg, attention = backbone.resolve_attention(cfg)  # the kernel it means is what config.yaml records
    if accelerator.is_main_process:
        fileio.guard_output_dir(out, cfg.output.overwrite_output_dir, resuming=bool(t.resume_from_checkpoint),
                                clear=False)
        nothing_to_resume(cfg, out)
    accelerator.wait_for_everyone()
    splits = splits or load_splits(cfg)
    if expected is None:
        cfg, expected, note = gate(cfg, splits.label_names)
    accelerator.print("\n".join(filter(None, [attention, note, eval_note(t)])))
    loss_fn, options = training_loss(cfg, splits, loss_fn)

    tokenizer = AutoTokenizer.from_pretrained(backbone.resolve_model_path(cfg.model.model_name_or_path),
                                              revision=cfg.model.revision)
    sampler, train_loader, val_loader = make_loaders(cfg, accelerator, splits, tokenizer)
    # total_step from the data: batches per process per epoch / accumulation x epochs (AdaLoRA's schedule needs it).
    per_epoch = steps_per_epoch(math.ceil(len(sampler) / accelerator.num_processes), t.gradient_accumulation_steps)
    total = t.max_steps if t.max_steps > 0 else math.ceil(per_epoch * t.num_train_epochs)
    world = {"num_processes": accelerator.num_processes, "per_device_train_batch_size": t.per_device_train_batch_size,
             "gradient_accumulation_steps": t.gradient_accumulation_steps, "steps_per_epoch": per_epoch,
             "total_steps": total}
    sched = phases.schedule(cfg.method, total) if cfg.method.method == "adalora" else None

    set_seed(t.seed)  # before the model: the head's and the adapters' initial weights depend on it
    model, missing = backbone.load_base(cfg, splits.label_names)
    model = methods.wrap(cfg, model, total, missing)
    prepare_adalora(cfg, model)
    fast_forward.first_token_last_layer(model)  # evaluation only: in train mode the layer runs in full
    live = check_live(model, cfg, expected)
    # after wrapping (peft has made adapters and head fp32 and trainable), before prepare (DDP, the optimizer)
    precision.store_frozen_in(model, precision.compute_dtype(accelerator.mixed_precision,
                                                             t.frozen_in_compute_dtype))
    on_gpu = accelerator.device.type == "cuda"
    capture = graphs_wanted(cfg, accelerator, custom_loss=loss_fn is not None)
    optimizer, scheduler = make_optimizer(cfg, model, total, accelerator.device, capturable=capture)
    prepared = torch.compile(model) if t.torch_compile and on_gpu else model
    prepared, optimizer, train_loader, val_loader = accelerator.prepare(prepared, optimizer, train_loader, val_loader)
    step_graphs = graphs.StepGraphs(prepared, optimizer.optimizer, t.max_grad_norm, t.per_device_train_batch_size,
                                    say=accelerator.print) if capture else None
    if cfg.output.report_to:
        accelerator.init_trackers(cfg.output.run_name or out.name, config=flat(cfg.to_dict()))
    log = MetricsLog(out / "metrics.jsonl", accelerator, enabled=accelerator.is_main_process)
    return Run(cfg, out, accelerator, splits, tokenizer, prepared, accelerator.unwrap_model(prepared), optimizer,
               scheduler, sampler, train_loader, val_loader, log, live, world, sched, loss_fn or default_loss,
               step_graphs, chosen, options)


def nothing_to_resume(cfg: Config, out: Path) -> None:
    """--resume_from_checkpoint auto in a folder holding a run but no checkpoint: refused before anything loads,
    saying why (the folder's guard would tell the user to pass the very flag they passed)."""
    if (cfg.train.resume_from_checkpoint == "auto" and not cfg.output.overwrite_output_dir
            and fileio.holds_a_run(out) and checkpoint.find("auto", out) is None):
        raise RunFolderError(f"{out} holds a run but no checkpoint to resume from (it stopped before its first "
                             "one, or ran with --save_strategy no); pass --overwrite_output_dir to train it again "
                             "from step 0")


def training_loss(cfg: Config, splits: Splits, loss_fn: LossFn | None) -> tuple[LossFn | None, dict]:
    """The loss train() steps on (None: the model's own cross-entropy) and the training options it resolved, for
    metrics.jsonl's `options` event. --class_weights and --label_smoothing_factor shape the cross-entropy of
    `budgetune train` (multi-label: --class_weights is BCE's pos_weight; Config refuses both for regression and
    smoothing beyond single-label); a caller's own loss (distillation) is refused beside them rather than silently
    kept."""
    t = cfg.train
    weights = losses.class_weights(t.class_weights, splits.train.labels, splits.label_names)
    if splits.task == tasks.MULTI_LABEL:
        weighted = losses.bce_loss(weights)
    else:
        weighted = losses.cross_entropy_loss(weights, t.label_smoothing_factor)
    if weighted is not None and loss_fn is not None:
        raise ConfigError("--class_weights and --label_smoothing_factor shape the cross entropy of `budgetune "
                          "train`; this command trains with a loss of its own (distillation): leave them unset")
    options = {"optim": t.optim, "lr_scheduler_type": t.lr_scheduler_type, "class_weights": weights,
               "label_smoothing_factor": t.label_smoothing_factor}
    return loss_fn or weighted, options


def eval_note(t) -> str:
    """What --eval_strategy no turns off, said once at the start."""
    if t.eval_strategy != "no":
        return ""
    stops = (f" --early_stopping_patience {t.early_stopping_patience} and" if t.early_stopping_patience else "")
    return (f"--eval_strategy no: no validation while training;{stops} --metric_for_best_model do not apply: the last "
            "step's adapter is shipped (scored on validation at the end)")


def graphs_wanted(cfg: Config, accelerator, custom_loss: bool) -> bool:
    """Whether --cuda_graphs will capture this run's step; where it was asked for and cannot, says why."""
    if not cfg.train.cuda_graphs:
        return False
    if (why := graphs.unsupported(cfg, accelerator, custom_loss)) is not None:
        accelerator.print(f"--cuda_graphs: {why}; training eagerly")
        return False
    return True


def autocast_kwargs(cuda_graphs: bool) -> list:
    """Under --cuda_graphs, autocast without its weight-cast cache: a cast cached outside a capture and reused
    inside it would freeze the weights the graph reads (PyTorch requires this of graphed callables). Each forward
    enters and leaves autocast today, which clears the cache; this keeps it so."""
    from accelerate.utils import AutocastKwargs

    return [AutocastKwargs(cache_enabled=False)] if cuda_graphs else []


def prepare_adalora(cfg: Config, model) -> bool:
    """AdaLoRA steps through adalora.lean_step unless --lean_adalora false: peft's step costs ~5x the operators per
    allocation and reads the masks back to the host (issue 13). Returns whether the model was switched."""
    return cfg.method.method == "adalora" and cfg.method.lean_adalora and lean_step.install(model)


def start(run: Run) -> tuple[TrainState, Best]:
    """A fresh start (the old run's files replaced, config and budget written) or the state of a checkpoint."""
    cfg, out, say = run.cfg, run.out, run.accelerator.print
    found = checkpoint.find(cfg.train.resume_from_checkpoint, out) if cfg.train.resume_from_checkpoint else None
    saved = None
    if found is not None:  # a checkpoint of another configuration or world is refused before anything is written
        saved = checkpoint.load(found)
        checkpoint.check_compatible(saved["config"], cfg.to_dict(), found, defaults=Config().to_dict())
        checkpoint.check_world(saved.get("world"), run.world, found)
        checkpoint.check_loss(saved.get("loss"), run.loss_identity, found,
                              f"Resume with {run.resume_hint}" if run.resume_hint else "")
        if saved.get("best") is None and (out / BEST_STATE).exists():  # a checkpoint from before it kept its best
            saved["best"] = checkpoint.load_weights(out / BEST_STATE, checkpoint.BEST_KEYS)
    if run.accelerator.is_main_process:
        fileio.guard_output_dir(out, cfg.output.overwrite_output_dir, resuming=found is not None)
        save_yaml(cfg, out / "config.yaml", header=f"# resolved configuration of this run\n# budgetune train "
                  f"--config {out / 'config.yaml'}\n")
        fileio.atomic_write_json(out / "budget.json", run.live.to_dict())
        say(run.live.table())
    if run.schedule is not None:
        say(run.schedule.describe())
    if saved is None:
        run.log.log("budget", step=0, **run.live.to_dict())
        run.log.log("precision", step=0, **run.precision.to_dict())
        run.log.log("options", step=0, **run.options, warmup_steps=optim.warmup_steps(cfg.train, run.total_steps))
        return TrainState(), Best()
    checkpoint.restore_model(run.inner, saved["model"])
    run.optimizer.optimizer.load_state_dict(saved["optimizer"])
    graphs.lr_on_device(run.optimizer.optimizer)
    run.scheduler.load_state_dict(saved["scheduler"])
    if saved["scaler"] is not None and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(saved["scaler"])
    checkpoint.restore_allocator(run.inner, saved["allocator"])
    checkpoint.restore_rng(saved["rng"])
    state = TrainState(**saved["progress"])
    best = saved.get("best")  # the best as of that checkpoint: best_state.pt may come from later steps
    run.log.truncate_after(state.step)
    run.log.log("precision", step=state.step, **run.precision.to_dict())  # this session's: the machine may differ
    say(f"resumed from {found} at step {state.step} (epoch {state.epoch}, batch {state.batches_done})")
    if best is None or best.get("model") is None:
        return state, Best()
    return state, Best(best["model"], best["rank_pattern"], best["metrics"])


def validate(run: Run) -> dict:
    """Validation metrics of the model as it would be saved (AdaLoRA: pruned ranks zeroed)."""
    with rank_masks.as_saved(run.inner):
        logits = predict_logits(run.model, run.val_loader, run.accelerator, len(run.splits.validation.texts),
                                desc="validation")
    return scores(logits, run.splits)


def keep_best(run: Run, state: TrainState, best: Best, m: dict) -> bool:
    """Record an evaluation; keep (and save) the adapter if it is the best so far. True if it was.

    AdaLoRA: only validations with the final rank pattern compete (adalora.Schedule.may_be_best): one from the
    warm-up or mid-pruning would ship more than target_r ranks."""
    key, task = run.cfg.train.metric_for_best_model, run.splits.task
    eligible = run.schedule is None or run.schedule.may_be_best(state.step)
    better = eligible and improves(m[key], state.best_metric, key)
    if better:
        state.best_metric, state.best_step, state.bad_evals = m[key], state.step, 0
        best.state, best.pattern = checkpoint.trainable_state(run.inner), rank_masks.rank_pattern_masks(run.inner)
        best.metrics = {**tasks.prefixed(task, m), "step": state.step, "epoch": run.epoch_of(state.step)}
        if run.accelerator.is_main_process:
            save_best(run, best)
    elif run.schedule is None or run.schedule.is_final(state.step):
        state.bad_evals += 1  # AdaLoRA: only once the rank pattern is final (pruning makes the metric dip)
    run.log.log("eval", step=state.step, epoch=run.epoch_of(state.step), eval_loss=m["loss"],
                **{k: v for k, v in tasks.prefixed(task, m).items() if k != "eval_loss"}, best=better,
                bad_evals=state.bad_evals)
    shown = tasks.DEFAULT_METRIC[task]
    run.accelerator.print(f"step {state.step}: validation {shown} {m[shown]:.4f} loss {m['loss']:.4f}"
                          + (" (best)" if better else ""))
    return better


def save_checkpoint(run: Run, state: TrainState, best: Best) -> Path:
    folder = run.out / "checkpoints" / f"step-{state.step:06d}"
    if run.accelerator.is_main_process:
        checkpoint.save(folder, model=run.inner, optimizer=run.optimizer.optimizer, scheduler=run.scheduler,
                        scaler=run.accelerator.scaler, progress=dataclasses.asdict(state),
                        config=run.cfg.to_dict(), world=run.world, keep=run.cfg.train.save_total_limit,
                        best={"model": best.state, "rank_pattern": best.pattern, "metrics": best.metrics},
                        loss=run.loss_identity)
    run.accelerator.wait_for_everyone()
    return folder


def last_checkpoint(run: Run) -> str:
    found = checkpoint.find("auto", run.out)
    return str(found) if found else "none yet"


def train_step(run: Run, batch: dict, steps_done: int) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """One micro-batch: forward, backward and, at the end of an accumulation, the optimizer and AdaLoRA steps.

    Returns (loss, grad norm or None, whether the optimizer stepped); nothing here waits for the device.
    """
    if run.graphs is not None and (replayed := run.graphs.step(batch)) is not None:
        if run.schedule is not None:
            run.graphs.expose_grads()  # the allocator reads the replayed step's gradients
        step_schedules(run, steps_done)
        run.optimizer.zero_grad(set_to_none=True)
        return replayed[0], replayed[1], True
    acc, model = run.accelerator, run.model
    with acc.accumulate(model):
        loss = run.loss_fn(model, batch)
        acc.backward(loss)
        grad_norm = None
        if acc.sync_gradients and run.cfg.train.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(model.parameters(), run.cfg.train.max_grad_norm)
        run.optimizer.step()
        stepped = acc.sync_gradients and not acc.optimizer_step_was_skipped
        if stepped:
            step_schedules(run, steps_done)
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm, stepped


def step_schedules(run: Run, steps_done: int) -> None:
    """After an optimizer step (eager or replayed): the learning rate, then AdaLoRA's allocation, which reads the
    gradients (before zero_grad)."""
    if not optim.steps_on_metric(run.scheduler):  # reduce_lr_on_plateau, greedy: after each evaluation instead
        run.scheduler.step()
    if run.schedule is not None:
        run.inner.base_model.update_and_allocate(steps_done)  # 0-based optimizer step


class StopSignal:
    """SIGINT/SIGTERM set a flag (the step in flight finishes, then a checkpoint); handlers restored on exit."""

    def __init__(self):
        self.signum: int | None = None
        self.old: dict = {}

    def __enter__(self) -> StopSignal:
        self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)

    def agreed(self, accelerator) -> int | None:
        """A signal reaches processes at different steps: all stop at the same one."""
        if accelerator.num_processes > 1:
            flag = torch.tensor([self.signum or 0], device=accelerator.device)
            self.signum = int(accelerator.gather(flag).max()) or None
        return self.signum


def fit(run: Run, state: TrainState, best: Best, stop_signal: StopSignal, on_evaluate: OnEvaluate | None) -> None:
    """The loop: train, log, validate, keep the best, checkpoint, stop early or on a signal."""
    from tqdm.auto import tqdm

    t, acc = run.cfg.train, run.accelerator
    bar = tqdm(total=run.total_steps, initial=state.step, desc="train", disable=not acc.is_main_process)
    window = Window(state)
    run.model.train()
    # a run resumed from the checkpoint of its last step, or of the validation that stopped it early, trains no more
    stop = state.step >= run.total_steps or (t.early_stopping_patience is not None
                                             and state.bad_evals >= t.early_stopping_patience)
    while not stop and state.epoch < math.ceil(run.total_steps / run.per_epoch):
        loader = epoch_loader(run, state)
        for batch in loader:
            if run.loss_fn is default_loss:
                batch.pop("idx", None)
            loss, grad_norm, stepped = train_step(run, batch, state.step)
            state.batches_done += 1
            state.samples += batch["input_ids"].shape[0] * acc.num_processes
            window.add(loss, grad_norm, stepped)
            if not acc.sync_gradients:
                continue
            state.step += 1
            bar.update(1)
            if state.step % t.logging_steps == 0 or state.step == run.total_steps:
                log_window(run, state, window, bar)
            end_of_epoch = state.batches_done >= len(run.train_loader)
            if end_of_epoch:
                state.epoch, state.batches_done = state.epoch + 1, 0
            stop = after_step(run, state, best, window, on_evaluate, end_of_epoch,
                              stop=state.step >= run.total_steps)
            # Several processes agree on a signal with a collective (a host sync): once per logging window.
            if (acc.num_processes == 1 or state.step % t.logging_steps == 0 or stop) and stop_signal.agreed(acc):
                window.check(run, state)  # a stop signal's checkpoint too: never of weights a non-finite step touched
                window.keep_in(state)
                raise interrupted(run, state, best, stop_signal.signum)
            if stop or end_of_epoch:
                break
    bar.close()


def after_step(run: Run, state: TrainState, best: Best, window: Window, on_evaluate: OnEvaluate | None,
               end_of_epoch: bool, stop: bool) -> bool:
    """What is due after an optimizer step: a validation (--eval_strategy), the last step kept as the adapter
    (--eval_strategy no), a checkpoint (--save_strategy). Whether the run stops (its last step, or patience)."""
    t = run.cfg.train
    evaluated = due_for_eval(t, state.step, end_of_epoch) or (stop and t.eval_strategy != "no")
    save = due_for_save(t, state.step, end_of_epoch, evaluated)
    if evaluated or save or stop:
        window.check(run, state)  # never validate, keep or checkpoint weights a non-finite step has touched
    if evaluated:
        stop = evaluate(run, state, best, on_evaluate) or stop
    elif stop:
        keep_last(run, state, best)
    if save:
        window.keep_in(state)
        save_checkpoint(run, state, best)
    return stop


def evaluate(run: Run, state: TrainState, best: Best, on_evaluate: OnEvaluate | None) -> bool:
    """Validate, keep the best, step a schedule that follows the metric, tell on_evaluate; whether early stopping's
    patience has run out."""
    t = run.cfg.train
    keep_best(run, state, best, m := validate(run))
    if optim.steps_on_metric(run.scheduler):  # reduce_lr_on_plateau, greedy (Hugging Face's Trainer does the same)
        run.scheduler.step(m[t.metric_for_best_model])
    if on_evaluate is not None:
        on_evaluate(state.step, {**tasks.prefixed(run.splits.task, m), "epoch": run.epoch_of(state.step),
                                 "final_ranks": run.schedule is None or run.schedule.is_final(state.step)})
    return t.early_stopping_patience is not None and state.bad_evals >= t.early_stopping_patience


def keep_last(run: Run, state: TrainState, best: Best) -> None:
    """--eval_strategy no: the last step's adapter is the one shipped; finish scores it on validation."""
    state.best_step = state.step
    best.state, best.pattern = checkpoint.trainable_state(run.inner), rank_masks.rank_pattern_masks(run.inner)
    best.metrics = {"step": state.step, "epoch": run.epoch_of(state.step)}


def interrupted(run: Run, state: TrainState, best: Best, signum: int | None) -> Interrupted:
    """A stop signal's error: the checkpoint it wrote and how to resume (none under --save_strategy no)."""
    if run.cfg.train.save_strategy == "no":
        return Interrupted(f"stopped by signal {signum} at step {state.step}; no checkpoint written "
                           "(--save_strategy no), so the run cannot be resumed")
    folder = save_checkpoint(run, state, best)
    hint = run.resume_hint or f"budgetune train --config {run.out / 'config.yaml'} --resume_from_checkpoint {run.out}"
    return Interrupted(f"stopped by signal {signum} at step {state.step}; checkpoint: {folder}. Resume with: {hint}")


def epoch_loader(run: Run, state: TrainState):
    """This epoch's batches, from where a resumed run stopped.

    accelerate's loader re-sets the sampler's epoch from its own counter, which a `break` at the end of an epoch
    never advances and skip_first_batches does not pass on: set both, so each epoch (resumed too) has its own order.
    """
    if hasattr(run.train_loader, "set_epoch"):
        run.train_loader.set_epoch(state.epoch)
    run.sampler.set_epoch(state.epoch)
    if state.batches_done:
        return run.accelerator.skip_first_batches(run.train_loader, state.batches_done)
    return run.train_loader


def due_for_eval(t, step: int, end_of_epoch: bool) -> bool:
    return (t.eval_strategy == "steps" and step % t.eval_steps == 0) or (t.eval_strategy == "epoch" and end_of_epoch)


def due_for_save(t, step: int, end_of_epoch: bool, evaluated: bool) -> bool:
    """--save_strategy: no, epoch, steps (every --save_steps), or null: at each evaluation (each epoch's end under
    --eval_strategy no) and every --save_steps when above 0."""
    every = bool(t.save_steps) and step % t.save_steps == 0
    if t.save_strategy is None:
        return (end_of_epoch if t.eval_strategy == "no" else evaluated) or every
    return {"no": False, "epoch": end_of_epoch, "steps": every}[t.save_strategy]


class Window:
    """Training loss and grad norm summed on the device between two log lines (no host sync per step)."""

    def __init__(self, state: TrainState):
        """The window a resumed run's checkpoint fell inside goes on (its loss sum and steps), else a new one."""
        carried = state.window_loss is not None
        self.loss = torch.tensor(state.window_loss, dtype=torch.float32) if carried else None
        self.n, self.grad_norm = state.window_n if carried else 0, None
        self.applied_norm = None  # the norm of the last gradient an optimizer step applied (on the device)
        self.first_step = state.window_first_step if carried else state.step + 1
        self.t0, self.samples0 = time.perf_counter(), state.samples

    def keep_in(self, state: TrainState) -> None:
        """Put the open window into the state a checkpoint saves (float32 -> float -> float32 is exact)."""
        state.window_loss = float(self.loss) if self.loss is not None else None
        state.window_n, state.window_first_step = self.n, self.first_step

    def add(self, loss: torch.Tensor, grad_norm, stepped: bool) -> None:
        self.loss = loss.float() if self.loss is None else self.loss + loss.float()
        self.n += 1
        if grad_norm is not None:
            self.grad_norm = grad_norm
            if stepped:  # fp16's scaler skips a step whose gradient overflowed: that one changed nothing
                self.applied_norm = grad_norm

    def check(self, run: Run, state: TrainState) -> float:
        """The window's mean loss, read back from the device; a non-finite one stops the run, naming the steps. So does
        a non-finite gradient an optimizer step applied: its loss was finite, but the weights it updated are not (a
        NaN's trace stays in every later gradient, so the last applied norm tells)."""
        mean = float(self.loss) / max(self.n, 1) if self.loss is not None else 0.0
        if not math.isfinite(mean):  # a NaN or inf stays one in the sum
            raise TrainingError(
                f"non-finite training loss ({mean}) between steps {self.first_step} and {state.step}; lower "
                f"--learning_rate or check the data. Last good checkpoint: {last_checkpoint(run)}")
        if self.applied_norm is not None and not math.isfinite(norm := float(self.applied_norm)):
            raise TrainingError(
                f"non-finite gradient norm ({norm}) applied by step {state.step} (its loss was finite); lower "
                f"--learning_rate or check the data. Last good checkpoint: {last_checkpoint(run)}")
        return mean

    def read(self, run: Run, state: TrainState) -> dict:
        """Read back (the one sync of a logging window) and start the next window."""
        mean = self.check(run, state)
        out = {"loss": mean, "first_step": self.first_step,
               "grad_norm": float(self.grad_norm) if self.grad_norm is not None else None,
               "samples_per_second": (state.samples - self.samples0) / max(time.perf_counter() - self.t0, 1e-9)}
        self.loss, self.n, self.first_step = None, 0, state.step + 1
        self.t0, self.samples0 = time.perf_counter(), state.samples  # the rate is this window's, not the run's
        return out


def log_window(run: Run, state: TrainState, window: Window, bar) -> None:
    w = window.read(run, state)
    run.log.log("train", step=state.step, epoch=run.epoch_of(state.step), loss=w["loss"],
                learning_rate=optim.current_lr(run.scheduler, run.optimizer), grad_norm=w["grad_norm"],
                samples_per_second=w["samples_per_second"])
    bar.set_postfix(loss=f"{w['loss']:.4f}")
    if run.schedule is not None and (pattern := rank_masks.rank_pattern(run.inner)):
        run.log.log("ranks", step=state.step, ranks=pattern)


def log_graphs(run: Run, state: TrainState) -> None:
    """What --cuda_graphs did: shapes captured and failed, steps replayed (the rest ran eagerly)."""
    g = run.graphs.summary()
    run.log.log("graphs", step=state.step, **g)
    run.accelerator.print(f"--cuda_graphs: {g['captured']} batch shape(s) captured, {g['failed']} failed; "
                          f"{g['replays']} step(s) replayed from graphs this session")


PLAIN_LOSS = {"recipe": "budgetune train"}  # the loss identity of the model's own loss


def train(cfg: Config, *, splits: Splits | None = None, loss_fn: LossFn | None = None,
          on_evaluate: OnEvaluate | None = None, resume_hint: str | None = None,
          loss_identity: dict | None = None) -> dict:
    """Train cfg's adapter; returns the best validation metrics. Writes everything into cfg.output.output_dir.

    splits: train on these tables instead of loading cfg's data (self-training, distillation add rows).
    loss_fn(model, batch): the loss instead of the model's cross-entropy; the batch keeps its `idx` column (the
    row's index into splits.train). on_evaluate(step, metrics): called after every validation with
    {eval_accuracy, eval_macro_f1, eval_loss, epoch, final_ranks} (final_ranks: False while AdaLoRA's rank pattern
    may still change, where the metric dips by design); anything it raises ends the run and propagates.
    resume_hint: how a run stopped by a signal continues, in its message (a recipe's own command; default
    `budgetune train` on the run's config.yaml, which rebuilds cfg's data and loss). loss_identity: what loss_fn is
    made of (plain values, e.g. a recipe's name, weights and the hashes of its teachers), kept in every checkpoint;
    a resume whose loss_identity differs is refused, naming the keys and then resume_hint (without loss_fn it is
    PLAIN_LOSS). Can be called many times in one
    process: signal handlers and accelerate's state are restored afterwards.
    """
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        run = setup(cfg, splits, loss_fn)
        run.resume_hint = resume_hint
        if loss_identity is None and loss_fn is None:
            loss_identity = PLAIN_LOSS  # a recipe resuming a plain run's checkpoint is refused
        run.loss_identity = loss_identity
        state, best = start(run)
        with StopSignal() as stop_signal, oom_message(run, state):
            fit(run, state, best, stop_signal, on_evaluate)
        if run.graphs is not None:
            log_graphs(run, state)
        result = finish(run, state, best)
        settle_collectives(run.accelerator)  # while the process group lives: end_training destroys it
        run.accelerator.end_training()
        return result
    finally:
        release_accelerator()
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(False)


@contextlib.contextmanager
def oom_message(run: Run, state: TrainState):
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        t = run.cfg.train
        raise TrainingError(
            f"out of GPU memory at step {state.step + 1} with --per_device_train_batch_size "
            f"{t.per_device_train_batch_size}; lower it (and raise --gradient_accumulation_steps to keep the "
            f"global batch) or lower --max_seq_length. Last good checkpoint: {last_checkpoint(run)}") from None


def flat(d: dict, prefix: str = "") -> dict:
    """Nested config -> {"group.key": scalar} for trackers."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out
