"""The user docs stay true to the code: every ``deepseek-mini ...`` command shown in
README.md and docs/ parses with the CLI's own parser, every relative link in README.md,
BENCHMARKS.md and docs/ reaches a file (and, for ``#anchor``, a heading in it), and
docs/configuration.md lists exactly the config's keys with their defaults. A renamed flag,
a moved file or a new config key then fails here instead of misleading a reader."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest

from deepseek_mini.cli.main import build_parser
from deepseek_mini.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*GUIDES, ROOT / "BENCHMARKS.md"]


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)


def _commands(path: Path) -> list[tuple[str, bool]]:
    """Every ``deepseek-mini`` invocation in the file: from code blocks (continuation lines
    joined, comments and pipes cut off), which must parse whole, and from inline code,
    which may be a fragment (``generate --speculative``) whose subcommand and flags must
    exist."""
    text = path.read_text(encoding="utf-8")
    found = []
    for block in _code_blocks(text):
        block = block.replace("\\\n", " ").replace("-m deepseek_mini ", "deepseek-mini ")
        for line in block.splitlines():
            if line.lstrip().startswith(("pip ", "from ", "import ")):
                continue
            found += [(m.group(0), True) for m in re.finditer(r"deepseek-mini\s+[^|#\n]*", line)]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [(span, False) for span in re.findall(r"`(deepseek-mini [^`]+)`", prose)]
    return [(c, whole) for c, whole in ((_clean(c), whole) for c, whole in found) if c]


def _clean(command: str) -> str:
    command = command.split("&&")[0].strip()
    # placeholders a reader substitutes: [--opt X] optional parts, "…" / "..." repetition
    command = re.sub(r"\[[^\]]*\]…?", "", command)
    command = command.replace("…", "").replace("...", "")
    return command.strip()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _parse(command: str, whole: bool = True) -> None:
    words = shlex.split(command)
    assert words[0] == "deepseek-mini"
    args = words[1:]
    if not args or args[0].startswith("-"):  # `deepseek-mini --help`, `--version`
        return
    parser = build_parser()
    sub = _subparsers(parser)
    assert args[0] in sub, f"does not parse: no command {args[0]!r}: {command}"
    if not whole:  # a fragment in prose: its flags must exist
        flags = {o for a in sub[args[0]]._actions for o in a.option_strings}
        for word in args[1:]:
            if word.startswith("--"):
                assert word.split("=")[0] in flags, f"does not parse: {word}: {command}"
        return
    try:
        parser.parse_args(args)
    except SystemExit as exc:  # argparse's exit: 0 for --help, 2 for an error
        assert exc.code == 0, f"does not parse: {command}"


@pytest.mark.parametrize("path", GUIDES, ids=lambda p: p.name)
def test_every_command_shown_parses(path: Path, capsys: pytest.CaptureFixture) -> None:
    commands = _commands(path)
    if path.name in ("README.md", "training.md", "interop.md"):
        assert commands, f"no deepseek-mini command found in {path.name}"
    for command, whole in commands:
        _parse(command, whole)
    capsys.readouterr()  # --help output


def test_a_wrong_flag_in_a_doc_would_fail() -> None:
    with pytest.raises(AssertionError, match="does not parse"):
        _parse("deepseek-mini train --config configs/tiny.yaml --no-such-flag")
    with pytest.raises(AssertionError, match="does not parse"):
        _parse("deepseek-mini generate --no-such-flag", whole=False)
    with pytest.raises(AssertionError, match="does not parse"):
        _parse("deepseek-mini no-such-command", whole=False)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_anchor_follows_github() -> None:
    assert _anchor("From random init (`configs/cpu-hour.yaml`)") == \
        "from-random-init-configscpu-houryaml"
    assert _anchor("Muon's step cost") == "muons-step-cost"
    assert _anchor("GGUF for llama.cpp and Ollama") == "gguf-for-llamacpp-and-ollama"


@pytest.mark.parametrize("path", LINKED, ids=lambda p: p.name)
def test_every_relative_link_resolves(path: Path) -> None:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links, f"no links found in {path.name}"
    for link in links:
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{path.name}: link to a missing file: {link}"
        if anchor:
            assert anchor in _anchors(file), f"{path.name}: no heading for {link}"


def _default_text(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_default_text(v) for v in value) + "]"
    if isinstance(value, str):
        return value
    return repr(value)


def test_configuration_page_lists_every_key_with_its_default() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    listed = dict(re.findall(r"^\| `(\w+\.\w+)` \| `([^`]*)` \|", text, flags=re.M))
    expected = {f"{name}.{f.name}": _default_text(getattr(kind(), f.name))
                for name, kind in SECTIONS.items() for f in dataclasses.fields(kind)}
    assert sorted(set(expected) - set(listed)) == [], "keys missing from configuration.md"
    assert sorted(set(listed) - set(expected)) == [], "configuration.md lists unknown keys"
    wrong = {k: (listed[k], v) for k, v in expected.items() if listed[k] != v}
    assert wrong == {}, "defaults in configuration.md (page, code)"


def test_no_internal_issue_numbers() -> None:
    """Users never saw the team's issue list: docs, code and configs say what the
    behaviour is instead of which issue asked for it."""
    pattern = re.compile(r"issue[ -]?[0-9]+|issues? [0-9]+", re.I)
    paths = [*LINKED]
    for folder in ("src", "tests", "configs", "benchmarks", "scripts"):
        paths += [p for p in (ROOT / folder).rglob("*")
                  if p.suffix in (".py", ".md", ".yaml", ".mjs", ".sh", ".html")]
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in paths
             for m in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert found == []


def test_no_benchmark_script_shadows_an_installed_module() -> None:
    """A script's own folder comes first on sys.path, so a benchmarks/<topic>/kernels.py
    was imported by transformers in place of the `kernels` package it probes for (an
    ImportError inside the transformers contender)."""
    installed = set(importlib.metadata.packages_distributions())
    scripts = {path.stem: path for path in (ROOT / "benchmarks").glob("*/*.py")}
    clashes = sorted(str(path.relative_to(ROOT)) for name, path in scripts.items()
                     if name in installed)
    assert clashes == []


def test_every_benchmark_names_the_section_it_fills() -> None:
    sections = _anchors(ROOT / "BENCHMARKS.md")
    scripts = [p for p in (ROOT / "benchmarks").glob("*/*.py")
               if p.parent.name not in ("helpers",) and not p.name.startswith("_")]
    assert len(scripts) > 30
    for script in scripts:
        named = re.search(r'Fills BENCHMARKS\.md, section "([^"]+)"', script.read_text())
        assert named, f"{script.relative_to(ROOT)} names no BENCHMARKS.md section"
        assert _anchor(named[1]) in sections, f"{script.relative_to(ROOT)}: no {named[1]!r}"
