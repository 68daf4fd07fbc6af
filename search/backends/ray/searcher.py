"""Ray's searcher and stopper over the study: classes made on first use (they subclass Ray's, and Ray is
imported inside functions only). Both hold no study: they act through the attached driver (driver.py)."""

from __future__ import annotations

import pickle
from typing import Any, Optional

from regsweep.search.backends.ray import STOP_KEY
from regsweep.search.backends.ray.driver import FINISHED, current_driver


def study_searcher_class():
    from ray.tune.search import Searcher

    class StudySearcher(Searcher):
        """Ray searcher over the study's Optuna sampler (``study.ask`` under the budget lock, the spec's space
        sampled define-by-run) through the attached :class:`RayDriver`. It holds only the metric and mode."""

        def __init__(self, metric: str, mode: str):
            super().__init__(metric=metric, mode=mode)

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True

        def suggest(self, trial_id: str):
            got = current_driver().suggest(trial_id)
            return Searcher.FINISHED if got == FINISHED else got

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            pass  # the trainable records every epoch itself

        def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
            current_driver().complete(trial_id, result, error)

        def save(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "wb") as fh:
                pickle.dump({"run_name": current_driver().run_name}, fh)

        def restore(self, checkpoint_path: str) -> None:
            pass  # all state lives in the study

    return StudySearcher


def overfit_stopper_class():
    from ray.tune import Stopper

    class OverfitStopper(Stopper):
        """The overfit pruner's rule (search/pruners/overfit.py) as a Ray stopper, on the study's recorded history:
        the same verdict as on the Optuna backend (COMPLETE ``stopped:overfit:<rule>@<epoch>``, or PRUNED when
        also behind the median / ``on_fire: prune``)."""

        def __init__(self, args: dict[str, Any]):
            self.args = dict(args)

        def __call__(self, trial_id: str, result: dict) -> bool:
            reason = current_driver().overfit_verdict(self.args, trial_id) if result.get("epoch") is not None \
                else None
            if reason is None:
                return False
            result[STOP_KEY] = reason  # the driver's complete() reads it from the last result
            return True

        def stop_all(self) -> bool:
            return False

    return OverfitStopper
