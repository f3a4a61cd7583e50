"""A peft adapter folder whose weights carry an adapter scale (for use without budgetune)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from budgetune import fileio
from budgetune.inference import adapter_bundle
from budgetune.inference.loading import adapter_dir, load_model, local_sources
from budgetune.modeling import scaling


def export(run: str | Path, output: str | Path, adapter_scale: float | None = None, overwrite: bool = False) -> Path:
    """Write RUN's adapter at `adapter_scale` (None: the bundle's recorded default) into `output`, scale baked in.

    The folder loads with plain peft (`PeftModel.from_pretrained`) to the logits budgetune gives at that scale; its
    budgetune.json says adapter_scale 1 (the scale is in the weights) and baked_adapter_scale A.
    """
    source = adapter_dir(run)
    out = fileio.refuse_nonempty(output, overwrite, reads=local_sources(run))
    model, tokenizer, info = load_model(source, merge=False, adapter_scale=adapter_scale)
    scale = info.pop("applied_adapter_scale")
    scaling.bake_scale(model)
    table = {float(k): v for k, v in (info.get("adapter_scale_validation") or {}).items()}
    baked = info.get("baked_adapter_scale", 1.0) * scale  # a folder exported before carries its scale already
    with fileio.atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        adapter_bundle.portable_adapter_config(tmp, info["base_model_name_or_path"])
        tokenizer.save_pretrained(tmp)
        info.update(baked_adapter_scale=baked, exported_from=str(source))
        (tmp / adapter_bundle.BUNDLE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if (source / "README.md").is_file():
            shutil.copyfile(source / "README.md", tmp / "README.md")
        adapter_bundle.record_adapter_scale(tmp, 1.0, table, None)  # the table: the source adapter's, per scale
    print(f"wrote {out}: the adapter of {source} at scale {scale:g}, baked into its weights"
          + (f" (the trained update's scale {baked:g} in all)" if baked != scale else ""))
    return out
