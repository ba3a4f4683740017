"""The `u2ad` command: `u2ad <subcommand> [--flags]`.

Each subcommand is a module in `u2ad_jax/commands/` that defines its absl flags and a
`main(argv)`. Modules are imported on demand so that one subcommand's flags (and heavy
imports such as jax) never load for another.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). A new subcommand is a new module plus one line here.
COMMANDS = {
    "synth": ("u2ad_jax.commands.synth", "write a synthetic cervical-spine cohort (NIfTI, BIDS-like)"),
    "train": ("u2ad_jax.commands.train", "pretrain / adapt a model from a config"),
    "evaluate": ("u2ad_jax.commands.evaluate", "checkpoint -> anomaly maps, scores, metrics, report"),
    "ablate": ("u2ad_jax.commands.ablate", "train and score the comparison ladder on one cohort"),
    "study": ("u2ad_jax.commands.study", "the ladder over N cohorts: means, 95 % intervals, paired differences"),
    "demo": ("u2ad_jax.commands.demo", "synthetic cohorts -> pretrain -> adapt -> evaluate -> report"),
}


def _usage() -> str:
  lines = ["usage: u2ad <command> [--flags]   (u2ad <command> --help for its flags)", "", "commands:"]
  for name, (module, text) in COMMANDS.items():
    lines.append(f"  {name:<10} {text}")
  return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
  """Console-script entry point."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  name = argv[1]
  if name not in COMMANDS:
    print(f"u2ad: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    sys.exit(2)
  module = importlib.import_module(COMMANDS[name][0])
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from u2ad_jax import errors  # pylint: disable=g-import-not-at-top

  if any(a in ("-h", "--help", "-?", "--helpshort") for a in argv[2:]):
    # absl's own --help describes the `__main__` module (this dispatcher) and exits 1; show
    # the subcommand's docstring and its flags instead, and exit 0.
    print((module.__doc__ or COMMANDS[name][1]).strip() + "\n")
    print(flags.FLAGS.module_help(module))
    sys.exit(0)

  def main(args):
    try:
      return module.main(args)
    except errors.U2ADError as e:
      # One clear line, non-zero exit: bad input is the user's to fix, not a traceback.
      print(f"u2ad {name}: error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(main, argv=[f"u2ad {name}"] + argv[2:])


if __name__ == "__main__":
  run()
