"""The `u2ad` dispatcher: usage, unknown commands, and one-line errors for bad input."""

import subprocess
import sys

import pytest

from u2ad_jax import cli


def _run(*args):
  return subprocess.run([sys.executable, "-m", "u2ad_jax.cli", *args],
                        capture_output=True, text=True, timeout=120)


def test_usage_lists_every_command(capsys):
  with pytest.raises(SystemExit) as e:
    cli.run(["u2ad", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for name in cli.COMMANDS:
    assert name in out


def test_no_command_is_an_error(capsys):
  with pytest.raises(SystemExit) as e:
    cli.run(["u2ad"])
  assert e.value.code == 2


def test_unknown_command_exits_2(capsys):
  with pytest.raises(SystemExit) as e:
    cli.run(["u2ad", "frobnicate"])
  assert e.value.code == 2
  assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_help(name):
  # One process per command: each module defines absl flags at import (e.g. several --out).
  result = _run(name, "--help")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  # The subcommand's own flags are listed (every command has at least one), not the dispatcher's.
  assert "--" in result.stdout and "u2ad <subcommand>" not in result.stdout


def test_bad_input_is_one_line_and_exit_2(tmp_path):
  missing = tmp_path / "no_such_run"
  result = _run("evaluate", f"--workdir={missing}", f"--data={tmp_path}", f"--out={tmp_path / 'o'}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  error_lines = [l for l in result.stderr.splitlines() if "error:" in l]
  assert len(error_lines) == 1 and str(missing) in error_lines[0]
  assert not (tmp_path / "o").exists()


def test_bad_config_override_fails_before_any_work(tmp_path):
  """`u2ad demo --set` with a typo: one error line naming the key, nothing generated."""
  out = tmp_path / "demo"
  result = _run("demo", f"--out={out}", "--set", "stage_epochs.pretrian=3")
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  error_lines = [l for l in result.stderr.splitlines() if "error:" in l]
  assert len(error_lines) == 1 and "stage_epochs.pretrian" in error_lines[0]
  assert not out.exists()
