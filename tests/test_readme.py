"""The README's code runs: its Python block is executed, its command lines name real commands and options."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# The README's Python block is written for the bundled 30-layer model; on the 2-layer tiny model only the
# layer numbers change. Each replacement must match (a README edit that drops one fails here, not silently).
TINY = {
    "model = load_model()": "model = TINY_MODEL",
    "[(21, 1), (25, 6)]": "[(1, 0), (1, 1)]",
    "resume_layers=[21]": "resume_layers=[1]",
    "start=21": "start=1",
}


def _fenced() -> list[tuple[str, str]]:
    """Every fenced block of the README in order: ``(language, text)``, fences read opening then closing."""
    blocks, language, lines = [], None, []
    for line in README.splitlines(keepends=True):
        if line.startswith("```"):
            if language is None:
                language, lines = line[3:].strip(), []
            else:
                blocks.append((language, "".join(lines)))
                language = None
        elif language is not None:
            lines.append(line)
    assert language is None, "an unclosed fence in the README"
    return blocks


def _blocks(language: str) -> list[str]:
    return [text for lang, text in _fenced() if lang == language]


def test_the_readme_has_the_blocks_this_file_checks():
    assert len(_blocks("python")) >= 1 and len(_blocks("")) >= 1 and len(_blocks("bash")) >= 1


def test_every_python_block_runs_on_a_tiny_model(_tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for block in _blocks("python"):
        code = block
        for old, new in TINY.items():
            if old in block:
                code = code.replace(old, new)
        namespace = {"TINY_MODEL": _tiny_models["llama"]}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
        model = namespace.get("model")
        if model is not None:
            assert not any(hp.fwd_hooks for hp in model.hook_dict.values()), "the README's code left a hook"
    assert all(old in "".join(_blocks("python")) for old in TINY), "a replacement no longer matches the README"
    ns = namespace  # the API block's results are what the comments say they are
    assert isinstance(ns["result"].summary(), pd.DataFrame)
    assert (tmp_path / "runs" / "bad_driving").is_dir()
    assert set(ns["ablated"].relative_to(ns["base"])) >= {"perplexity_increase"}
    assert capsys.readouterr().out.strip()  # generate_greedy's text was printed


def _command_lines() -> list[str]:
    """Every ``biasgym ...`` invocation of the README: fenced lines (with their ``[--opt]`` continuation lines)
    and inline code spans."""
    lines: list[str] = []
    for block in _blocks("") + _blocks("bash"):
        for raw in block.splitlines():
            if raw.startswith(" ") and raw.strip().startswith("[") and lines:
                lines[-1] += " " + raw.strip()
            elif raw.strip().startswith("biasgym "):
                lines.append(raw.strip())
    lines += [s for s in re.findall(r"`(biasgym [^`]+)`", README) if not s.endswith("...")]  # "biasgym -v ..."
    return lines


def _commands() -> dict[str, set[str]]:
    from biasgym_lens.study.cli import main

    return {
        name: {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
        for name, cmd in main.commands.items()
    }


def _problems(line: str, commands: dict[str, set[str]]) -> list[str]:
    """What is wrong with one README command line: an unknown command, or an option its command lacks."""
    text = line.split("#")[0]
    text = re.sub(r"^biasgym( -v| --verbose)?", "biasgym", text)  # the group's own option
    alternatives = [a.split() for a in text.removeprefix("biasgym").split(" | ")]  # "list-biases | demo"
    problems = [f"no command {a[0]!r}" for a in alternatives if a and a[0] not in commands]
    if len(alternatives) == 1 and not problems:
        name = alternatives[0][0]
        options = re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", text)
        problems += [f"`biasgym {name}` has no option {o}" for o in options if o not in commands[name] | {"--help"}]
    return problems


def test_every_command_line_of_the_readme_names_a_real_command_and_real_options():
    commands = _commands()
    lines = _command_lines()
    assert len(lines) >= 10
    assert {line: _problems(line, commands) for line in lines if _problems(line, commands)} == {}


@pytest.mark.parametrize(
    "bad,problem",
    [
        ("biasgym runn --bias late", "no command 'runn'"),
        ("biasgym run --biass late", "has no option --biass"),
        ("biasgym list-biases | list-modles", "no command 'list-modles'"),
    ],
)
def test_the_command_check_sees_a_wrong_command_or_option(bad, problem):
    assert any(problem in p for p in _problems(bad, _commands()))


def test_every_make_target_of_the_readme_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, flags=re.M))
    named = set(re.findall(r"`make ([a-z][\w-]*)", README)) | set(re.findall(r"^make ([a-z][\w-]*)", README, re.M))
    assert named and named <= targets, named - targets
