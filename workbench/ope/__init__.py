"""Off-policy evaluation (OPE): estimate the current policy's expected reward from a stale logged
batch, with intervals, an overlap check, an on-policy truth to score against, a run hook and policy
selection metrics (docs/ope.md).

    from workbench.ope import evaluate_batch, OPEMonitor, ESTIMATORS
    evaluate_batch(run.model, run.last_batch, temperature=1.0)   # polars: one row per estimator
    run.hooks.append(OPEMonitor(every=10, truth_prompts=32))      # writes ope.parquet in the run dir
"""

from workbench.ope.estimators import ESTIMATORS, OPEInputs, OPEResult, effective_sample_size, estimate
from workbench.ope.evaluate import (Truth, batch_inputs, evaluate_batch, evaluate_inputs, fresh_sample,
                                    on_policy_truth, truth_of)
from workbench.ope.monitor import OPEMonitor
from workbench.ope.selection import load_candidates, select_policies, selection_metrics, spearman

__all__ = ["ESTIMATORS", "OPEInputs", "OPEMonitor", "OPEResult", "Truth", "batch_inputs", "effective_sample_size",
           "estimate", "evaluate_batch", "evaluate_inputs", "fresh_sample", "load_candidates", "on_policy_truth",
           "select_policies", "selection_metrics", "spearman", "truth_of"]
