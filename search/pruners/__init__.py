"""Pruners: one per module. ``registry`` maps spec names to pruner factories (Optuna's stock pruners and
regsweep's own); ``compose`` combines them (any_of / all_of)."""
