"""No command removes or overwrites anything it did not create (`u2ad_jax/output_guard.py`).

Every bad output choice below is tried against a tree of user files; the tree is hashed before
and after and must come back byte for byte (files lost: 0). `synth` is killed with SIGKILL at
seeded random moments: its output then holds the previous cohort or nothing, and a cohort's
folders always agree with its participants.tsv. The holes of issue 22, one test each: a symlinked
--out, a copied marker, a user's file inside a previous output, `--out .`, a resumed study's
protected paths, a swap killed between setting the previous output aside and moving the new in.
"""

import hashlib
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import textwrap
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


def _write_output(out, command, files, overwrite=False):
  """What a staged command does: the check first, then `files` ({relative path: text}) written
  through the staged swap."""
  output_guard.check_output_dir(out, command, overwrite=overwrite)
  with output_guard.staged_directory(out, command) as staging:
    for rel, text in files.items():
      path = pathlib.Path(staging, rel)
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(text)


def _files(root):
  """{relative path: text} of the files under root, the marker aside."""
  return {os.path.relpath(os.path.join(d, n), root): pathlib.Path(d, n).read_text()
          for d, _, names in os.walk(root) for n in names if n != output_guard.MARKER}


def test_check_output_dir_rule(tmp_path):
  mine, empty, user = tmp_path / "mine", tmp_path / "empty", tmp_path / "user"
  empty.mkdir()
  user.mkdir()
  (user / "notes.txt").write_text("keep me")
  _write_output(mine, "evaluate", {"report.md": "old"})
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
  of that deletion leaves a leftover the next run still recognises (and removes); flagged as
  being removed, it is never moved back as the previous output."""
  out = tmp_path / "out"
  _write_output(out, "synth", {"sub-001/sub-001_T2w.nii.gz": "x", "participants.tsv": "x"})
  leftover = tmp_path / ".out.old-abc123"
  os.rename(out, leftover)
  real_remove = os.remove

  def killed_remove(path):
    if os.path.basename(path) != output_guard.MARKER:
      raise KeyboardInterrupt  # stands for the SIGKILL arriving during the deletion
    real_remove(path)

  monkeypatch.setattr(os, "remove", killed_remove)
  with pytest.raises(KeyboardInterrupt):
    output_guard._remove_output(str(leftover))  # pylint: disable=protected-access
  monkeypatch.undo()
  assert output_guard.read_marker(leftover)["removing"] is True
  assert output_guard.check_output_dir(out, "synth") == str(out)  # not put back: half deleted
  with output_guard.staged_directory(out, "synth") as staging:
    (pathlib.Path(staging) / "participants.tsv").write_text("new")
  assert sorted(os.listdir(tmp_path)) == ["out"]


# ----------------------------------------------------------------------------- issue 22: the holes


def test_symlinked_out_is_replaced_through_the_link(tmp_path):
  """`latest -> bigdisk/run1` with --overwrite: run1 is replaced in place, the link stays a link
  to it, and nothing is left beside either."""
  run1 = tmp_path / "bigdisk" / "run1"
  _write_output(run1, "synth", {"participants.tsv": "old", "sub-001/a.nii.gz": "old"})
  latest = tmp_path / "latest"
  os.symlink(os.path.join("bigdisk", "run1"), latest)
  _write_output(latest, "synth", {"participants.tsv": "new"}, overwrite=True)
  assert os.path.islink(latest) and os.readlink(latest) == os.path.join("bigdisk", "run1")
  assert _files(run1) == {"participants.tsv": "new"}
  assert sorted(os.listdir(tmp_path)) == ["bigdisk", "latest"]
  assert os.listdir(tmp_path / "bigdisk") == ["run1"]
  # The marker records the directory the output really is in.
  assert output_guard.read_marker(run1)["directory"] == os.path.realpath(run1)


def test_a_marker_copied_into_a_foreign_folder_proves_nothing(tmp_path):
  """A .u2ad-output.json copied into a user's folder (even one whose files the listing would
  name) authorises nothing: --overwrite refuses with one line, every file stays."""
  _write_output(tmp_path / "eval", "evaluate", {"report.md": "r", "figures/roc.png": "p"})
  mine = tmp_path / "mine"
  (mine / "figures").mkdir(parents=True)
  (mine / "report.md").write_text("my own report")
  (mine / "figures" / "roc.png").write_text("my own figure")
  shutil.copy(tmp_path / "eval" / output_guard.MARKER, mine / output_guard.MARKER)
  before = _tree(mine)
  with pytest.raises(errors.InputError, match=r"written in .*eval, not here \(a copy\)"):
    output_guard.check_output_dir(mine, "evaluate", overwrite=True)
  with pytest.raises(errors.InputError, match="left untouched"):
    with output_guard.staged_directory(mine, "evaluate"):
      pass
  # The same for a command that writes into its folder (demo): a copied marker is not a demo.
  demo = tmp_path / "demo"
  demo.mkdir()
  output_guard.write_marker(demo, "demo")
  (mine / output_guard.MARKER).write_bytes((demo / output_guard.MARKER).read_bytes())
  with pytest.raises(errors.InputError, match="not here"):
    output_guard.check_output_dir(mine, "demo", overwrite=True, swapped=False)
  # From the command line: exit 2, one line naming the folder.
  shutil.copy(tmp_path / "eval" / output_guard.MARKER, mine / output_guard.MARKER)
  (mine / output_guard.MARKER).write_text(
      (mine / output_guard.MARKER).read_text().replace('"evaluate"', '"synth"'))
  _one_error_line(_cli("synth", "--out", mine, "--overwrite", "--subjects", 1), mine, "not here")
  del before[output_guard.MARKER]
  after = _tree(mine)
  del after[output_guard.MARKER]
  assert after == before  # files lost: 0, subfolders included


def test_a_file_added_inside_a_previous_output_stops_overwrite(tmp_path):
  """Only what the command wrote may be deleted: a user's file inside a previous output makes
  --overwrite refuse, naming it, before any work and again at the swap."""
  out = tmp_path / "eval"
  _write_output(out, "evaluate", {"report.md": "old", "subjects/sub-001/scores.json": "{}"})
  (out / "subjects" / "sub-001" / "my_notes.txt").write_text("mine")
  with pytest.raises(errors.InputError, match="holds subjects/sub-001/my_notes.txt, which "
                                              "`u2ad evaluate` did not write"):
    output_guard.check_output_dir(out, "evaluate", overwrite=True)
  (out / "subjects" / "sub-001" / "my_notes.txt").unlink()
  output_guard.check_output_dir(out, "evaluate", overwrite=True)
  # Added while the command runs (after its check): the swap refuses, the old output stays.
  with pytest.raises(errors.InputError, match="holds figures, which"):
    with output_guard.staged_directory(out, "evaluate") as staging:
      (pathlib.Path(staging) / "report.md").write_text("new")
      (out / "figures").mkdir()
  assert _files(out) == {"report.md": "old", "subjects/sub-001/scores.json": "{}"}
  assert sorted(os.listdir(tmp_path)) == ["eval"]
  # In a folder that is written into (a demo), its staged sub-outputs are checked up front.
  demo = tmp_path / "demo"
  demo.mkdir()
  output_guard.write_marker(demo, "demo")
  _write_output(demo / "evaluation", "evaluate", {"report.md": "r"})
  (demo / "notes.txt").write_text("a demo keeps files beside its outputs")
  assert output_guard.check_output_dir(demo, "demo", overwrite=True, swapped=False)
  (demo / "evaluation" / "notes.txt").write_text("but not inside them")
  with pytest.raises(errors.InputError, match="evaluation holds notes.txt"):
    output_guard.check_output_dir(demo, "demo", overwrite=True, swapped=False)


def test_out_dot_is_refused(tmp_path):
  """`--out .` (or an output holding the current directory) on a previous output: replacing it
  would pull the directory out from under the shell. Exit 2, one line, nothing changed."""
  out = tmp_path / "cohort"
  _write_output(out, "synth", {"participants.tsv": "old", "sub-001/x.nii.gz": "old"})
  before = _tree(tmp_path)
  proc = subprocess.run([sys.executable, "-m", "u2ad_jax.cli", "synth", "--out", ".",
                         "--overwrite", "--subjects", "1", "--slices", "2"], cwd=out,
                        capture_output=True, text=True, timeout=120, env=ENV)
  _one_error_line(proc, "is the current directory", "--out cohort")
  assert _tree(tmp_path) == before
  for where, needle in ((out, "is the current directory"),
                        (out / "sub-001", "contains the current directory")):
    os.chdir(where)
    try:
      with pytest.raises(errors.UsageError, match=needle):
        output_guard.check_output_dir(out, "synth", overwrite=True)
    finally:
      os.chdir(tmp_path)


def test_study_checks_its_protected_paths_when_resuming(tmp_path, monkeypatch):
  """A folder that already holds a study still may not contain the study's inputs."""
  from u2ad_jax.workflows import study

  def began(*args, **kwargs):
    raise AssertionError("the study began instead of refusing its --out")
  monkeypatch.setattr(study, "make_study_cohorts", began)
  out = tmp_path / "study"
  out.mkdir()
  output_guard.write_marker(out, "study")
  public = out / "public"
  public.mkdir()
  with pytest.raises(errors.UsageError, match="contains --public"):
    study.run_study(out, [0], public_dir=str(public), smoke=True, verbose=False)
  # A copied study marker is not a study either.
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "thesis.tex").write_text("mine")
  shutil.copy(out / output_guard.MARKER, foreign / output_guard.MARKER)
  with pytest.raises(errors.InputError, match="not here"):
    study.run_study(foreign, [0], smoke=True, verbose=False)


