"""The README's "Your own scans" recipes are commands that work: every `u2ad evaluate` writes
outside its inputs (the output rule refuses --out inside --workdir), the SCT worked example runs
the SCT steps in order, and the flags it uses exist."""

import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from u2ad_jax import errors
from u2ad_jax import output_guard

REPO = pathlib.Path(__file__).resolve().parents[1]


def _section():
  text = (REPO / "README.md").read_text(encoding="utf-8")
  start = text.index("## Your own scans\n")
  return text, text[start:text.index("\n## ", start + 1)]


def _commands(section):
  """Shell commands of the section's code blocks (continuation lines joined, comments off)."""
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
      line = line.split("#", 1)[0].strip()
      if line:
        commands.append(shlex.split(line.replace("[", "").replace("]", "")))
  return commands


def _flag(args, name):
  return args[args.index(name) + 1] if name in args else None


def test_every_evaluate_of_the_recipes_writes_outside_its_inputs(tmp_path, monkeypatch):
  _, section = _section()
  evaluations = [c for c in _commands(section) if c[:2] == ["u2ad", "evaluate"]]
  assert len(evaluations) >= 3
  monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
  for args in evaluations:
    # The output rule the command applies before any work (a non-existent --out is fine).
    output_guard.check_output_dir(_flag(args, "--out"), "evaluate", protected={
        "--workdir": _flag(args, "--workdir"), "--data": _flag(args, "--data"),
        "--threshold-from": _flag(args, "--threshold-from")})
  with pytest.raises(errors.UsageError, match="is inside --workdir"):  # what the old recipe did
    output_guard.check_output_dir("runs/mine/eval", "evaluate",
                                  protected={"--workdir": "runs/mine"})


def test_the_sct_worked_example_comes_first_and_in_order():
  text, section = _section()
  assert text.index("## Your own scans") < text.index("## Layout")  # near the top
  tools = [c[0] if c[0] != "u2ad" else " ".join(c[:4]) for c in _commands(section)]
  sct = [tools.index(t) for t in ("sct_deepseg_sc", "sct_label_vertebrae",
                                  "u2ad prepare --from sct")]
  assert sct == sorted(sct), tools
  # The labelled cord the example makes is the file `prepare --from sct` looks for.
  label = next(c for c in _commands(section) if c[0] == "sct_label_vertebrae")
  assert _flag(label, "-s") == "segs/t2_seg.nii.gz" and _flag(label, "-ofolder") == "segs/"
  assert "segs/t2_seg_labeled.nii.gz" in section


def test_the_flags_the_recipes_use_exist():
  _, section = _section()
  for command in ("prepare", "evaluate"):
    # Each command defines its flags in its own module (they cannot share one process).
    shown = subprocess.run([sys.executable, "-m", "u2ad_jax.cli", command, "--help"],
                           capture_output=True, text=True, timeout=120, check=True).stdout
    for args in _commands(section):
      if args[:2] == ["u2ad", command]:
        for arg in args[2:]:
          if arg.startswith("--"):
            assert f"--{arg[2:].split('=')[0]}" in shown, (arg, command)
