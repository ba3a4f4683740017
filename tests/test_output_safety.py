"""No command removes or overwrites anything it did not create (`u2ad_jax/output_guard.py`).

Every bad output choice below is tried against a tree of user files; the tree is hashed before
and after and must come back byte for byte (files lost: 0). `synth` is killed with SIGKILL at
seeded random moments: its output then holds the previous cohort or nothing, and a cohort's
folders always agree with its participants.tsv.
"""

import hashlib
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest

from u2ad_jax import errors
from u2ad_jax import output_guard
from u2ad_jax.data import cohort

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _cli(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "u2ad_jax.cli", *map(str, args)],
                        capture_output=True, text=True, timeout=timeout, env=ENV)


def _tree(root) -> dict[str, str]:
  """{relative path: sha256} of every file under root (the user's data, to compare)."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _one_error_line(proc, *needles):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if "error:" in l]
  assert len(lines) == 1, proc.stderr
  for needle in needles:
    assert str(needle) in lines[0], (needle, lines[0])
  return lines[0]


def _synth(out, subjects, *extra):
  return _cli("synth", "--out", out, "--subjects", subjects, "--slices", 2, "--profile", "public",
              "--seed", 3, *extra)


def _subject_dirs(root):
  return sorted(n for n in os.listdir(root) if n.startswith("sub-"))


def _assert_consistent(root, expected):
  folders = _subject_dirs(root)
  assert folders == sorted(cohort.read_participants(root)) == expected, folders


# ----------------------------------------------------------------------------- the rule


def test_check_output_dir_rule(tmp_path):
  mine, empty, user = tmp_path / "mine", tmp_path / "empty", tmp_path / "user"
  empty.mkdir()
  user.mkdir()
  (user / "notes.txt").write_text("keep me")
  mine.mkdir()
  output_guard.write_marker(mine, "evaluate")
  (mine / "report.md").write_text("old")
  assert output_guard.check_output_dir(tmp_path / "new", "evaluate") == str(tmp_path / "new")
  assert output_guard.check_output_dir(empty, "evaluate") == str(empty)
  with pytest.raises(errors.InputError, match="not an output of `u2ad evaluate`"):
    output_guard.check_output_dir(user, "evaluate", overwrite=True)
  with pytest.raises(errors.InputError, match="pass --overwrite"):
    output_guard.check_output_dir(mine, "evaluate")
  with pytest.raises(errors.InputError, match="output of `u2ad evaluate`, not of `u2ad synth`"):
    output_guard.check_output_dir(mine, "synth", overwrite=True)
  assert output_guard.check_output_dir(mine, "evaluate", overwrite=True) == str(mine)
  # A file where a directory should be, and a marker that is not ours (not JSON).
  (tmp_path / "file").write_text("x")
  with pytest.raises(errors.InputError, match="not a directory"):
    output_guard.check_output_dir(tmp_path / "file", "evaluate")
  (user / output_guard.MARKER).write_text("{not json")
  with pytest.raises(errors.InputError, match="not an output"):
    output_guard.check_output_dir(user, "evaluate", overwrite=True)


def test_protected_paths_on_resolved_real_paths(tmp_path, monkeypatch):
  data = tmp_path / "data"
  (data / "sub-001").mkdir(parents=True)
  os.symlink(data, tmp_path / "link")
  monkeypatch.chdir(tmp_path)
  protected = {"--data": "data"}
  for out, relation in (("data", "is"), ("link", "is"), ("data/sub-001/x", "is inside"),
                        ("link/../data/y", "is inside"), (".", "contains"),
                        (str(tmp_path), "contains")):
    with pytest.raises(errors.UsageError, match=f"{relation} --data"):
      output_guard.check_output_dir(out, "evaluate", protected=protected)
  assert output_guard.check_output_dir("data-eval", "evaluate", protected=protected)


# ----------------------------------------------------------------------------- commands


def test_bad_outputs_lose_no_file(tmp_path):
  """Every bad --out of evaluate / synth / demo / ablate: exit 2, one line, nothing changed."""
  run, data, notes = tmp_path / "run", tmp_path / "data", tmp_path / "notes"
  (run / "checkpoints" / "100").mkdir(parents=True)
  (run / "config.json").write_text("{}")
  (run / "metrics.jsonl").write_text('{"loss": 1}\n')
  (run / "checkpoints" / "100" / "params").write_bytes(b"\x00" * 64)
  (data / "sub-001" / "anat").mkdir(parents=True)
  (data / "participants.tsv").write_text("participant_id\nsub-001\n")
  notes.mkdir()
  (notes / "notes.txt").write_text("my notes")
  before = _tree(tmp_path)
  tried = [
      (("evaluate", "--workdir", run, "--data", data, "--out", run), ("is --workdir",)),
      (("evaluate", "--workdir", run, "--data", data, "--out", run / "eval"), ("inside",)),
      (("evaluate", "--workdir", run, "--data", data, "--out", data), ("is --data",)),
      (("evaluate", "--workdir", run, "--data", data, "--out", tmp_path), ("contains",)),
      (("evaluate", "--workdir", run, "--data", data, "--out", notes, "--overwrite"),
       ("notes", "not an output")),
      (("evaluate", "--workdir", run, "--data", data, "--out", tmp_path / "e",
        "--intensity_out", tmp_path / "e" / "i"), ("--intensity_out", "inside --out")),
      (("synth", "--out", notes, "--overwrite"), ("notes", "not an output of `u2ad synth`")),
      (("synth", "--out", run), ("not an output",)),
      (("demo", "--smoke", "--out", notes, "--overwrite"), ("not an output of `u2ad demo`",)),
      (("ablate", "--public", data, "--clinical", data, "--out", data / "ab"),
       ("inside --public",)),
  ]
  for args, needles in tried:
    _one_error_line(_cli(*args), *needles)
  assert _tree(tmp_path) == before  # files lost: 0, files changed: 0
  assert not (tmp_path / "e").exists()


def test_synth_replaces_only_its_own_cohort_atomically(tmp_path):
  out = tmp_path / "cohort"
  assert _synth(out, 3).returncode == 0
  _assert_consistent(out, ["sub-001", "sub-002", "sub-003"])
  # Without --overwrite the earlier cohort is kept; with it, the new cohort replaces it whole:
  # no sub-002 / sub-003 left behind a one-subject participants.tsv.
  _one_error_line(_synth(out, 1), "pass --overwrite")
  proc = _synth(out, 1, "--overwrite")
  assert proc.returncode == 0, proc.stderr
  _assert_consistent(out, ["sub-001"])
  assert sorted(os.listdir(tmp_path)) == ["cohort"]  # no staging left beside it


def test_synth_killed_at_random_moments_leaves_old_cohort_or_nothing(tmp_path):
  """SIGKILL at seeded random moments of a running synth (first write and overwrite)."""
  rng = random.Random(14)
  old = tmp_path / "old"
  assert _synth(old, 2).returncode == 0
  old_tree = _tree(old)
  kills = 0
  fresh_dirs = []
  for attempt in range(3):
    fresh = tmp_path / f"fresh{attempt}"
    fresh_dirs.append(fresh)
    for out, extra in ((fresh, ()), (old, ("--overwrite",))):
      proc = subprocess.Popen(
          [sys.executable, "-m", "u2ad_jax.cli", "synth", "--out", str(out), "--subjects", "3",
           "--slices", "2", "--profile", "public", "--seed", str(10 + attempt), *extra],
          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
      # Wait for the first subject's progress line (writing has begun), then a random delay.
      first = proc.stderr.readline()
      assert first.startswith("[1/3]"), first
      time.sleep(rng.uniform(0.0, 0.5))
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=60)
      kills += proc.returncode == -signal.SIGKILL
      if out == fresh:
        # Nothing, or (if it finished before the kill) the complete new cohort.
        if out.exists():
          _assert_consistent(out, ["sub-001", "sub-002", "sub-003"])
      else:
        tree = _tree(out)
        if tree != old_tree:  # finished before the kill: the whole new cohort, nothing else
          _assert_consistent(out, ["sub-001", "sub-002", "sub-003"])
          old_tree = tree
  print(f"synth SIGKILLs that hit a running process: {kills} of 6")
  assert kills >= 3, "the kills came too late to test anything"
  # The next write of the same outputs clears the killed runs' staging directories.
  for out in fresh_dirs + [old]:
    proc = _synth(out, 1, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    _assert_consistent(out, ["sub-001"])
  assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in fresh_dirs + [old])


def test_cohort_whose_folders_and_table_disagree_is_refused(tmp_path):
  root = tmp_path / "c"
  for sid in ("sub-001", "sub-002", "sub-003"):
    (root / sid / "anat").mkdir(parents=True)
  (root / "participants.tsv").write_text("participant_id\thas_lesion\nsub-001\t0\n")
  with pytest.raises(errors.InputError, match="sub-002 has a folder but no row"):
    cohort.check_participants(root, ["sub-001", "sub-002", "sub-003"],
                              cohort.read_participants(root))
  with pytest.raises(errors.InputError, match="sub-004 is listed"):
    cohort.check_participants(root, ["sub-001"], {"sub-001": {}, "sub-004": {}})
  cohort.check_participants(root, ["sub-001"], cohort.read_participants(root))
  cohort.check_participants(root, ["sub-001", "sub-002"], {})  # no table: no truth, valid


def test_a_removal_killed_half_way_keeps_the_marker_for_the_next_run(tmp_path, monkeypatch):
  """The previous output set aside by a swap is deleted marker LAST, so a kill in the middle
  of that deletion leaves a leftover the next run still recognises (and removes)."""
  leftover = tmp_path / ".out.old-abc123"
  leftover.mkdir()
  output_guard.write_marker(leftover, "synth")
  (leftover / "sub-001").mkdir()
  (leftover / "sub-001" / "sub-001_T2w.nii.gz").write_text("x")
  (leftover / "participants.tsv").write_text("x")
  real_remove = os.remove

  def killed_remove(path):
    if os.path.basename(path) != output_guard.MARKER:
      raise KeyboardInterrupt  # stands for the SIGKILL arriving during the deletion
    real_remove(path)

  monkeypatch.setattr(os, "remove", killed_remove)
  with pytest.raises(KeyboardInterrupt):
    output_guard._remove_marked_tree(str(leftover))  # pylint: disable=protected-access
  monkeypatch.undo()
  assert output_guard.read_marker(leftover)["command"] == "synth"
  with output_guard.staged_directory(tmp_path / "out", "synth") as staging:
    (pathlib.Path(staging) / "participants.tsv").write_text("new")
  assert sorted(os.listdir(tmp_path)) == ["out"]
