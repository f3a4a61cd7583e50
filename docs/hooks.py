"""mkdocs hooks: the reference pages are generated from the code at build time, so they cannot disagree with it.

A page asks for generated text with a marker line `<!-- generated: NAME -->` (NAME: config, cli, openapi).
- config: every field of the configuration dataclasses, with its docstring (the same text `--help` prints);
- cli: `budgetune --help` and each verb's `--help`, captured from the installed console script;
- openapi: the endpoints and schemas of `budgetune serve`, from its FastAPI app (no model is loaded).
The build also publishes repository files the pages link to (bench/README.md, bench/results/, configs/) and
the OpenAPI schema (openapi.json). Pages link to those files as `../PATH` (right on GitHub); the links are
rewritten to `PATH` in the site.

Names are looked up by their public name anywhere in the budgetune package (`public`), so moving a function to
another module does not break the docs. Run `python docs/hooks.py NAME` to print one generated text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import io
import json
import os
import pkgutil
import re
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Repository files published with the site at the same relative path (links from pages: ../PATH).
PUBLISHED = ("bench/README.md", "bench/results", "configs")
MARKER = re.compile(r"^<!-- generated: ([\w-]+) -->$", re.MULTILINE)
REPO_LINK = re.compile(r"(\]\()\.\./([^)\s#]+)(#[^)\s]*)?\)")
TRAINING_OPTIONS = "training options (the recipe's keys; flat or dotted):"


@functools.cache
def public(name: str):
    """The object the budgetune package publishes under `name`, wherever its module is."""
    package = importlib.import_module("budgetune")
    if hasattr(package, name):
        return getattr(package, name)
    skipped = []
    for info in sorted(pkgutil.walk_packages(package.__path__, "budgetune."), key=lambda i: i.name):
        if info.name.rsplit(".", 1)[-1] == "__main__":  # running it would run the command line
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError as e:  # an optional extra that is not installed
            skipped.append(f"{info.name} ({e})")
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise LookupError(f"docs/hooks.py: nothing in the budgetune package is named {name!r}"
                      + (f"; not importable: {', '.join(skipped)}" if skipped else ""))


# ---- configuration reference ------------------------------------------------------------------------------------


def type_name(annotation) -> str:
    """`int | str | None` style, with YAML's `null`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) in (list, dict):
        return typing.get_origin(annotation).__name__
    return "any" if annotation is typing.Any else getattr(annotation, "__name__", str(annotation))


def default_text(f: dataclasses.Field) -> str:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return json.dumps(value) if value is None or isinstance(value, bool) else f"{value}"


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_reference() -> str:
    """Per configuration group, each option (a definition list): type, default and the field's docstring."""
    lines = []
    for group, cls in public("GROUPS").items():
        docs, hints = public("field_docs")(cls), typing.get_type_hints(cls)
        lines += [f"## `{group}`", ""]
        for f in dataclasses.fields(cls):
            lines += [f'<span id="{f.name}"></span>`--{f.name}` &nbsp; {type_name(hints[f.name])}, default '
                      f"`{default_text(f)}`", f":   {docs.get(f.name, '')}", ""]
    return "\n".join(lines)


def defaults_yaml() -> str:
    """Every key at its default, as a recipe file would hold it."""
    import yaml

    return yaml.safe_dump(public("Config")().to_dict(), sort_keys=False)


# ---- command-line reference -------------------------------------------------------------------------------------


def console_main():
    """The function behind the `budgetune` console script (pyproject's [project.scripts])."""
    from importlib.metadata import entry_points

    found = list(entry_points(group="console_scripts", name="budgetune"))
    return found[0].load() if found else public("main")


