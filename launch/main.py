"""Thin entry point for cluster launchers: the same flags as `u2ad train`.

  python launch/main.py --config configs/paper.py --workdir RUN [--distributed] [--config.x=v]

Parses nothing itself; `u2ad_jax.commands.train` defines the flags and calls the library.
"""

import sys

from u2ad_jax import cli

if __name__ == "__main__":
  cli.run(["u2ad", "train"] + sys.argv[1:])
