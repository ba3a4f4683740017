"""The `u2ad` command: `u2ad <subcommand> [--flags]`.

Each subcommand is a module in `u2ad_jax/commands/` that defines its absl flags and a
`main(argv)`. Modules are imported on demand so that one subcommand's flags (and heavy
imports such as jax) never load for another.

One contract for every subcommand, kept here so no command can differ:
- exit 0 on success;
- exit 2 with ONE line `u2ad <cmd>: error: ...` on stderr for usage, input and config errors:
  flag parsing (unknown flag, bad value, missing required flag, `--config.x=` typos, a config
  file that fails to load), stray positional arguments, and every `errors.U2ADError` (a lost
  process of a multi-process job, `ProcessLostError`, leaves at once);
- exit 130 with ONE line `u2ad <cmd>: interrupted...` on Ctrl-C (training says the step it
  reached, its last checkpoint and how to resume);
- exit 1 with the traceback for anything else (an internal error: a bug to report);
- a closed stdout (`u2ad synth -h | head -1`) ends quietly;
- progress and logs go to stderr, results to stdout.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module, one-line help). A new subcommand is a new module plus one line here.
COMMANDS = {
    "synth": ("u2ad_jax.commands.synth", "write a synthetic cervical-spine cohort (NIfTI, BIDS-like)"),
    "train": ("u2ad_jax.commands.train", "pretrain / adapt a model from a config"),
    "evaluate": ("u2ad_jax.commands.evaluate", "checkpoint -> anomaly maps, scores, metrics, report"),
    "ablate": ("u2ad_jax.commands.ablate", "train and score the comparison ladder on one cohort"),
    "prepare": ("u2ad_jax.commands.prepare", "real scans + TotalSpineSeg / SCT labels -> a cohort"),
    "study": ("u2ad_jax.commands.study", "the ladder over N cohorts: means, 95 % intervals, paired differences"),
    "demo": ("u2ad_jax.commands.demo", "synthetic cohorts -> pretrain -> adapt -> evaluate -> report"),
}

USAGE_EXIT = 2
# What a shell reports for a process ended by SIGINT (128 + 2): the user pressed Ctrl-C.
INTERRUPT_EXIT = 130
# What a shell reports for a process ended by SIGPIPE (128 + 13): the reader went away.
BROKEN_PIPE_EXIT = 141


def _usage() -> str:
  lines = ["usage: u2ad <command> [--flags]   (u2ad <command> --help for its flags)",
           "       u2ad --version", "", "commands:"]
  for name, (module, text) in COMMANDS.items():
    lines.append(f"  {name:<10} {text}")
  return "\n".join(lines)


def _fail(name: str, message: str, now: bool = False) -> None:
  """Prints the one error line and exits 2 (`now`: at once, without the interpreter's exit
  handlers)."""
  print(f"u2ad {name}: error: {message}", file=sys.stderr, flush=True)
  if now:
    sys.stdout.flush()
    # JAX's exit handler waits at the job's shutdown barrier for every process, a lost one
    # too, until the heartbeat timeout, and then aborts with a fatal log: leave now instead.
    os._exit(USAGE_EXIT)  # pylint: disable=protected-access
  sys.exit(USAGE_EXIT)


def flag_error_line(error: BaseException) -> str:
  """One line for a flag-parsing error. absl wraps a config file's failure (e.g. ml_collections'
  `--config FILE:args`) in a message holding the whole traceback: keep the flag and the final
  exception line (what went wrong), drop the rest."""
  text = str(error).strip()
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if len(lines) <= 1:
    return text
  head = lines[0].split(": Error whilst parsing", 1)[0].rstrip(":")
  return f"{head}: {lines[-1]}"


def run(argv: list[str] | None = None) -> None:
  """Console-script entry point."""
  try:
    _run(list(sys.argv if argv is None else argv))
  except BrokenPipeError:
    # The reader closed stdout (`| head`): stop quietly. stdout is pointed at /dev/null so
    # that the interpreter's final flush does not raise again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(BROKEN_PIPE_EXIT)


def _run(argv: list[str]) -> None:
  if len(argv) >= 2 and argv[1] == "--version":
    from u2ad_jax import __version__  # pylint: disable=g-import-not-at-top
    print(f"u2ad {__version__}")
    sys.exit(0)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    sys.stdout.flush()
    sys.exit(0 if len(argv) >= 2 else USAGE_EXIT)
  name = argv[1]
  if name not in COMMANDS:
    print(f"u2ad: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    sys.exit(USAGE_EXIT)
  module = importlib.import_module(COMMANDS[name][0])
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from u2ad_jax import errors  # pylint: disable=g-import-not-at-top

  if hasattr(module, "resolve_argv"):
    # A command may rewrite its arguments before absl parses them, e.g. `train` finds a bare
    # `--config cpu.py` the way `demo` does, and fails on a missing file here: absl would load
    # it while parsing `--config.x=` overrides and raise a traceback.
    try:
      argv = argv[:2] + list(module.resolve_argv(argv[2:]))
    except errors.U2ADError as e:
      _fail(name, str(e))

  if any(a in ("-h", "--help", "-?", "--helpshort") for a in argv[2:]):
    # absl's own --help describes the `__main__` module (this dispatcher) and exits 1; show
    # the subcommand's docstring and its flags instead, and exit 0.
    print((module.__doc__ or COMMANDS[name][1]).strip() + "\n")
    print(flags.FLAGS.module_help(module))
    # Flags a command shares with others (e.g. the multi-host ones) live in their own module.
    for shared in flags.FLAGS.flags_by_module_dict():
      if shared.startswith("u2ad_jax.commands.") and shared != module.__name__:
        print("\n" + flags.FLAGS.module_help(shared))
    sys.stdout.flush()
    sys.exit(0)

  def parse_flags(args: list[str]) -> list[str]:
    # absl's parser prints "FATAL Flags parsing error" and exits 1; a bad flag is a usage error.
    try:
      return flags.FLAGS(args)
    except flags.Error as e:
      _fail(name, flag_error_line(e))
    except OSError as e:
      # ml_collections raises OSError for a config file that failed to load (a file that
      # raises on import) when an override needs it: keep the last line of its message.
      _fail(name, flag_error_line(e))
    except (AttributeError, KeyError) as e:
      # ml_collections' `--config.a.b=v` parser raises these for a key the config lacks.
      dotted = [a.split("=", 1)[0] for a in args[1:] if a.startswith("--config.")]
      detail = str(e).replace("\\n", "; ").replace("\\'", "'")
      detail = detail[1:-1] if detail[:1] == detail[-1:] == "'" else detail
      _fail(name, f"{', '.join(dotted) or '--config.*'}: unknown config setting ({detail})")
    except errors.U2ADError as e:
      _fail(name, str(e))

  def main(args: list[str]):
    if len(args) > 1:
      _fail(name, f"unexpected arguments: {' '.join(args[1:])} (every value goes with a --flag)")
    try:
      return module.main(args)
    except errors.Interrupted as e:
      print(f"u2ad {name}: {e}", file=sys.stderr, flush=True)
      sys.exit(INTERRUPT_EXIT)
    except KeyboardInterrupt:
      print(f"u2ad {name}: interrupted", file=sys.stderr, flush=True)
      sys.exit(INTERRUPT_EXIT)
    except errors.U2ADError as e:
      # One clear line, exit 2: bad input is the user's to fix, not a traceback.
      _fail(name, " ".join(str(e).split()) or type(e).__name__,
            now=isinstance(e, errors.ProcessLostError))

  app.run(main, argv=[f"u2ad {name}"] + argv[2:], flags_parser=parse_flags)


if __name__ == "__main__":
  run()
