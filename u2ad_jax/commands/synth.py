"""`u2ad synth`: write a synthetic cervical-spine cohort (NIfTI, BIDS-like) and summarise it.

  u2ad synth --out DIR --subjects N --profile {public,clinical} --seed S [--lesion-fraction F]
      [--overwrite]

Prints one progress line per subject (stderr) and, at the end, the cohort summary (stdout):
subjects, slices, lesion subjects and lesions by grade and by segment, and the generation speed.
DIR must be missing, empty or (with --overwrite) a cohort written by `u2ad synth`; the cohort is
written into a staging directory beside DIR and swapped in when complete, so DIR always holds the
old cohort or the new one, never a mix.
"""

from __future__ import annotations

import collections
import os
import sys
import time

from absl import flags

from u2ad_jax import errors
from u2ad_jax import labels
from u2ad_jax import output_guard
from u2ad_jax.phantom import cohort_writer
from u2ad_jax.phantom import generator

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "cohort root directory to write (created)")
flags.DEFINE_bool("overwrite", False, "replace DIR when it holds a cohort written by u2ad synth")
flags.DEFINE_integer("subjects", 8, "number of subjects", lower_bound=1)
flags.DEFINE_enum("profile", "clinical", sorted(generator.PROFILES), "scanner profile")
flags.DEFINE_integer("seed", 0, "cohort seed (same seed -> identical files)")
flags.DEFINE_float("lesion_fraction", None,
                   "fraction of subjects with lesions (default: 0.5 clinical, 0.0 public)",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_alias("lesion-fraction", "lesion_fraction")
flags.DEFINE_integer("slices", None, "override the profile's number of sagittal slices", lower_bound=1)
# Real-anatomy benchmark (u2ad_jax/phantom/pseudo_patients.py).
flags.DEFINE_string("from_slices", None,
                    "build pseudo-patients from the labelled real slices in this folder (.npy "
                    "release slices or a cohort in our layout) instead of the phantom")
flags.DEFINE_alias("from-slices", "from_slices")
flags.DEFINE_bool("healthy", False, "with --from-slices: pseudo-healthy cohort (lesion fraction 0)")


def summarize(subjects: list[generator.Subject], seconds: float) -> str:
  """Multi-line summary of a generated cohort."""
  num_slices = sum(s.num_slices for s in subjects)
  by_grade = collections.Counter()
  by_segment = collections.Counter()
  subject_grades = collections.Counter()
  for s in subjects:
    subject_grades[s.truth["grade"]] += 1
    for lesion in s.lesions:
      by_grade[lesion["grade"]] += 1
    for name in s.truth["lesion_levels"]:
      by_segment[name] += 1
  lesion_subjects = sum(s.truth["has_lesion"] for s in subjects)
  lines = [
      f"subjects: {len(subjects)} ({lesion_subjects} with lesions: {subject_grades[1]} grade 1, "
      f"{subject_grades[2]} grade 2; {len(subjects) - lesion_subjects} without)",
      f"slices: {num_slices} ({num_slices / max(len(subjects), 1):.1f} per subject)",
      f"lesions: {sum(by_grade.values())} (grade 1: {by_grade[1]}, grade 2: {by_grade[2]})",
      "positive segments: " + ", ".join(f"{n} {by_segment[n]}" for n in labels.SEGMENT_NAMES),
      f"time: {seconds:.1f} s, {seconds / max(num_slices, 1):.3f} s per slice",
  ]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv  # stray arguments are refused by the dispatcher
  if not FLAGS.out:
    raise errors.UsageError("--out is required")
  out = output_guard.check_output_dir(FLAGS.out, "synth", overwrite=FLAGS.overwrite)
  if FLAGS.from_slices:
    return _synth_from_slices(out)
  subjects: list[generator.Subject] = []
  total = FLAGS.subjects

  def progress(index: int, subject: generator.Subject, seconds: float) -> None:
    subjects.append(subject)
    truth = subject.truth
    what = (f"lesion grade {truth['grade']} at {';'.join(truth['lesion_levels'])}" if truth["has_lesion"]
            else "no lesion")
    compressed = ";".join(truth["compressed_levels"]) or "none"
    print(f"[{index + 1}/{total}] {subject.subject_id} {subject.profile}: {what}; compressed {compressed}; "
          f"{subject.num_slices} slices in {seconds:.2f} s", file=sys.stderr, flush=True)

  start = time.perf_counter()
  with output_guard.staged_directory(out, "synth") as staging:
    cohort_writer.write_cohort(staging, total, FLAGS.profile, FLAGS.seed, FLAGS.lesion_fraction,
                         num_slices=FLAGS.slices, progress=progress)
  seconds = time.perf_counter() - start
  print(f"wrote {FLAGS.profile} cohort to {out} (participants: "
        f"{os.path.join(out, 'participants.tsv')})")
  print(summarize(subjects, seconds))


def _synth_from_slices(out: str) -> None:
  """`--from-slices SRC`: the real-anatomy pseudo-patient cohort (pseudo_patients.write_cohort)."""
  from u2ad_jax.phantom import pseudo_patients  # pylint: disable=g-import-not-at-top
  if FLAGS.healthy and FLAGS.lesion_fraction:
    raise errors.UsageError("--healthy and a non-zero --lesion-fraction contradict each other")
  fraction = 0.0 if FLAGS.healthy else (0.5 if FLAGS.lesion_fraction is None else FLAGS.lesion_fraction)
  subjects: list[generator.Subject] = []
  total = FLAGS.subjects

  def progress(index: int, subject: generator.Subject, seconds: float) -> None:
    subjects.append(subject)
    what = ", ".join(f"grade {l['grade']} ratio {l['ratio']:.2f} at {l['level']}" for l in subject.lesions)
    print(f"[{index + 1}/{total}] {subject.subject_id} from {subject.meta['base']}: "
          f"{what or 'no lesion'}; {subject.num_slices} slices in {seconds:.2f} s",
          file=sys.stderr, flush=True)

  start = time.perf_counter()
  with output_guard.staged_directory(out, "synth") as staging:
    pseudo_patients.write_cohort(
        staging, FLAGS.from_slices, total, FLAGS.seed, fraction,
        num_slices=FLAGS.slices or pseudo_patients.DEFAULT_NUM_SLICES, progress=progress,
        log=lambda text: print(text, file=sys.stderr, flush=True))
  seconds = time.perf_counter() - start
  print(f"wrote real-anatomy cohort to {out} (participants: "
        f"{os.path.join(out, 'participants.tsv')}; realism: {os.path.join(out, 'realism.json')})")
  print(summarize(subjects, seconds))
