"""The comparison ladder (`stages.ABLATION_METHODS`) as one config with an argument.

  --config configs/ablation.py:method=baseline   random masking in every stage ("MAE" baseline)
  --config configs/ablation.py:method=eu         + EU-guided masking during adaptation
  --config configs/ablation.py:method=au         + AU-candidate exclusion only (adapt_eu_au)
  --config configs/ablation.py:method=eu_au      both: U2AD (same as paper.py)

`size=paper` (default) or `size=cpu` picks the base; `schedule=...` and `runlocal` as elsewhere
(`ablation=` is accepted as another name for `method=`; neither given: the base's stage lists,
eu_au).
Every rung keeps the same stages and epochs, so only the masking differs.
"""

from u2ad_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, method="", size="paper", **config_lib.COMMON_ARGS)
  if args.size not in ("paper", "cpu"):
    raise ValueError(f"size must be 'paper' or 'cpu', got {args.size!r}")
  method = args.method or args.ablation
  sized = config_lib.sibling(__file__, args.size)
  return sized.get_config(f"ablation={method},schedule={args.schedule}"
                          + (",runlocal" if args.runlocal else ""))
