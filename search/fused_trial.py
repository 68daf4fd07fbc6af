"""Fused trials (issue 20), the trial side: a worker's asked group of trials trained as one fused model
(models/fused.py ``train_fused``), each member an ordinary trial.

Each member's config is ``trial.config_for`` (as ``run_trial`` builds it), its data residency resolved once. The
configs are split greedily into groups ``fusable()`` accepts; a member alone in its group (or whose config or data
fails) runs through ``run_trial`` itself, as a solo trial (no ``fused`` attr). A group of two or more: every member
gets its own :class:`Recorder` (record format 2) and writes its config, extra attrs and ``fused: {group, size}``
(group = the first member's trial number, size = the members trained together) with its first epoch; per epoch
the group's N records go in ONE storage transaction (``write_group``; one per member on a storage that
has no batched writes), then each member's pruner verdict (the study's pruner, the overfit rule) stops it alone.
A non-finite loss fails that member alone (``failed:non-finite ...``, as a solo run). At the end each member
writes the same attrs as a solo trial (``Recorder.finish``: best_epoch, stop_reason, n_params, ...), its
artifacts and best-epoch weights. A member that stops (pruned, stopped for overfitting, early-stopped, non-finite)
ends right after the epoch it stopped at: its final attrs are written and ``told`` (search/fuse.py tells Optuna
its state and drops it from the heartbeat) while the others train on. Its slot is refilled: ``refill(k)`` (search/
fuse.py ``ask_more``: new trials with the group's structural params, within the budget) gives new trials that join
the group at their epoch 0 with the same ``fused`` attr (``size`` is the group's slots); one whose config fails or
that cannot fuse (a re-queued retry with other structural params) runs alone after the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from regsweep.models.config import ConfigError, TrainConfig, get_path
from regsweep.models.fused import STRUCTURAL, fusable, train_fused
from regsweep.search import log
from regsweep.search import optuna_internals as internals
from regsweep.search.record import FAIL, FUSED_ATTR, Recorder, failure_reason
from regsweep.search.signals import Terminated, check_signals
from regsweep.search.spec import StudySpec
from regsweep.search.storage import TrialWriter, database_reason, retry_transient
from regsweep.search.trial import BestWeights, DataCache, Outcome, config_for, pruner_verdict, record_failure


def is_structural(path: str) -> bool:
    """Whether a dotted config path is one every member of a fused group shares (models/fused.py STRUCTURAL)."""
    return any(path == s or path.startswith(s + ".") for s in STRUCTURAL)


def fixed_params(spec: StudySpec, trial) -> dict[str, Any]:
    """Sample ``trial``'s params (``config_for``: the sampler runs now) and return the values of its structural
    space params, to fix for the rest of its group (search/fuse.py ``ask_group``); {} when its config fails."""
    try:
        cfg = config_for(spec, trial).to_dict()
    except ConfigError:
        return {}
    fixed = {}
    for p in spec.space:
        if is_structural(p.path):
            value = get_path(cfg, p.path)
            if p.contains(value):
                fixed[p.path] = value
    return fixed


def partition(cfgs: list[TrainConfig]) -> list[list[int]]:
    """Indices of ``cfgs`` in groups ``fusable()`` accepts (greedy, in order)."""
    groups: list[list[int]] = []
    for i, cfg in enumerate(cfgs):
        for g in groups:
            if fusable([cfgs[j] for j in g] + [cfg]) is None:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


@dataclass
class Member:
    trial: Any
    cfg: TrainConfig
    recorder: Recorder  # its sink: the trial's TrialWriter
    weights: Optional[BestWeights] = None
    tracked: bool = False


# hooks of the worker's objective: solo(trial) -> Outcome (run_trial), end(trial, history, state, value, weights)
Solo = Callable[[Any], Outcome]
End = Callable[[Any, list, str, Any, Optional[BestWeights]], None]
# told(position of the trial in the asked group, its Outcome): the trial has ended (its attrs written)
Told = Callable[[int, Outcome], None]
# refill(k) -> up to k new trials (asked, sampled, RUNNING) for a group's freed slots
Refill = Callable[[int], list]


def run_group(spec: StudySpec, trials: list, *, device: torch.device, data: DataCache, extra: dict[str, Any],
              solo: Solo, on_end: End, keep_weights: bool = False, trackers: Any = None,
              told: Optional[Told] = None, refill: Optional[Refill] = None) -> list[Outcome]:
    """Run an asked group of trials to their ends (see the module docstring); one :class:`Outcome` per trial, in
    order (the refills' after the asked trials, in the order ``refill`` gave them), each also given to ``told``
    as soon as that trial has ended. KeyboardInterrupt / :class:`Terminated` end every unfinished member FAIL
    and propagate."""
    outcomes: dict[int, Outcome] = {}
    trials = list(trials)  # grows with the refills: a position is an index here and in the caller's list

    def tell(pos: int, got: Outcome) -> Outcome:
        outcomes[pos] = got
        if told is not None:
            told(pos, got)
        return got

    cfgs: list[Optional[TrainConfig]] = []
    for trial in trials:
        try:
            cfgs.append(data.resolve(config_for(spec, trial), device))
        except Exception:  # run_trial records this failure exactly as a solo trial's
            cfgs.append(None)
    good = [i for i, c in enumerate(cfgs) if c is not None]
    try:
        for group in partition([cfgs[i] for i in good]):
            idx = [good[k] for k in group]
            if len(idx) == 1:
                tell(idx[0], solo(trials[idx[0]]))
                continue
            members = [Member(trials[i], cfgs[i], Recorder(TrialWriter(trials[i]), spec.objective),
                              BestWeights(spec.objective) if keep_weights else None) for i in idx]
            more = None
            if refill is not None:
                more = _refiller(spec, refill, trials, idx, members, device, data, keep_weights)
            train_group(spec, members, device=device, data=data, extra=extra, on_end=on_end, trackers=trackers,
                        told=lambda k, got, idx=idx: tell(idx[k], got), refill=more)
        for i, trial in enumerate(trials):
            if i not in outcomes:
                tell(i, solo(trial))
    except (KeyboardInterrupt, Terminated) as exc:  # the members that ended before it are told as they ended
        exc.outcomes = dict(outcomes)  # type: ignore[attr-defined]  (search/fuse.py run_group reads it)
        raise
    return [outcomes[i] for i in range(len(trials))]


def _refiller(spec: StudySpec, refill: Refill, trials: list, idx: list[int], members: list[Member],
              device: torch.device, data: DataCache, keep_weights: bool) -> Callable[[int], list[Member]]:
    """train_group's refill: new trials from ``refill`` appended to ``trials`` (their positions); those that
    fuse with the group become members (``idx`` maps a member to its position); the rest are left for run_group
    to run alone after the group (no position in ``idx``)."""

    def more(k: int) -> list[Member]:
        joined = []
        for trial in refill(k):
            trials.append(trial)
            try:
                cfg = data.resolve(config_for(spec, trial), device)
            except Exception:  # run_trial records this failure exactly as a solo trial's (after the group)
                cfg = None
            if cfg is None or fusable([members[0].cfg, cfg]) is not None:
                continue
            idx.append(len(trials) - 1)
            joined.append(Member(trial, cfg, Recorder(TrialWriter(trial), spec.objective),
                                 BestWeights(spec.objective) if keep_weights else None))
        return joined

    return more


def train_group(spec: StudySpec, members: list[Member], *, device: torch.device, data: DataCache,
                extra: dict[str, Any], on_end: End, trackers: Any = None,
                told: Optional[Told] = None,
                refill: Optional[Callable[[int], list[Member]]] = None) -> list[Outcome]:
    """Train ``members`` (two or more, fusable) with ``train_fused`` and record each; one Outcome per member,
    each also given to ``told`` (with the member's index) as soon as that member has ended. ``refill(k)``: up
    to k new members for freed slots (appended to ``members``; each starts recording as it joins). (Long: its
    callbacks to ``train_fused`` are closures over the group's members and ended outcomes; apart, they would
    pass that state around.)"""
    ended: dict[int, Outcome] = {}

    def member_end(i: int, _parts, hist) -> None:  # train_fused's on_end: this member stopped or finished
        ended[i] = got = _finish(spec, members[i], hist, on_end, trackers)
        if told is not None:
            told(i, got)

    group = {"group": members[0].trial.number, "size": len(members)}
    for m in members:
        m.recorder.start(m.cfg.to_dict(), {**extra, FUSED_ATTR: group})
    log.get(__name__).debug(f"fused group {group['group']}: trials {[m.trial.number for m in members]}")

    def records(items: list[tuple[int, int, dict[str, Any]]]) -> None:
        write_group([(members[i].recorder.sink, *members[i].recorder.stage_epoch(epoch, rec))
                     for i, epoch, rec in items])

    def report(i: int, epoch: int, record: dict[str, Any]) -> Optional[str]:
        check_signals()  # a SIGTERM/SIGINT swallowed during the epoch takes effect here
        m = members[i]
        reason = retry_transient(pruner_verdict, spec, m.trial, epoch)
        if m.weights is not None:
            m.weights.see(epoch, record)
        if trackers is not None:
            if not m.tracked:
                m.tracked = True
                trackers.start(m.trial)
            trackers.epoch(m.trial, epoch, record)
        return reason

    def watch(parts: list) -> None:  # the newest members' models (all of them at first, then a refill's)
        for m, p in zip(members[-len(parts):], parts):
            if m.weights is not None:
                m.weights.watch(p.model)

    def joined(k: int) -> list[TrainConfig]:
        new = refill(k) if refill is not None else []
        for m in new:
            m.recorder.start(m.cfg.to_dict(), {**extra, FUSED_ATTR: group})
            members.append(m)
        if new:
            log.get(__name__).debug(f"fused group {group['group']}: trials {[m.trial.number for m in new]} join")
        return [m.cfg for m in new]

    try:
        train_fused([m.cfg for m in members], device, report, records=records,
                    data=data.get(members[0].cfg.data, device), on_build=watch, on_end=member_end,
                    refill=joined if refill is not None else None)
    except (KeyboardInterrupt, Terminated) as exc:
        reason = "failed:terminated" if isinstance(exc, Terminated) else "failed:interrupted"
        for i, m in enumerate(members):
            if i not in ended:
                record_failure(m.recorder, reason)
                _end_tracker(trackers, m, FAIL, reason, None)
        raise
    except Exception as exc:  # an error of the group (or a database outage): every unended member FAIL with it
        reason = database_reason(exc) or failure_reason(exc)
        for i, m in enumerate(members):
            if i not in ended:
                record_failure(m.recorder, reason)
                _end_tracker(trackers, m, FAIL, reason, None)
                ended[i] = Outcome(FAIL, None, m.recorder.stop_reason or "", m.recorder.history)
                if told is not None:
                    told(i, ended[i])
    return [ended[i] for i in range(len(members))]


def _finish(spec: StudySpec, m: Member, hist, on_end: End, trackers: Any) -> Outcome:
    """One member's end, as ``run_trial`` ends a solo trial: its final attrs, artifacts, tracker run."""
    try:
        state, value = m.recorder.finish(hist)
    except Exception as exc:  # the database went away at the end: FAIL with the reason (retried by the loop)
        record_failure(m.recorder, database_reason(exc) or failure_reason(exc))
        state, value = FAIL, None
    got = Outcome(state, value, m.recorder.stop_reason or "", m.recorder.history)
    if got.history:
        on_end(m.trial, got.history, got.state, got.value, m.weights)
    _end_tracker(trackers, m, got.state, got.reason, got.history, value)
    return got


def _end_tracker(trackers: Any, m: Member, state: str, reason: str, history: Optional[list],
                 value: Any = None) -> None:
    if trackers is None or not m.tracked:
        return
    from regsweep.search.record import best_epoch

    trackers.end(m.trial, state, reason, history or [], best_epoch(history or [], m.recorder.objective), value)


def write_group(writes: list[tuple["TrialWriter", dict, Optional[tuple[float, int]]]]) -> int:
    """Several trials' writes (writer, attrs, report) in ONE transaction when every writer writes to the same RDB
    storage (a fused group's epoch records), else each through its own writer; returns the transactions made."""
    if not writes:
        return 0
    backend = writes[0][0].batched_backend
    if backend is None or len({id(w.batched_backend) for w, _, _ in writes}) != 1:
        for writer, attrs, report in writes:
            writer.write(attrs, report)
        return len(writes)
    batch = [(writer, attrs, writer.fresh(report)) for writer, attrs, report in writes]
    retry_transient(internals.write_trials, backend, [(w.trial_id, attrs, report) for w, attrs, report in batch])
    for writer, attrs, report in batch:
        writer.mirror(attrs, report)
    return 1
