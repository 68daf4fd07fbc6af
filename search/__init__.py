"""regsweep's search side: study specs, spaces, recording, pruners, backends and the CLI.

May import ``regsweep.models``; ``regsweep.models`` never imports this package. Importing it does no work.
"""

if __name__ == "search":  # imported by its pre-0.2 name (a checkout on sys.path): refuse in one line
    raise ImportError("regsweep 0.2 moved 'search' to 'regsweep.search': import regsweep.search instead "
                      "(README: Breaking changes in 0.2)")
