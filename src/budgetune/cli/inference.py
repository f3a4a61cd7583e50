"""`budgetune evaluate`, `budgetune predict` and `budgetune export`: a trained adapter on labelled files, on
unlabelled texts, and saved for use without budgetune (a peft adapter with its scale baked in, a merged
transformers model, or ONNX)."""

from __future__ import annotations

import argparse
from pathlib import Path

from budgetune.cli.parsing import parse, parser
from budgetune.errors import ConfigError


def add_inference_options(p: argparse.ArgumentParser) -> None:
    """The options evaluate and predict share; `inference_recipe` fills their defaults."""
    p.add_argument("run", help="run folder or adapter folder")
    p.add_argument("--text_column_name")
    p.add_argument("--text_pair_column_name", help="the column of each row's second text, for a model trained on "
                   "text pairs (default: the column it was trained with, recorded in its bundle)")
    p.add_argument("--per_device_eval_batch_size", type=int,
                   help="texts per batch (default: the recipe's, 256; on CPU also capped at 2048 padded tokens)")
    p.add_argument("--config", help="a recipe (YAML) whose text_column_name, label_column_name, "
                   "per_device_eval_batch_size and cache_dir are the defaults")
    p.add_argument("--precision", default="auto", help=PRECISION_HELP)


PRECISION_HELP = ("what the model computes in: auto (default: the bundle's choice measured when training finished, "
                  "the fastest precision within --inference_precision_tolerance points of fp32 on validation; a "
                  "bundle without one: bf16 on a CPU with native bf16 matrix instructions, else fp32), fp32, bf16 "
                  "(autocast; a device without native bf16 runs fp32 and says so) or int8 (CPU only: onnxruntime's "
                  "dynamic int8 where the [onnx] extra is installed, its graph built once per bundle and adapter "
                  "scale and cached in ~/.cache/budgetune/onnx-int8; else torch's dynamic quantization of the "
                  "encoder's Linear layers). The first line printed says which")


def inference_recipe(a: argparse.Namespace):
    """The --config recipe (defaults without one); fills the shared options the user did not give."""
    from budgetune.config import Config, resolve

    recipe = resolve(a.config, []) if a.config else Config()
    a.text_column_name = a.text_column_name or recipe.data.text_column_name
    a.text_pair_column_name = a.text_pair_column_name or recipe.data.text_pair_column_name
    a.per_device_eval_batch_size = a.per_device_eval_batch_size or recipe.train.per_device_eval_batch_size
    return recipe


def evaluate_parser() -> argparse.ArgumentParser:
    p = parser("evaluate", "Metrics of a run's best adapter on labelled files. With several --data_file or several "
               "--adapter_scale values: one table (accuracy and macro-F1 per file per scale), a JSON report and a "
               "plot of accuracy against scale, written to OUTPUT.{txt,json,png} (default RUN/evaluation-scales).")
    add_inference_options(p)
    p.add_argument("--data_file", required=True, action="append",
                   help="labelled file (csv, tsv, json, jsonl, parquet, pkl); repeat for several files")
    p.add_argument("--label_column_name")
    p.add_argument("--label_delimiter", help="multi_label: the string between a cell's labels (default: the one the "
                   "model was trained with; without one, each cell is a JSON array)")
    p.add_argument("--adapter_scale", help="scale(s) of the adapter's update in [0, 1], comma-separated "
                   "(e.g. 0,0.25,0.5,0.75,1); default: the scale recorded in the bundle, else 1 (as trained)")
    p.add_argument("--output", help="path stem of the reports (default: RUN/evaluation-STEM for one file at "
                   "one scale, RUN/evaluation-scales otherwise)")
    p.add_argument("--compare", metavar="RUN_B", help="a second run scored on the same file (one --data_file, each "
                   "run at its bundle's adapter scale and, with --precision auto, its bundle's measured precision; a "
                   "pair run reads its text pairs): accuracy of each, the difference RUN - RUN_B in points with "
                   "a 95%% paired bootstrap interval, and McNemar's exact test; written to "
                   "RUN/evaluation-compare-STEM.{json,txt} (or --output)")
    return p


