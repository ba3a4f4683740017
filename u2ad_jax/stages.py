"""The names of the training stages and of the ablation methods, defined once.

U2AD trains in three stages, always in this order (a config may run a subset):
  pretrain      the healthy public cohort, random ROI masking;
  adapt_eu      the unlabeled clinical cohort, EU-guided masking;
  adapt_eu_au   the clinical cohort, EU guidance + AU-candidate exclusion.

An ablation method says which adaptation stages use EU guidance and which use AU exclusion; all
methods keep the same stages and epochs, so the comparison ladder differs only in the masking.
"""

from __future__ import annotations

STAGES = ("pretrain", "adapt_eu", "adapt_eu_au")
ADAPT_STAGES = ("adapt_eu", "adapt_eu_au")

# method -> the schedule's stage lists (`schedules`: eu_stages / au_stages).
ABLATIONS = {
    "baseline": dict(eu_stages=(), au_stages=()),
    "eu": dict(eu_stages=("adapt_eu", "adapt_eu_au"), au_stages=()),
    "au": dict(eu_stages=(), au_stages=("adapt_eu_au",)),
    "eu_au": dict(eu_stages=("adapt_eu", "adapt_eu_au"), au_stages=("adapt_eu_au",)),
}
ABLATION_METHODS = tuple(ABLATIONS)  # the ladder's order: baseline, eu, au, eu_au
# The method of the paper (U2AD): the default stage lists of every schedule.
PAPER_METHOD = "eu_au"
