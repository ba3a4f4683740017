"""Every config file builds (with its arguments), through the same flag machinery as `u2ad train`."""

import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from u2ad_jax import config_lib
from u2ad_jax import errors
from u2ad_jax import schedules
from u2ad_jax import stages
from u2ad_jax.models import vit_mae
from u2ad_jax.train import settings

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(p.name for p in CONFIG_DIR.glob("*.py"))


def _parse(*argv):
  """Parses `--config ...` flags like `u2ad train` does (lock_config=True)."""
  values = flags.FlagValues()
  argv = ["prog", *argv]
  # sys_argv: which `--config.*` overrides to define (default: this process's sys.argv).
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def _guidance_table(config):
  schedule = config_lib.guidance_schedule(config)
  return {stage: schedules.stage_guidance(schedule, stage, max(1, config.stage_epochs[stage]))
          for stage in stages.STAGES}


def test_config_files_are_all_covered():
  assert {"base.py", "paper.py", "cpu.py", "ablation.py"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("name", CONFIG_FILES)
@pytest.mark.parametrize("arg", ["", ":runlocal", ":schedule=linear", ":schedule=cosine,ablation=au"])
def test_every_config_builds(name, arg):
  config = _parse("--config", str(CONFIG_DIR / name) + arg)
  settings.resolve(config)
  _guidance_table(config)  # the schedule accepts the config's parameters
  model = settings.build_model(config)  # module only; no parameters are initialised
  assert model.image_size == config.data.image_size
  assert model.patch_size == config.data.patch_size
  assert config.data.image_size % config.data.patch_size == 0
  assert config.runlocal == ("runlocal" in arg)


def test_paper_config_values():
  config = _parse("--config", str(CONFIG_DIR / "paper.py"))
  assert (config.model.variant, config.data.image_size, config.data.patch_size) == ("paper", 256, 8)
  assert config.batch_size == 10
  assert (config.stage_epochs.pretrain, config.stage_epochs.adapt_eu,
          config.stage_epochs.adapt_eu_au) == (200, 150, 50)
  assert config.uncertainty.num_samples == 10 and config.uncertainty.refresh_epochs == 10
  assert (config.optim.lr, config.optim.b1, config.optim.b2) == (3e-3, 0.9, 0.95)
  assert config.optim.decay_every_epochs == 50 and config.optim.decay_factor == 0.1
  assert config.masking.ratio == 0.75 and config.parallel == "pmap"
  assert vit_mae.VARIANTS["paper"]["encoder_depth"] == 12


@pytest.mark.parametrize("name", ["base.py", "paper.py", "cpu.py"])
def test_runlocal_shrinks_to_smoke_size(name):
  config = _parse("--config", str(CONFIG_DIR / name) + ":runlocal")
  assert (config.model.variant, config.data.image_size, config.data.patch_size) == ("mu", 32, 4)
  assert config.uncertainty.num_samples == 2
  assert all(config.stage_epochs[s] == 1 for s in stages.STAGES)
  assert config.stages == ("pretrain", "adapt_eu", "adapt_eu_au")  # same code path


def test_flags_override_and_typos_fail():
  config = _parse("--config", str(CONFIG_DIR / "cpu.py") + ":runlocal", "--config.optim.lr=0.5",
                  "--config.stages=('adapt_eu',)", "--config.model.overrides.attention=dense")
  assert config.optim.lr == 0.5 and config.stages == ("adapt_eu",)
  assert settings.model_overrides(config) == {"attention": "dense"}
  with pytest.raises(Exception, match="lrr"):
    _parse("--config", str(CONFIG_DIR / "cpu.py"), "--config.optim.lrr=0.5")


def test_unknown_config_argument_fails():
  with pytest.raises(ValueError, match="unknown config argument"):
    config_lib.sibling(str(CONFIG_DIR / "base.py"), "paper").get_config("runlcoal")
  with pytest.raises(ValueError, match="ablation"):
    config_lib.sibling(str(CONFIG_DIR / "base.py"), "paper").get_config("ablation=eu_plus")


@pytest.mark.parametrize("method, eu_stages, au_stages", [
    ("baseline", (), ()),
    ("eu", ("adapt_eu", "adapt_eu_au"), ()),
    ("au", (), ("adapt_eu_au",)),
    ("eu_au", ("adapt_eu", "adapt_eu_au"), ("adapt_eu_au",)),
])
def test_ablations_switch_the_guidance(method, eu_stages, au_stages):
  config = _parse("--config", str(CONFIG_DIR / "ablation.py") + f":method={method},size=cpu")
  assert config.ablation == method and config.model.variant == "cpu"
  table = _guidance_table(config)
  for stage, per_epoch in table.items():
    assert all((g.w_eu > 0) == (stage in eu_stages) for g in per_epoch), stage
    assert all(g.au_exclusion == (stage in au_stages) for g in per_epoch), stage


def test_ramp_schedule_spans_the_adaptation_epochs():
  config = _parse("--config", str(CONFIG_DIR / "paper.py") + ":schedule=linear")
  table = _guidance_table(config)
  eu = [g.w_eu for g in table["adapt_eu"]]
  eu_au = [g.w_eu for g in table["adapt_eu_au"]]
  assert eu[0] == 0.0 and eu_au[-1] == pytest.approx(1.0)
  assert all(a <= b for a, b in zip(eu + eu_au, (eu + eu_au)[1:]))  # non-decreasing ramp
  # ramp_lengths default to the stages' epochs (150 : 50): adapt_eu ends at 3/4 of the ramp.
  assert eu[-1] == pytest.approx(0.75)


def test_invalid_training_settings_are_rejected():
  config = _parse("--config", str(CONFIG_DIR / "base.py"))
  config.stages = ("adapt_eu", "pretrain")
  with pytest.raises(ValueError, match="order"):
    settings.resolve(config)
  config.stages = ("pretrain",)
  config.parallel = "xmap"
  with pytest.raises(ValueError, match="parallel"):
    settings.resolve(config)


@pytest.mark.parametrize("flag, key", [
    ("--config.guidance.params.w_eu=-1.0", "config.guidance.params.w_eu"),
    ("--config.guidance.params.w_eu=nan", "config.guidance.params.w_eu"),
    ("--config.guidance.params.w_eu=inf", "config.guidance.params.w_eu"),
    ("--config.guidance.params.tau=0.0", "config.guidance.params.tau"),
    ("--config.guidance.params.tau=-0.5", "config.guidance.params.tau"),
    ("--config.guidance.params.tau=nan", "config.guidance.params.tau"),
    ("--config.guidance.ramp.w_eu_start=-0.1", "config.guidance.ramp.w_eu_start"),
    ("--config.guidance.ramp.tau_start=0.0", "config.guidance.ramp.tau_start"),
    ("--config.candidates.top_k=0", "config.candidates: top_k"),
    ("--config.candidates.percentile=101", "config.candidates: percentile"),
    ("--config.postprocess.top_k=0", "config.postprocess: top_k"),
    ("--config.postprocess.min_size=0", "config.postprocess: min_size"),
])
def test_bad_guidance_and_component_settings_fail_at_config_time(flag, key):
  # Through the same flags as `u2ad train`, with a ramp schedule so the ramp keys are read too.
  config = _parse("--config", str(CONFIG_DIR / "cpu.py") + ":schedule=linear", flag)
  with pytest.raises(errors.ConfigValueError) as e:
    settings.resolve(config)
  message = str(e.value)
  assert key in message and "\n" not in message, message
  assert isinstance(e.value, ValueError)  # callers that catch config ValueErrors still do


def test_candidates_residual_has_one_default_and_no_silent_fallback():
  from u2ad_jax import anomaly
  config = _parse("--config", str(CONFIG_DIR / "cpu.py"))
  assert config.candidates.residual == anomaly.DEFAULT_RESIDUAL == config.evaluation.residual
  settings.resolve(config)
  with config.unlocked():
    del config.candidates["residual"]
  with pytest.raises(errors.ConfigValueError, match=r"config\.candidates\.residual must be one"):
    settings.resolve(config)
  from u2ad_jax.train import maps
  with pytest.raises(ValueError, match="candidates.residual"):
    maps.MapGenerator(settings.build_model(config), config, "pmap")


def test_set_overrides_nested_keys_and_refuse_typos():
  config = config_lib.sibling(str(CONFIG_DIR / "base.py"), "cpu").get_config()
  config_lib.apply_overrides(config, ["stage_epochs.pretrain=24", "optim.lr=1e-3",
                                      "evaluation.residual=absolute", "guidance.params.tau=0.5",
                                      "postprocess.top_k=3"])
  assert config.stage_epochs.pretrain == 24 and config.optim.lr == pytest.approx(1e-3)
  assert config.evaluation.residual == "absolute" and config.postprocess.top_k == 3
  assert config.guidance.params.tau == pytest.approx(0.5)
  for bad, message in [("stage_epochs.pretrian=3", "unknown setting 'stage_epochs.pretrian'"),
                       ("nosuch.key=1", "unknown setting 'nosuch'"),
                       ("optim.lr=fast", "optim.lr"),
                       ("optim.lr", "key.path=value")]:
    with pytest.raises(config_lib.errors.UsageError, match=message):
      config_lib.apply_overrides(config, [bad])
  assert config.optim.lr == pytest.approx(1e-3)  # a refused override changes nothing


def _edited_configs(tmp_path, *replacements):
  """A copy of configs/ whose base.py has `replacements` (old, new) applied."""
  target = tmp_path / "configs"
  target.mkdir()
  for path in CONFIG_DIR.glob("*.py"):
    (target / path.name).write_text(path.read_text())
  base = (target / "base.py").read_text()
  for old, new in replacements:
    assert base.count(old) == 1, old
    base = base.replace(old, new)
  (target / "base.py").write_text(base)
  return target


def test_base_defaults_reach_the_trainer(tmp_path):
  """Editing base.py's schedule and stage lists changes what a variant trains with; the config
  arguments change only what they name."""
  edited = _edited_configs(
      tmp_path, ('guidance_config("piecewise")', 'guidance_config("linear")'),
      ('params.eu_stages = ("adapt_eu", "adapt_eu_au")', 'params.eu_stages = ("adapt_eu_au",)'))
  config = _parse("--config", str(edited / "cpu.py"))
  assert config.guidance.schedule == "linear"
  assert config.guidance.params.eu_stages == ("adapt_eu_au",)
  assert config.ablation == config_lib.CUSTOM_ABLATION  # the lists match no ladder method
  run = settings.resolve(config)
  adapt_eu = schedules.stage_guidance(run.schedule, "adapt_eu", config.stage_epochs.adapt_eu)
  ramp = schedules.stage_guidance(run.schedule, "adapt_eu_au", config.stage_epochs.adapt_eu_au)
  assert all(g.w_eu == 0.0 for g in adapt_eu)  # EU guidance only where base.py now says
  assert ramp[0].w_eu == 0.0 and ramp[-1].w_eu == pytest.approx(1.0)  # a linear ramp
  assert all(a.w_eu < b.w_eu for a, b in zip(ramp, ramp[1:]))
  # Arguments still win over the file, and only for what they name.
  config = _parse("--config", str(edited / "cpu.py") + ":ablation=eu")
  assert config.guidance.schedule == "linear" and config.ablation == "eu"
  assert config.guidance.params.eu_stages == ("adapt_eu", "adapt_eu_au")
  config = _parse("--config", str(edited / "ablation.py") + ":size=cpu,schedule=cosine")
  assert config.guidance.schedule == "cosine" and config.ablation == config_lib.CUSTOM_ABLATION
  # The unedited files hold the paper's method.
  config = _parse("--config", str(CONFIG_DIR / "cpu.py"))
  assert (config.guidance.schedule, config.ablation) == ("piecewise", "eu_au")


def test_a_schedule_registered_in_a_test_is_configured_validated_and_trained(tmp_path,
                                                                             monkeypatch):
  """A new schedule (not a ramp, with a parameter of its own) is one function and its
  registration: its config field, its validation and the trainer follow from the registry."""
  from u2ad_jax.train import metrics_log
  import toy_data
  from u2ad_jax.train import trainer
  monkeypatch.setattr(schedules, "_REGISTRY", dict(schedules._REGISTRY))

  @schedules.register("test_constant", schedules.Param("w_constant", "weight", 0.5),
                      schedules.TAU)
  def constant(*, w_constant, tau):
    def schedule(stage, progress):
      return schedules.Guidance(0.0 if stage == "pretrain" else w_constant, tau, False)
    return schedule

  config = config_lib.sibling(str(CONFIG_DIR / "base.py"), "base").get_config(
      "runlocal,schedule=test_constant")
  assert config.guidance.schedule == "test_constant"
  assert config.guidance.params.w_constant == 0.5  # the declared default, as a config field
  config.guidance.params.w_constant = -1.0
  with pytest.raises(errors.ConfigValueError, match=r"config\.guidance\.params\.w_constant"):
    settings.resolve(config)
  config.guidance.params.w_constant = 0.25
  config.stages = ("adapt_eu",)
  result = trainer.train(config, tmp_path / "run", verbose=False, slice_sets={
      "clinical_dir": toy_data.toy_slice_set(4, 32, seed=5, lesion_fraction=0.5)})
  records = metrics_log.MetricsLog(tmp_path / "run").read()
  steps = [r for r in records if "event" not in r]
  assert result.step == len(steps) > 0
  assert all(r["w_eu"] == 0.25 and r["tau"] == 1.0 and not r["au_exclusion"] for r in steps)
  assert any(r.get("event") == "maps" for r in records)  # EU guidance on: maps were made
