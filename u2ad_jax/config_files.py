"""Where the config files (`configs/*.py`) are found, in a checkout and in an installed package.

The files live in `configs/` at the top of the source tree (so `--config configs/cpu.py` works
from a checkout) and are installed with the package as `u2ad_jax.configs` (setup.py maps the
directory), so `u2ad demo` works after a plain `pip install .` from any directory. A spec is
`path/to/file.py[:args]`; a path that does not exist as given is looked up by its file name in
these places, in order: the checkout's configs/, the installed `u2ad_jax.configs`.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os

import ml_collections

from u2ad_jax import errors

# configs/ beside the package in a source checkout (absent in an installed package).
CHECKOUT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs")


def search_dirs() -> list[str]:
  """Directories searched for a config file given by name, in order."""
  dirs = []
  if os.path.isdir(CHECKOUT_DIR):
    dirs.append(CHECKOUT_DIR)
  try:
    spec = importlib.util.find_spec("u2ad_jax.configs")
  except ImportError:
    spec = None
  for location in (spec.submodule_search_locations or []) if spec is not None else []:
    if os.path.isdir(location) and os.path.realpath(location) not in map(os.path.realpath, dirs):
      dirs.append(location)
  return dirs


def resolve(path: str) -> str:
  """The config file `path` (as given, else by file name in `search_dirs()`).

  Raises:
    InputError: not found anywhere (the message lists where it looked).
  """
  if os.path.isfile(path):
    return os.path.abspath(path)
  dirs = search_dirs()
  for directory in dirs:
    candidate = os.path.join(directory, os.path.basename(path))
    if os.path.isfile(candidate):
      return candidate
  raise errors.InputError(path, "config file not found (looked in the working directory"
                                + "".join(f", {d}" for d in dirs) + ")")


def load(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:args]` -> the ConfigDict of its `get_config(args)`.

  Raises:
    InputError: the file does not exist.
    UsageError: bad `:args` (unknown key, wrong type), e.g. `:runlocl` or `:method=eu_ua`.
  """
  from u2ad_jax import config_lib  # pylint: disable=g-import-not-at-top

  path, _, arg = spec.partition(":")
  path = resolve(path)
  module = config_lib.sibling(path, os.path.splitext(os.path.basename(path))[0])
  try:
    return module.get_config(arg or None)
  except ValueError as e:
    raise errors.UsageError(f"config {spec}: {e}") from e


@functools.lru_cache(maxsize=None)
def _base_defaults() -> dict:
  return load("base.py").to_dict()


def default_section(name: str) -> dict:
  """configs/base.py's section `name` as a plain dict (the defaults of every setting in it);
  the one source of defaults for a recorded config that predates a setting."""
  return copy.deepcopy(_base_defaults().get(name) or {})
