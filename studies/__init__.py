"""Built-in study specs (``*.yaml``; base TrainConfigs in ``base/``). ``regsweep run NAME`` runs one by name."""
