"""The ``carrot-run`` command line."""
