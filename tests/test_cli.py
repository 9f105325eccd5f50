"""The command line as a user reads it: every command in --help, and a run's output without noise."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, ROOT, TINY
from vaerepro import cli

COMMANDS = ("run", "reproduce", "params", "ui", "fetch", "check", "prepare", "train", "evaluate", "report")


def _vaerepro(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["vaerepro", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _help(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        cli._main([*args, "--help"])  # the parser alone: no signal handlers or logging set up here
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_command_with_a_line_and_every_option_with_help(capsys):
    out = _help([], capsys)
    listed = re.findall(r"^    (\w+)\s+\S", out, flags=re.MULTILINE)
    assert listed == list(COMMANDS), out
    for command in COMMANDS[1:]:  # `run` is Hydra's command line: vaerepro run --help is Hydra's help
        text = _help([command], capsys)
        options = re.findall(r"^  (--[\w-]+)(.*)$", text, flags=re.MULTILINE)
        assert options, text
        for name, rest in options:
            # the help text follows on the option's line or the next one
            assert rest.strip() or re.search(rf"^  {name}.*\n {{10,}}\S", text, flags=re.MULTILINE), (
                command,
                name,
            )


@pytest.mark.slow
def test_a_run_prints_each_line_once_without_adverts_warnings_or_progress_bars(tmp_path, raw_dir):
    """Off a terminal (here: pipes), `vaerepro run` prints log lines only: each once, no third-party tips or
    deprecation warnings, no progress bars (carriage returns)."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    proc = _vaerepro(["run", *TINY, f"data.raw_dir={raw_dir}", "hydra.run.dir=runs/one"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "\r" not in text
    assert not re.search(r"litlogger|Tip:|[Dd]eprecat|Warning", text), text
    # each message once (the timestamp and logger prefix aside)
    messages = [re.sub(r"^\[[^]]*\]\[[^]]*\]\[\w+\] - ", "", ln) for ln in text.splitlines() if ln.strip()]
    assert len(messages) == len(set(messages)), text
    assert any(m.startswith("log p(x) = ") for m in messages) and any(
        "compare runs in MLflow: http" in m for m in messages
    )
