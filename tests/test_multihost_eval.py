"""Multi-process evaluation for real: two processes on 127.0.0.1 split a cohort by subject.

Two processes with one CPU device each evaluate a freshly initialised model on a 3-subject
phantom cohort with the real driver (`ModelRung` through `rung_base.evaluate`): process 0
computes the maps of subjects 0 and 2, process 1 those of subject 1, process 0 gathers them and
alone scores and writes. The maps and the scores must equal those of one process doing
everything (per-slice keys: slice s draws the same masks wherever it is computed).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

import support
from u2ad_jax.evaluation.rungs import model as model_rung

TIMEOUT_S = 180

# Evaluates in a fresh process: argv = base config path, cohort, out dir, out.npz
# [, port, process_id] (with the last two: one process of a two-process job).
SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    base_config, cohort, out_dir, out = sys.argv[1:5]
    if len(sys.argv) > 5:
      from u2ad_jax.train import distributed
      distributed.initialize(f"127.0.0.1:{sys.argv[5]}", num_processes=2,
                             process_id=int(sys.argv[6]))
    import jax
    from u2ad_jax import config_lib
    from u2ad_jax.evaluation import settings as settings_lib
    from u2ad_jax.evaluation.rungs import base
    from u2ad_jax.evaluation.rungs import model as model_rung
    from u2ad_jax.train import settings
    from u2ad_jax.train import state as state_lib
    config = config_lib.sibling(base_config, "base").get_config("runlocal")
    model = settings.build_model(config)
    params = state_lib.init_params(model, jax.random.key(0))
    prepared = base.prepare_cohort(cohort, config.data, progress=False)
    recorded, messages = [], []
    original = model_rung.model_maps
    def recording(*args, **kwargs):
      result = original(*args, **kwargs)
      recorded.append(result)
      return result
    model_rung.model_maps = recording
    rung = model_rung.ModelRung(name="fresh", workdir=cohort, model=model, params=params,
                                config=config, step=0, batch_size=4, log=messages.append)
    result = base.evaluate(rung, prepared, settings_lib.EvalSettings.from_config(config), out_dir)
    maps = recorded[0] or {}
    scores = [] if result is None else result.scores
    np.savez(out, process_count=jax.process_count(), result_is_none=result is None,
             last_message=[m for m in messages if m.startswith("MC maps")][-1],
             subjects=np.array([s.subject_id for s in scores]),
             scores=np.array([[s.patient_score, *s.segment_scores] for s in scores]),
             anomaly=np.zeros(0) if result is None else result.anomaly, **maps)
""")


def test_two_processes_split_the_evaluation_by_subject_and_only_process_0_writes(tmp_path):
  _, cohort = support.write_small_cohorts(tmp_path / "data")
  script = tmp_path / "run.py"
  script.write_text(SCRIPT)
  base_config = str(support.REPO / "configs" / "base.py")
  port = str(support.free_port())

  def start(name, *job):
    return subprocess.Popen([sys.executable, str(script), base_config, str(cohort),
                             str(tmp_path / name), str(tmp_path / f"{name}.npz"), *job],
                            env=support.cpu_subprocess_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

  processes = [start(f"multi{i}", port, str(i)) for i in range(2)] + [start("single")]
  support.finish_processes(processes, TIMEOUT_S)

  single, first, second = (np.load(tmp_path / f"{n}.npz") for n in ("single", "multi0",
                                                                     "multi1"))
  assert int(single["process_count"]) == 1 and int(first["process_count"]) == 2
  # 3 subjects x 3 slices: subjects 0 and 2 on process 0, subject 1 on process 1.
  assert str(single["last_message"]).startswith("MC maps 9/9 slices")
  assert str(first["last_message"]).startswith("MC maps 6/6 slices on 1 device(s) of process 0/2")
  assert str(second["last_message"]).startswith("MC maps 3/3 slices on 1 device(s) of process 1/2")
  # Process 0 has every slice's maps, equal to one process's up to float rounding (a slice
  # computed with another slice's key, or stored in another's row, would differ by its whole
  # value); process 1 kept none and scored nothing.
  for name in ("eu", "mean", "au"):
    assert single[name].shape[0] == 9 and (single[name] != 0).any(), name
    np.testing.assert_allclose(first[name], single[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert name not in second.files
  assert not bool(first["result_is_none"]) and bool(second["result_is_none"])
  np.testing.assert_array_equal(first["subjects"], single["subjects"])
  assert len(single["subjects"]) == 3
  # The anomaly maps scored (residuals of the gathered reconstructions) and the patient and
  # segment scores (NaN: a segment not scored, in both runs alike).
  assert single["anomaly"].shape == single["mean"].shape and (single["anomaly"] > 0).any()
  np.testing.assert_allclose(first["anomaly"], single["anomaly"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(first["scores"], single["scores"], rtol=1e-5, atol=1e-7)
  # Only process 0 wrote: its report is the one process's, process 1's output does not exist.
  assert not (tmp_path / "multi1").exists()
  for name in ("report.md", "patients.csv", "segments.csv", "summary.json"):
    assert (tmp_path / "multi0" / name).is_file(), name
  summary = json.loads((tmp_path / "multi0" / "summary.json").read_text())
  assert sorted(summary["patients"]) == sorted(single["subjects"].tolist())
  assert sorted(os.listdir(tmp_path)) == ["data", "multi0", "multi0.npz", "multi1.npz", "run.py",
                                          "single", "single.npz"]


def test_subjects_go_round_robin_to_the_processes_with_all_their_slices():
  subjects = ["b", "b", "a", "c", "c", "c", "d", "e"]
  np.testing.assert_array_equal(model_rung.subject_processes(subjects, 2),
                                [0, 0, 1, 0, 0, 0, 1, 0])
  np.testing.assert_array_equal(model_rung.subject_processes(subjects, 3),
                                [0, 0, 1, 2, 2, 2, 0, 1])
  # More processes than subjects: the last ones get nothing (and still take part in the gather).
  assert set(model_rung.subject_processes(subjects[:3], 4).tolist()) == {0, 1}
