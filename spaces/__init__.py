"""Built-in search spaces (``*.yaml``), included by the built-in studies as ``../spaces/NAME.yaml``."""
