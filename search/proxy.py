"""The worker's side of a `regsweep storage-proxy` (``grpc://HOST:PORT``): Optuna's GrpcStorageProxy plus the
three requests regsweep's worker loop needs that Optuna's proxy protocol has no call for.

Optuna's gRPC protocol carries storage calls only; it has no heartbeat and no lock. regsweep sends both as
attribute writes that the proxy (search/proxy_server.py) intercepts and never stores:

- **heartbeat**: ``set_trial_system_attr(trial_id, HEARTBEAT_KEY, <anything>)``; the proxy calls
  ``record_heartbeat(trial_id)`` on its own database (its own clock) and fails trials whose beats stop.
- **lock**: ``set_study_system_attr(0, LOCK_KEY, {"study": NAME, "op": "acquire"|"release", "token": T})``;
  the proxy holds the study's budget lock (its advisory lock, on its own connection) between the two, and
  drops a lease held longer than its LEASE seconds (the holder died).
- **admission** needs no request: the proxy refuses a trial's move to RUNNING (``create_new_trial`` or a
  WAITING trial popped by ``ask``) while COMPLETE + PRUNED + RUNNING >= the study's ``regsweep:n_trials``;
  the refusal's text holds FULL and reaches the worker as :class:`BudgetFull`.

grpc is imported only when a proxy URL is used.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Iterator, Optional

HEARTBEAT_KEY = "regsweep:proxy:heartbeat"
LOCK_KEY = "regsweep:proxy:lock"
FULL = "regsweep:budget-full"  # in the text of the proxy's refusal of a RUNNING trial over the budget
LEASE = 120.0  # seconds a worker may hold a study's lock through the proxy before the proxy takes it back
BUSY = "regsweep:lock-busy"  # in the text of the proxy's answer to a lock request it could not grant in LOCK_WAIT
LOCK_WAIT = 1.0  # seconds the proxy waits for a study's lock per request (a waiting request holds a server thread)
LOCK_TIMEOUT = 600.0  # seconds a worker asks again for a study's lock before it gives up


class BudgetFull(Exception):
    """The proxy refused a new RUNNING trial: COMPLETE + PRUNED + RUNNING trials fill the study's budget."""


def refused(exc: BaseException) -> bool:
    """Whether ``exc`` (a grpc.RpcError) is the proxy's refusal of a trial over the budget."""
    details = getattr(exc, "details", None)
    try:
        return callable(details) and FULL in (details() or "")
    except Exception:  # noqa: BLE001 - an RpcError without details
        return False


def client_class():
    """``ProxyClient``: Optuna's GrpcStorageProxy with regsweep's heartbeat, lock and refusal (built on first use:
    Optuna's class imports grpc lazily, and so does this module). (Long: its body is the class's, defined here
    rather than at module level for that lazy import.)"""
    cls = globals().get("ProxyClient")
    if cls is not None:
        return cls
    import grpc
    from optuna.storages import GrpcStorageProxy

    class ProxyClient(GrpcStorageProxy):
        """A storage reached through a `regsweep storage-proxy`. ``heartbeat_interval`` (seconds, or None) makes
        :func:`regsweep.search.loop.beat_once` and ``Heartbeat`` beat through :meth:`record_heartbeat`."""

        def __init__(self, *, host: str, port: int, heartbeat_interval: Optional[int] = None) -> None:
            super().__init__(host=host, port=port)
            self._heartbeat_interval = heartbeat_interval

        def get_heartbeat_interval(self) -> Optional[int]:
            return self._heartbeat_interval

        def record_heartbeat(self, trial_id: int) -> None:
            self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, 1)

        def create_new_trial(self, study_id, template_trial=None):
            try:
                return super().create_new_trial(study_id, template_trial)
            except grpc.RpcError as exc:
                if refused(exc):
                    raise BudgetFull(FULL) from None
                raise

        def set_trial_state_values(self, trial_id, state, values=None):
            try:
                return super().set_trial_state_values(trial_id, state, values)
            except grpc.RpcError as exc:
                if refused(exc):
                    raise BudgetFull(FULL) from None
                raise

        @contextlib.contextmanager
        def lock(self, study_name: str) -> Iterator[None]:
            """The study's budget lock, held by the proxy for this worker until the block ends."""
            import time

            token, deadline = uuid.uuid4().hex, time.monotonic() + LOCK_TIMEOUT
            while True:  # each request waits LOCK_WAIT in the proxy at most, so waiters never fill its threads
                try:
                    self.set_study_system_attr(0, LOCK_KEY, {"study": study_name, "op": "acquire", "token": token})
                    break
                except grpc.RpcError as exc:
                    if BUSY not in (exc.details() or "") or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            try:
                yield
            finally:
                with contextlib.suppress(grpc.RpcError):  # a proxy that went away took the lease with it
                    self.set_study_system_attr(0, LOCK_KEY, {"study": study_name, "op": "release", "token": token})

    ProxyClient.__module__ = __name__
    globals()["ProxyClient"] = ProxyClient
    return ProxyClient


def connect(host: str, port: int, *, heartbeat_interval: Optional[int] = None, wait: float = 10.0):
    """A :class:`ProxyClient` once the proxy answers; ConnectionError after ``wait`` seconds without it."""
    import warnings

    import optuna

    with warnings.catch_warnings():  # Optuna marks its gRPC proxy experimental; regsweep tests it as it uses it
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        client = client_class()(host=host, port=port, heartbeat_interval=heartbeat_interval)
    client.wait_server_ready(timeout=wait)
    return client


def rpc_errors() -> tuple[type[BaseException], ...]:
    """grpc's RpcError when grpc is loaded (a proxy in use), else nothing: a proxy that is restarting or
    unreachable is a transient storage error, like a dropped database connection."""
    import sys

    grpc = sys.modules.get("grpc")
    return (grpc.RpcError,) if grpc is not None and hasattr(grpc, "RpcError") else ()
