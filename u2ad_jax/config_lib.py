"""Helpers shared by the config files in `configs/` (the files themselves stay short).

A config file defines `get_config(arg=None) -> ConfigDict`. `arg` is the text after the colon in
`--config configs/paper.py:runlocal,ablation=eu`: comma-separated `key=value` pairs or bare keys
(= True), big_vision style. Every config accepts

  ablation=baseline|eu|au|eu_au   which guidance each adaptation stage uses (`stages.ABLATIONS`);
                                  not given: the stage lists the config file sets;
  schedule=NAME                   a registered weighting schedule (`schedules.available()`);
                                  not given: the one the config file sets;
  runlocal                        shrink to a CPU smoke size ('mu' model, 32 px, 1 epoch, K 2),
                                  keeping the code path (all stages, map refreshes, checkpoints).

The arguments change only what they name: the defaults in `configs/base.py` (and a variant's
overrides) are what a config holds otherwise.

The guidance block (`config.guidance`) is derived from the schedule registry: `guidance_config`
creates one field per declared parameter, and `guidance_schedule` validates the fields against
their declarations and builds the chosen schedule, so a new schedule needs no edit here.

Single values are changed with dotted flags (`--config.optim.lr=1e-3`) in `u2ad train`, and with
`--set optim.lr=1e-3` (`apply_overrides`) in the commands that load a config themselves
(`u2ad demo`, `u2ad ablate`, and `u2ad evaluate` for the scoring settings).
"""

from __future__ import annotations

import ast
import importlib.machinery
import os
import types
from typing import Any, Mapping, Sequence

import ml_collections
from ml_collections import config_dict

from u2ad_jax import errors
from u2ad_jax import schedules
from u2ad_jax import stages

# The arguments every config file accepts; "" = not given (the config file's value stands).
COMMON_ARGS = dict(runlocal=False, ablation="", schedule="")
# `config.ablation` when the stage lists match no method of `stages.ABLATIONS`.
CUSTOM_ABLATION = "custom"


def _literal(text: str) -> Any:
  """A Python literal when `text` is one (`3`, `2.5`, `None`, `'max'`), else the bare text."""
  try:
    return ast.literal_eval(text.strip())
  except (ValueError, SyntaxError):
    return text.strip()


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """`'runlocal,ablation=eu'` -> ConfigDict(runlocal=True, ablation='eu', ...).

  Keys must be among `defaults`; values are parsed as Python literals when possible, else kept
  as strings, and must have the default's type (bool keys may be given bare).

  Raises:
    ValueError: unknown key or wrongly typed value.
  """
  parsed = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    value: Any = _literal(text) if sep else True
    default = defaults[key]
    if default is not None and not isinstance(value, type(default)):
      if isinstance(default, float) and isinstance(value, int):
        value = float(value)
      else:
        raise ValueError(f"config argument {key}={value!r} should be a {type(default).__name__}")
    parsed[key] = value
  return ml_collections.ConfigDict(parsed)


def sibling(config_file: str, name: str) -> types.ModuleType:
  """Loads `configs/<name>.py` next to `config_file` (config files are not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  loader = importlib.machinery.SourceFileLoader(f"u2ad_config_{name}", path)
  module = types.ModuleType(loader.name)
  module.__file__ = path
  loader.exec_module(module)
  return module


def set_ablation(config: ml_collections.ConfigDict, method: str) -> None:
  """Sets which stages use EU guidance and AU exclusion (`stages.ABLATIONS`)."""
  if method not in stages.ABLATIONS:
    raise ValueError(f"unknown ablation {method!r}; choose from {sorted(stages.ABLATIONS)}")
  config.ablation = method
  config.guidance.params.eu_stages = stages.ABLATIONS[method]["eu_stages"]
  config.guidance.params.au_stages = stages.ABLATIONS[method]["au_stages"]


def ablation_of(config: ml_collections.ConfigDict) -> str:
  """The method whose stage lists the config's guidance holds, or `CUSTOM_ABLATION`."""
  params = config.guidance.params
  lists = (tuple(params.get("eu_stages") or ()), tuple(params.get("au_stages") or ()))
  for method, ablation in stages.ABLATIONS.items():
    if lists == (ablation["eu_stages"], ablation["au_stages"]):
      return method
  return CUSTOM_ABLATION


def set_schedule(config: ml_collections.ConfigDict, name: str) -> None:
  """Chooses the weighting schedule (a name of `schedules.available()`)."""
  if name not in schedules.available():
    raise ValueError(f"unknown guidance schedule {name!r}; choose from {schedules.available()}")
  config.guidance.schedule = name


def guidance_config(schedule: str) -> ml_collections.ConfigDict:
  """`config.guidance`: the schedule's name and one field per parameter any registered schedule
  declares, at its declared default, in the parameter's section (`schedules.SECTIONS`)."""
  guidance = ml_collections.ConfigDict()
  guidance.schedule = schedule
  for section in schedules.SECTIONS:
    guidance[section] = ml_collections.ConfigDict()
  for name, param in schedules.parameters().items():
    field_type = schedules.KINDS[param.kind][1]
    guidance[param.section][name] = (config_dict.placeholder(field_type)
                                     if param.default is None else param.default)
  return guidance


