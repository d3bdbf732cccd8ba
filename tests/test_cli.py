"""The ``analytics-pipeline`` command: help texts, and one-line errors with exit code 2 for bad configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO

from analytics_pipeline import main as cli

COMMAND = [sys.executable, "-m", "analytics_pipeline"]


def _available() -> list[str]:
    return [name for name in cli.SUBCOMMANDS if cli._load(name) is not None]


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() configures the root logger; in-process calls must not take pytest's handlers away."""
    monkeypatch.setattr(cli, "setup_logging", lambda *args: None)
    monkeypatch.delenv("ANALYTICS_CONFIG", raising=False)


def test_top_level_help_lists_every_command() -> None:
    result = subprocess.run([*COMMAND, "--help"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0
    for name, (_, summary) in cli.SUBCOMMANDS.items():
        assert name in result.stdout and summary.split()[0] in result.stdout
    assert "REDIS_URL" in result.stdout


@pytest.mark.parametrize("name", _available())
def test_each_available_subcommand_explains_itself(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([name, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert f"analytics-pipeline {name}" in out
    assert "--config" in out and "--log-format" in out
    assert len(out.splitlines()) > 8


def test_sidecar_help_names_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["sidecar", "--help"])
    out = capsys.readouterr().out
    for word in ("--host", "--port", "/v1/events", "/v1/batch", "Retry-After"):
        assert word in out


@pytest.mark.parametrize(("content", "words"), [
    ("counters:\n  ttl: 5\n", "counters.ttl: unknown key"),
    ("server:\n  port: eighty\n", "server.port: must be an integer, got 'eighty'"),
    ("server: [unclosed\n", "not valid YAML"),
    ("- a list\n", "top level must be a mapping"),
    ("counters:\n  granularities: [weekly]\n", "counters.granularities.0"),
])
def test_bad_config_file_is_one_line_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      content: str, words: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert cli.main(["sidecar", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("analytics-pipeline: configuration error: ")
    assert words in err and str(path) in err


def test_unreadable_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sidecar", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "cannot read config file" in err and err.count("\n") == 1
    assert cli.main(["sidecar", "--config", str(tmp_path)]) == 2  # a directory
    assert "cannot read config file" in capsys.readouterr().err


def test_bad_port_option_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sidecar", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "server.port" in err and err.count("\n") == 1


def test_bad_config_through_the_real_command(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("ingest:\n  max_batch_events: lots\n")
    result = subprocess.run([*COMMAND, "sidecar", "--config", str(path)], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "ingest.max_batch_events" in result.stderr
