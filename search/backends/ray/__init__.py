"""Run a study spec on Ray Tune, recorded exactly like the Optuna backend. Importing this package (or any of its
modules) imports no Ray: Ray is imported inside functions only.

A Tuner runs :func:`trainable.train_trial`, a thin adapter over the one trial body
(``regsweep.search.trial.run_trial``) that reports every epoch to Ray. Trials come from the study's own Optuna
sampler through the searcher (searcher.py: ``study.ask`` + the spec's space sampled define-by-run, conditions
included) on the SAME RDB study, under the same budget lock as the Optuna workers (search/loop.py), so
``n_trials`` stays the study's total of COMPLETE + PRUNED trials across runs and backends. search/record.py
writes every trial:

- the trainable writes the config, one history entry + ``report(objective, epoch)`` per epoch (epochs from 0)
  and, when it ends by itself, its end (``completed``, ``early_stopped``, the spec pruner's verdict, which runs
  inside the trial exactly as on the Optuna backend, or ``failed:<error>``);
- a trial that Ray stopped from outside cannot write its end; the driver (driver.py, a :class:`RayDriver`
  object) writes it through the same ``Recorder`` when Ray completes it: ``pruned:<scheduler>@<epoch>``
  (PRUNED) when Ray's scheduler stopped it, ``stopped:overfit:<rule>@<epoch>`` (COMPLETE) or
  ``pruned:overfit:...`` when the overfit stopper did, ``failed:...`` when its process died after Ray's retries.

The spec's optional ``ray:`` section is parsed by search/spec_checks.py (``parse_ray_section``, called by
search/spec.py)::

    ray:
      scheduler: {name: asha, args: {grace_period: 1, reduction_factor: 2}}   # fifo (default) | asha | median
                                                                              # | hyperband {reduction_factor}
      overfit: {patience: 3, window: 3}    # the overfit rule as a Ray stopper (search/pruners/overfit.py)

HyperBand pauses and resumes trials: under it the trainable reports every epoch with a Ray checkpoint holding
``regsweep.models.train``'s training state and a resumed trial continues from it (an exact replay) and
continues the trial's recorded history (``resumed_at`` lists the epochs it resumed at). A paused trial stays
RUNNING in the study with no process beating its heartbeat; while Ray runs, the driver beats the heartbeat of
every trial it asked that Ray has not finished, so neither it nor any other worker fails them as stale; when
the driver dies, the beats stop and they are.

``--resume`` (run.py) restores the study's latest Ray experiment. Experiments made by regsweep < 0.2 (whose
pickled state names the old ``search.backends.ray_backend`` module) are refused in one line: the driver records
``regsweep:ray_format`` in the study when it starts an experiment.

The storage URL (and its password) reaches the trials through the environment (``$REGSWEEP_RAY_STORAGE``), never
a trial's config: nothing Ray writes under its storage path contains it.
"""

STORAGE_ENV = "REGSWEEP_RAY_STORAGE"  # the storage URL, in every Ray worker's environment
RESULTS_ENV = "REGSWEEP_RAY_RESULTS"  # Ray's storage path (experiment dirs); default ~/ray_results
RUN_ATTR = "regsweep:ray_run"  # user attr of every trial a Ray driver asked: the Ray experiment's name
FORMAT_ATTR = "regsweep:ray_format"  # study attr: the format of the Ray experiments this study's drivers made
RAY_FORMAT = 2  # regsweep >= 0.2 (module paths under regsweep.search.backends.ray)
STOP_KEY = "regsweep_stop"  # the overfit stopper's stop reason, put into the result it stopped on
