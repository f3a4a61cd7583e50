"""The docs: a short README whose links resolve, and generated references (docs/hooks.py) that cover the code."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from budgetune.config import Config, field_docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("budgetune_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the rest belongs in docs/"


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    local = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    assert local, "the README links to the docs"
    missing = [t for t in local if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_keeps_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install -e . && budgetune demo" in text
    assert "    bash .ci/run\n" in text


def test_config_reference_names_every_field_with_its_help(hooks):
    reference = hooks.config_reference()
    for group in dataclasses.fields(Config):
        cls = group.default_factory
        docs = field_docs(cls)
        assert f"## `{group.name}`" in reference
        for f in dataclasses.fields(cls):
            assert f"`--{f.name}`" in reference, f"--{f.name} is missing from the configuration reference"
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring (its help text)"
            assert docs[f.name] in reference, f"--{f.name}'s help text is missing from the configuration reference"
    defaults = yaml.safe_load(hooks.defaults_yaml())
    assert defaults == Config().to_dict()


def test_cli_reference_has_every_verb(hooks):
    from budgetune.cli.commands import MODULE_VERBS

    listed = [verb for verb, _ in hooks.verbs()]
    assert sorted(listed) == sorted(MODULE_VERBS), "budgetune --help lists every verb"
    reference = hooks.cli_reference()
    for verb in listed:
        assert f"## `budgetune {verb}`" in reference
    assert "--no_dynamic_batching" in reference and "--teacher RUN" in reference  # argparse verbs' own flags
    assert "--num_labels" in reference  # params/plan: their own options, before the shared training options


def test_openapi_reference_has_every_endpoint(hooks):
    pytest.importorskip("fastapi")
    schema = hooks.openapi_schema()
    reference = hooks.openapi_reference()
    for path, ops in schema["paths"].items():
        for method in ops:
            assert f"### `{method.upper()} {path}`" in reference
    assert {"/v1/classify", "/v1/adapters", "/health", "/metrics"} <= set(schema["paths"])


def nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in nav_pages(item)]
    return [p for value in nav.values() for p in nav_pages(value)]


def test_every_docs_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = set(nav_pages(config["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - nav == set(), "pages left out of the nav (add them, or exclude them in mkdocs.yml)"
    generated = {p for p in nav if not (DOCS / p).is_file()}
    assert generated == {"bench/README.md"}  # published from the repository by docs/hooks.py
    assert set(config["hooks"]) == {"docs/hooks.py"}
