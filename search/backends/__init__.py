"""Sweep backends: ``optuna_backend`` (local/cluster workers on an RDB study) and ``ray`` (Ray Tune; imports Ray
only inside functions)."""