def evaluate_command(argv: list[str]) -> int:
    from budgetune.inference.evaluate import compare, evaluate, evaluate_scales
    from budgetune.inference.loading import bundle_info, bundle_scale
    from budgetune.modeling import scaling

    a = parse(evaluate_parser(), argv)
    recipe = inference_recipe(a)
    scales = scaling.parse_scales(a.adapter_scale) if a.adapter_scale is not None else None
    common = {"text_column": a.text_column_name, "label_column": a.label_column_name or recipe.data.label_column_name,
              "batch_size": a.per_device_eval_batch_size, "output": a.output, "cache_dir": recipe.data.cache_dir,
              "precision": a.precision}
    if a.compare is not None:
        if len(a.data_file) != 1 or a.adapter_scale is not None:
            raise ConfigError("--compare takes one --data_file and no --adapter_scale (each run is scored at its "
                              "bundle's adapter scale)")
        compare(a.run, a.compare, a.data_file[0], text_pair_column=a.text_pair_column_name, **common)
        return 0
    common.update(text_pair_column=a.text_pair_column_name,
                  label_delimiter=a.label_delimiter or recipe.data.label_delimiter)
    if len(a.data_file) == 1 and (scales is None or len(scales) == 1):
        evaluate(a.run, a.data_file[0], adapter_scale=scales[0] if scales else None, **common)
    else:
        evaluate_scales(a.run, a.data_file, scales or [bundle_scale(bundle_info(a.run))], **common)
    return 0


def predict_parser() -> argparse.ArgumentParser:
    p = parser("predict", "A Kaggle-style submission (ID,Label, input order) for unlabelled texts.")
    add_inference_options(p)
    p.add_argument("--input", required=True, help="texts: csv, tsv, json, jsonl, parquet or pkl (pickled Dataset)")
    p.add_argument("--output", help="submission CSV (default: RUN/submission.csv)")
    p.add_argument("--label_format", choices=("int", "name"), default="int")
    p.add_argument("--adapter_scale", help="scale of the adapter's update in [0, 1] (0 = the pretrained model, "
                   "1 = as trained); default: the scale recorded in the bundle, else 1")
    p.add_argument("--id_column", help="a column of the input whose values are written as the IDs (default: the "
                   "rows' positions 0..n-1)")
    p.add_argument("--probabilities", action="store_true",
                   help="add one probability column per class (multi_label: per label, its sigmoid), named by its "
                   "label")
    return p


def predict_command(argv: list[str]) -> int:
    from budgetune.inference.predict import predict
    from budgetune.modeling import scaling

    a = parse(predict_parser(), argv)
    recipe = inference_recipe(a)
    scale = scaling.one_scale(a.adapter_scale, "predict")
    predict(a.run, a.input, a.output or str(Path(a.run) / "submission.csv"), text_column=a.text_column_name,
            label_format=a.label_format, batch_size=a.per_device_eval_batch_size, adapter_scale=scale,
            probabilities=a.probabilities, id_column=a.id_column, cache_dir=recipe.data.cache_dir,
            text_pair_column=a.text_pair_column_name, precision=a.precision)
    return 0


def export_parser() -> argparse.ArgumentParser:
    p = parser("export", "Save a run for use without budgetune. By default its adapter with the adapter scale baked "
               "into the weights: a peft adapter folder (plus tokenizer, budgetune.json and model card) that plain "
               "peft loads to the same logits. --merge: a plain transformers model folder; --format onnx: an ONNX "
               "model for onnxruntime.")
    p.add_argument("run", help="run folder or adapter folder")
    p.add_argument("--output", required=True, help="the folder to write")
    p.add_argument("--adapter_scale", help="scale in [0, 1] (default: the scale recorded in the bundle, else 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights (peft's "
                   "merge_and_unload) and write a transformers model folder: safetensors weights with the trained "
                   "head, config.json with id2label/label2id, tokenizer, model card; "
                   "AutoModelForSequenceClassification.from_pretrained loads it without budgetune or peft")
    p.add_argument("--format", choices=FORMATS, default="safetensors", help="safetensors: the peft adapter (or, "
                   "with --merge, the merged model); onnx: the merged model as OUTPUT/model.onnx (dynamic batch and "
                   "sequence axes, label names in its metadata) with tokenizer and config.json, for onnxruntime "
                   "(needs pip install 'budgetune[onnx]')")
    p.add_argument("--quantize", choices=("int8",), help="with --format onnx: also write model_int8.onnx, its "
                   "Linear weights int8 and activations quantized dynamically (onnxruntime's quantize_dynamic)")
    return p


FORMATS = ("safetensors", "onnx")


def export_command(argv: list[str]) -> int:
    from budgetune.modeling import scaling

    a = parse(export_parser(), argv)
    scale = scaling.one_scale(a.adapter_scale, "export")
    if a.quantize is not None and a.format != "onnx":
        raise ConfigError(f"--quantize {a.quantize} needs --format onnx (it quantizes the ONNX model)")
    if a.format == "onnx":
        from budgetune.inference.export_onnx import export_onnx

        export_onnx(a.run, a.output, scale, quantize=a.quantize, overwrite=a.overwrite)
    elif a.merge:
        from budgetune.inference.export_merged import export_merged

        export_merged(a.run, a.output, scale, overwrite=a.overwrite)
    else:
        from budgetune.inference.export import export

        export(a.run, a.output, scale, overwrite=a.overwrite)
    return 0