KILLED_SWAP = textwrap.dedent("""
    import os, signal, sys
    from u2ad_jax import output_guard
    real_replace = os.replace

    def replace(src, dst):
      if ".staging-" in os.path.basename(src):  # the move-in, after the set-aside
        os.kill(os.getpid(), signal.SIGKILL)
      return real_replace(src, dst)
    os.replace = replace
    output_guard.check_output_dir(sys.argv[1], "synth", overwrite=True)
    with output_guard.staged_directory(sys.argv[1], "synth") as staging:
      with open(os.path.join(staging, "participants.tsv"), "w") as f:
        f.write("new")
""")


def test_a_swap_killed_between_set_aside_and_move_in_gets_the_previous_output_back(tmp_path):
  out = tmp_path / "cohort"
  _write_output(out, "synth", {"participants.tsv": "old", "sub-001/x.nii.gz": "old"})
  proc = subprocess.run([sys.executable, "-c", KILLED_SWAP, str(out)], capture_output=True,
                        text=True, timeout=120, env=ENV)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  assert not out.exists()  # killed with the previous output set aside, the new one not in
  # The next run puts the previous output back first; without --overwrite it stays.
  with pytest.raises(errors.InputError, match="pass --overwrite"):
    output_guard.check_output_dir(out, "synth")
  assert _files(out) == {"participants.tsv": "old", "sub-001/x.nii.gz": "old"}
  _write_output(out, "synth", {"participants.tsv": "new"}, overwrite=True)
  assert _files(out) == {"participants.tsv": "new"}
  assert sorted(os.listdir(tmp_path)) == ["cohort"]
  # An exception (not a kill) at the same moment puts it back at once.
  real_replace = os.replace

  def interrupted(src, dst):
    if ".staging-" in os.path.basename(src):
      raise KeyboardInterrupt
    return real_replace(src, dst)
  os.replace = interrupted
  try:
    with pytest.raises(KeyboardInterrupt):
      _write_output(out, "synth", {"participants.tsv": "newer"}, overwrite=True)
  finally:
    os.replace = real_replace
  assert _files(out) == {"participants.tsv": "new"}
  assert sorted(os.listdir(tmp_path)) == ["cohort"]
