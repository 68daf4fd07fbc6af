"""regsweep's search side: study specs, spaces, recording, pruners, backends and the CLI.

May import ``models``; ``models`` never imports this package. Importing it does no work.
"""