@functools.cache
def help_output(*args: str) -> str:
    """What `budgetune ARGS` prints, at a fixed width of 100 columns."""
    out, err, width = io.StringIO(), io.StringIO(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = console_main()(list(args))
            except SystemExit as e:  # argparse exits after printing help
                status = e.code
    finally:
        os.environ.pop("COLUMNS") if width is None else os.environ.__setitem__("COLUMNS", width)
    if status not in (0, None) or not out.getvalue().strip():
        raise RuntimeError(f"budgetune {' '.join(args)} exited {status}: {err.getvalue().strip()[-2000:]}")
    return out.getvalue().rstrip() + "\n"


def verbs() -> list[tuple[str, str]]:
    """(verb, one-line summary) in the order `budgetune --help` lists them."""
    listing = help_output("--help").split("commands:", 1)[-1]
    return [(m.group(1), m.group(2).strip()) for m in re.finditer(r"^  (\w+)\s+(.*)$", listing, re.MULTILINE)]


def cli_reference() -> str:
    lines = ["## `budgetune --help`", "", "```text", help_output("--help").rstrip(), "```", ""]
    for verb, summary in verbs():
        text = help_output(verb, "--help")
        shared = TRAINING_OPTIONS in text
        lines += [f"## `budgetune {verb}`", "", f"`{summary}`", "", "```text",
                  text.split(TRAINING_OPTIONS)[0].rstrip(), "```", ""]
        if shared:
            lines += [f"`budgetune {verb} --help` goes on with every training option, flat or dotted: see the "
                      "[configuration reference](configuration.md).", ""]
    return "\n".join(lines)


# ---- HTTP API (budgetune serve) ----------------------------------------------------------------------------------


@functools.cache
def openapi_schema() -> dict:
    """The OpenAPI schema of `budgetune serve`'s app, built with no adapter (nothing is loaded)."""
    app = public("create_app")(public("Registry")([], device="cpu"))
    return app.openapi()


def schema_type(s: dict) -> str:
    if "$ref" in s:
        name = s["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in s:
        return " or ".join(schema_type(a) for a in s["anyOf"])
    if s.get("type") == "array":
        return f"array of {schema_type(s.get('items', {}))}"
    return s.get("type", "any")


def schema_table(schema: dict) -> list[str]:
    required = set(schema.get("required", []))
    rows = ["| field | type | required | description |", "| --- | --- | --- | --- |"]
    for name, prop in schema.get("properties", {}).items():
        rows.append(f"| `{name}` | {cell(schema_type(prop))} | {'yes' if name in required else 'no'} | "
                    f"{cell(prop.get('description', ''))} |")
    return rows


def endpoint(path: str, method: str, op: dict) -> list[str]:
    lines = [f"### `{method.upper()} {path}`", "", op.get("description") or op.get("summary", ""), ""]
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if body:
        lines += ["Request body (JSON):", "", *schema_table(body), ""]
    answers = []
    for code, answer in op.get("responses", {}).items():
        content = next(iter(answer.get("content", {}).values()), {})
        shape = schema_type(content["schema"]) if content.get("schema") else "text"
        answers.append(f"`{code}` {answer.get('description', '')} ({shape})")
    lines += ["Answers: " + "; ".join(answers) + ".", ""]
    if op.get("security"):
        lines += ["Needs the API key when the server has one.", ""]
    return lines


def openapi_reference() -> str:
    schema = openapi_schema()
    lines = [f"*{schema['info']['description']}*", ""]
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            lines += endpoint(path, method, op)
    lines += ["### Schemas", ""]
    for name, component in schema.get("components", {}).get("schemas", {}).items():
        lines += [f"#### {name}", "", *([component["description"], ""] if component.get("description") else []),
                  *schema_table(component), ""]
    return "\n".join(lines)


GENERATORS = {"config": config_reference, "config-defaults": defaults_yaml, "cli": cli_reference,
              "openapi": openapi_reference}


# ---- mkdocs events -----------------------------------------------------------------------------------------------


def published_files() -> dict[str, Path]:
    """{path relative to the repository: file} for everything in PUBLISHED."""
    out = {}
    for entry in PUBLISHED:
        path = ROOT / entry
        for f in sorted([path] if path.is_file() else path.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                out[f.relative_to(ROOT).as_posix()] = f
    return out


def on_files(files, config):
    from mkdocs.structure.files import File

    for uri, path in published_files().items():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    files.append(File.generated(config, "openapi.json", content=json.dumps(openapi_schema(), indent=2)))
    return files


def on_page_markdown(markdown: str, page, config, files):
    def generate(m: re.Match) -> str:
        if m.group(1) not in GENERATORS:
            raise KeyError(f"{page.file.src_uri}: unknown generated section {m.group(1)!r} "
                           f"(known: {', '.join(GENERATORS)})")
        return GENERATORS[m.group(1)]()

    published = published_files()

    def repo_link(m: re.Match) -> str:
        target = m.group(2)
        return f"{m.group(1)}{target}{m.group(3) or ''})" if target in published else m.group(0)

    markdown = MARKER.sub(generate, markdown)
    return REPO_LINK.sub(repo_link, markdown) if "/" not in page.file.src_uri else markdown


if __name__ == "__main__":
    print(GENERATORS[sys.argv[1]]() if len(sys.argv) > 1 else f"usage: python docs/hooks.py {'|'.join(GENERATORS)}")
