"""`u2ad train`: pretrain / adapt a model from a config file.

  u2ad train --config configs/paper.py[:ablation=eu,schedule=linear] --workdir runs/x \
      --config.data.public_dir=PUBLIC --config.data.clinical_dir=CLINICAL [--config.k=v ...]
      [--set key.path=value ...]

Re-running the same command resumes from the workdir's latest checkpoint. `--init_from RUN`
starts from another run's parameters (e.g. `--config.stages="('adapt_eu','adapt_eu_au')"` after
a pretraining run). Multi-host: `--distributed` (SLURM / TPU auto-detection) or explicit
`--coordinator_address --num_processes --process_id` (see launch/).
"""

from __future__ import annotations

import os
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from u2ad_jax import errors
from u2ad_jax.commands import multihost

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file (configs/*.py), optionally with ':args'", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (created; resumed when it exists)")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "workdir of another run whose latest parameters start this run (used "
    "only when --workdir has no checkpoint yet)")
_SET = flags.DEFINE_multi_string(
    "set", [], "config override key.path=value, e.g. --set optim.lr=1e-3 (repeatable; the same "
    "as --config.optim.lr=1e-3; unknown keys fail before any work)")
flags.mark_flags_as_required(["config", "workdir"])


def resolve_argv(args: list[str]) -> list[str]:
  """`--config FILE[:args]` with FILE found as `u2ad demo` finds it (`config_files.resolve`: as
  given, else by name in the checkout's configs/ or the installed package), called by the
  dispatcher before absl parses the flags.

  Raises:
    InputError: the file is nowhere (one line, before absl loads it for a `--config.x=`).
  """
  from u2ad_jax import config_files  # pylint: disable=g-import-not-at-top

  def resolved(spec: str) -> str:
    path, sep, arg = spec.partition(":")
    return config_files.resolve(path) + sep + arg

  out, i = [], 0
  while i < len(args):
    arg = args[i]
    if arg == "--config" and i + 1 < len(args):
      out += [arg, resolved(args[i + 1])]
      i += 2
      continue
    if arg.startswith("--config="):
      arg = "--config=" + resolved(arg[len("--config="):])
    out.append(arg)
    i += 1
  return out


def _loaded_config():
  """The parsed --config. ml_collections defers a file that failed to load (missing, or raising
  on import) to the first use of the config; this turns that into one line naming the file."""
  # The flag's text is `FILE[:args]`; the args were parsed already.
  filename = config_flags.get_config_filename(flags.FLAGS["config"]).partition(":")[0]
  if not os.path.isfile(filename):
    raise errors.InputError(filename, "config file not found")
  config = _CONFIG.value
  try:
    config.get("stages")
  except OSError as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    raise errors.InputError(filename, f"config file failed to load ({lines[-1]})") from e
  return config


def main(argv: list[str]) -> None:
  del argv  # stray arguments are refused by the dispatcher
  from u2ad_jax import config_lib  # pylint: disable=g-import-not-at-top

  # Config mistakes fail here, before jax or any file: `--set` typos name the key.
  config = config_lib.apply_overrides(_loaded_config(), _SET.value)
  # Orbax logs every save at INFO; the progress lines are what the user reads.
  logging.set_verbosity(logging.WARNING)
  # Imported here: jax must not start before distributed initialisation.
  from u2ad_jax.train import distributed  # pylint: disable=g-import-not-at-top
  multihost.start()
  from u2ad_jax.train import settings  # pylint: disable=g-import-not-at-top
  from u2ad_jax.train import trainer  # pylint: disable=g-import-not-at-top

  try:
    settings.resolve(config)
  except ValueError as e:
    raise errors.U2ADError(f"bad config: {e}") from e
  print(f"[train] {distributed.describe()}", file=sys.stderr, flush=True)
  result = trainer.train(config, _WORKDIR.value, init_from=_INIT_FROM.value)
  state = "stopped early" if result.stopped else "finished"
  print(f"[train] {state} at step {result.step}; checkpoints and metrics in {result.workdir}",
        flush=True)  # the result: stdout
