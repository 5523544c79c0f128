"""The documentation against the code: every ``moefpga`` command (and its options) and every
``make`` target the README shows exists, and every relative link in README.md and docs/*.md
points at a file that exists."""

import re
from pathlib import Path

import pytest

from moefpga.host.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))

_FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
_INLINE = re.compile(r"`([^`\n]+)`")
_COMMAND = re.compile(r"(?:^|[\s/])moefpga[ \t]+([a-z][\w-]*)((?:[^\n]|\\\n)*)", re.M)
_MAKE = re.compile(r"(?:^|\s)make[ \t]+([a-z][\w-]*)", re.M)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def code_text(markdown):
    """The code of a Markdown text: fenced blocks (continuation lines joined) and inline
    spans."""
    blocks = [b.replace("\\\n", " ") for b in _FENCE.findall(markdown)]
    rest = _FENCE.sub("", markdown)
    return "\n".join(blocks + _INLINE.findall(rest))


def subcommands():
    """``{command: its option strings}`` of the ``moefpga`` parser."""
    parser = build_parser()
    [sub] = [a for a in parser._actions if a.choices and a.dest == "command"]
    return {name: {o for a in p._actions for o in a.option_strings}
            for name, p in sub.choices.items()}


def make_targets():
    """The targets of the Makefile's rules (``name: ...``, not ``name := ...``)."""
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*)\s*:(?!=)", text, re.M))


def test_readme_commands_exist():
    """Every ``moefpga <command>`` in the README's code is a subcommand, and every ``--option``
    on the same line is one of that subcommand's options."""
    known = subcommands()
    shown = _COMMAND.findall(code_text(README.read_text()))
    assert len({name for name, _ in shown}) >= 5, "the README shows the commands"
    for name, rest in shown:
        assert name in known, f"README shows 'moefpga {name}', which is not a command"
        for option in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest):
            assert option in known[name], f"README shows 'moefpga {name} ... {option}'"


def test_readme_make_targets_exist():
    targets = make_targets()
    shown = set(_MAKE.findall(code_text(README.read_text())))
    assert {"demo", "test"} <= shown
    assert shown <= targets, f"README shows make targets the Makefile lacks: {shown - targets}"


def test_the_checker_sees_a_missing_command():
    """The parsing above finds a command that does not exist (so the tests can fail)."""
    shown = _COMMAND.findall(code_text("```sh\nmoefpga frobnicate --x 1\n```\n"))
    assert shown and shown[0][0] not in subcommands()
    assert "frobnicate" not in make_targets()


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_exist(path):
    """Links and images that are not URLs or anchors name files that exist."""
    for target in _LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = (path.parent / target.split("#")[0]).resolve()
        assert file.exists(), f"{path.name} links to {target}, which does not exist"
