"""The `u2ad` dispatcher: usage, unknown commands, and one-line errors for bad input."""

import os
import pathlib
import subprocess
import sys

import pytest

from u2ad_jax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]

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
  result = _run("evaluate", f"--workdir={missing}", f"--data={tmp_path / 'cohort'}",
                f"--out={tmp_path / 'o'}")
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


# ----------------------------------------------------------------------------- the contract
# exit 0 success; exit 2 and ONE line `u2ad <cmd>: error: ...` for usage / input / config
# errors; exit 1 with a traceback only for internal errors.


def _one_error_line(result, name, *needles):
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert "Traceback" not in result.stderr and "FATAL" not in result.stderr
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith(f"u2ad {name}: error: "), result.stderr
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


def test_version():
  from u2ad_jax import __version__
  result = _run("--version")
  assert result.returncode == 0 and result.stdout.strip() == f"u2ad {__version__}"


@pytest.mark.parametrize("name", ["synth", "evaluate", "demo"])
def test_stray_argument_is_the_same_error_everywhere(name, tmp_path):
  required = {"synth": ["--out", tmp_path / "s"], "demo": ["--out", tmp_path / "d"],
              "evaluate": ["--workdir", tmp_path, "--data", tmp_path, "--out", tmp_path / "e"]}
  result = _run(name, *map(str, required[name]), "stray")
  _one_error_line(result, name, "unexpected arguments: stray")
  assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, needles", [
    (["synth", "--subjects=abc", "--out=x"], ["--subjects=abc"]),
    (["synth", "--no_such_flag=1"], ["no_such_flag"]),
    (["synth"], ["--out is required"]),
    (["train", "--workdir=w"], ["--config"]),
    (["train", "--config={R}/configs/cpu.py", "--workdir=w", "--config.optim.lrr=1"],
     ["--config.optim.lrr", "lrr"]),
    (["train", "--config={R}/configs/ablation.py:method=eu_ua", "--workdir=w"], ["eu_ua"]),
    (["train", "--config={R}/configs/cpu.py:runlocl", "--workdir=w"], ["runlocl"]),
    (["train", "--config={R}/configs/no_such.py", "--workdir=w"],
     ["configs/no_such.py", "not found"]),
    (["train", "--config={R}/configs/cpu.py", "--workdir=w", "--set", "optim.lrr=1"],
     ["optim.lrr"]),
    (["train", "--config={R}/configs/cpu.py:runlocal", "--workdir=w", "--set", "optim.lrr=1"],
     ["optim.lrr"]),  # a config file with arguments is found (the error is the override's)
    (["train", "--config={R}/configs/cpu.py", "--workdir=w", "stray"], ["unexpected arguments"]),
])
def test_usage_and_config_errors_are_one_line_exit_2(args, needles, tmp_path):
  args = [a.replace("{R}", str(REPO)) for a in args]
  result = subprocess.run([sys.executable, "-m", "u2ad_jax.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=str(tmp_path),
                          env={**os.environ, "PYTHONPATH": str(REPO)})
  _one_error_line(result, args[0], *needles)
  assert list(tmp_path.iterdir()) == []  # nothing written


def test_train_set_overrides_like_config_flags():
  """`--set key=value` in train goes through the same check as in demo / ablate."""
  from u2ad_jax import config_files
  from u2ad_jax import config_lib
  config = config_files.load(str(REPO / "configs" / "cpu.py"))
  config_lib.apply_overrides(config, ["optim.lr=0.5", "stage_epochs.pretrain=3"])
  assert config.optim.lr == 0.5 and config.stage_epochs.pretrain == 3


def test_closed_pipe_ends_quietly():
  result = subprocess.run(f"'{sys.executable}' -m u2ad_jax.cli synth -h | head -1", shell=True,
                          capture_output=True, text=True, timeout=120)
  assert result.stdout.startswith("`u2ad synth`")
  assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_config_files_found_by_name_outside_the_checkout(tmp_path, monkeypatch):
  """A bare config name resolves from any directory (checkout or installed package)."""
  from u2ad_jax import config_files
  from u2ad_jax import errors
  monkeypatch.chdir(tmp_path)
  assert config_files.resolve("cpu.py").endswith("cpu.py")
  assert config_files.load("cpu.py:runlocal").model.variant == "mu"
  with pytest.raises(errors.UsageError, match="runlocl"):
    config_files.load("cpu.py:runlocl")
  with pytest.raises(errors.InputError, match="not found"):
    config_files.resolve("no_such.py")


def test_first_progress_line_has_no_nan():
  import io
  from u2ad_jax.train import progress
  stream = io.StringIO()
  p = progress.Progress("pretrain", total_steps=3, every=1, stream=stream)
  for step in range(3):
    p.update(step + 1, 0, 1, {"loss": 0.5, "image": 0.1})  # no norms reported, first step compiles
  lines = stream.getvalue().splitlines()
  assert len(lines) == 3
  assert all("nan" not in l for l in lines), lines
  assert "compiling" in lines[0] and "steps/s" in lines[-1]
  assert progress.Progress("x", 1).stream is sys.stderr  # progress is not a result
