"""Sweep backends: ``optuna_backend`` (local/cluster workers on an RDB study) and ``ray_backend`` (lazy Ray)."""