def guidance_schedule(config: Any) -> schedules.ScheduleFn:
  """The schedule of `config.guidance`, every field checked against its declaration.

  Each set field of `config.guidance.<section>` must be a parameter some registered schedule
  declares in that section and pass its check (even when the chosen schedule does not use it);
  the chosen schedule gets the set fields it declares (None = its default) and the run's
  `config.stage_epochs`.

  Raises:
    ConfigValueError: one line naming the field (or the schedule) and the problem.
  """
  guidance = config.guidance
  declared = schedules.parameters()
  values = {}
  for section in schedules.SECTIONS:
    block = guidance.get(section) or {}
    for name, value in block.items():
      what = f"config.guidance.{section}.{name}"
      param = declared.get(name)
      if param is None or param.section != section:
        raise errors.ConfigValueError(f"{what}: no registered schedule has this parameter")
      if value is None:
        continue
      try:
        values[name] = param.check(value, what)
      except ValueError as e:
        raise errors.ConfigValueError(str(e)) from None
  name = guidance.schedule
  try:
    used = schedules.parameters(name)
    epochs = {stage: int(config.stage_epochs[stage]) for stage in stages.STAGES}
    return schedules.get_schedule(name, stage_epochs=epochs,
                                  **{k: v for k, v in values.items() if k in used})
  except ValueError as e:
    raise errors.ConfigValueError(f"config.guidance ({name}): {e}") from e


def set_runlocal(config: ml_collections.ConfigDict) -> None:
  """Shrinks a config to a seconds-long CPU run of the same code path."""
  config.model.variant = "mu"
  config.data.image_size = 32
  config.data.patch_size = 4
  config.data.min_roi_patches = 4
  config.batch_size = 4  # splits over 1, 2 or 4 devices
  config.stage_epochs.pretrain = 1
  config.stage_epochs.adapt_eu = 1
  config.stage_epochs.adapt_eu_au = 1
  config.optim.decay_every_epochs = 1
  config.uncertainty.num_samples = 2
  config.uncertainty.refresh_epochs = 1
  config.uncertainty.slices_per_device = 2
  config.checkpoint.every_steps = 4
  config.log_every_steps = 1
  config.validation.every_steps = 0  # tests' cohorts are a few subjects: none to hold out


def parse_override(item: str) -> tuple[list[str], Any]:
  """`'a.b.c=value'` -> `(['a', 'b', 'c'], value)`; the value is a Python literal (`3`, `2.5`,
  `None`, `(1, 2)`, `'max'`) or else the bare text. Raises UsageError when malformed."""
  name, sep, text = item.partition("=")
  path = [part.strip() for part in name.split(".")]
  if not sep or not all(path):
    raise errors.UsageError(f"override {item!r}: expected key.path=value")
  return path, _literal(text)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str], *,
                    allowed: Mapping[str, Sequence[str]] | None = None
                    ) -> ml_collections.ConfigDict:
  """Sets `key.path=value` overrides on `config` (in place) and returns it.

  Without `allowed`, every key must already exist (a typo fails, as with `--config.x` flags).
  With `allowed` ({section: keys}), only `section.key` overrides of those keys are accepted, and
  a listed key missing from an older recorded config is added.

  Raises:
    UsageError: malformed, unknown or not allowed key, or a value of the wrong type.
  """
  for item in overrides:
    path, value = parse_override(item)
    if allowed is not None:
      if len(path) != 2:
        raise errors.UsageError(f"override {item!r}: expected section.key=value")
      if path[0] not in allowed:
        raise errors.UsageError(
            f"override {item!r}: only {', '.join(allowed)} settings can change here (the rest "
            "is fixed by the checkpoint)")
      if path[1] not in allowed[path[0]]:
        raise errors.UsageError(f"override {item!r}: unknown {path[0]} setting {path[1]!r}; "
                                f"known: {', '.join(allowed[path[0]])}")
    node = config
    for depth, part in enumerate(path[:-1]):
      child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
      if child is None and allowed is not None:
        with config.unlocked():
          node[part] = ml_collections.ConfigDict()
        child = node[part]
      if not isinstance(child, ml_collections.ConfigDict):
        raise errors.UsageError(f"override {item!r}: unknown setting "
                                f"{'.'.join(path[:depth + 1])!r}")
      node = child
    if path[-1] not in node and allowed is None:
      raise errors.UsageError(f"override {item!r}: unknown setting {'.'.join(path)!r}")
    try:
      with config.unlocked():
        node[path[-1]] = value
    except (TypeError, ValueError, AttributeError) as e:
      raise errors.UsageError(f"override {item!r}: {e}") from e
  return config


def finalize(config: ml_collections.ConfigDict, args: ml_collections.ConfigDict
             ) -> ml_collections.ConfigDict:
  """Applies the common arguments (`COMMON_ARGS`) given to a config built by a config file.

  Only what an argument names changes; `config.ablation` records the method the final stage
  lists are (`ablation_of`), and `config.runlocal` whether the smoke size was asked for.
  """
  if args.ablation:
    set_ablation(config, args.ablation)
  if args.schedule:
    set_schedule(config, args.schedule)
  if args.runlocal:
    set_runlocal(config)
  config.ablation = ablation_of(config)
  config.runlocal = bool(args.runlocal)
  return config
