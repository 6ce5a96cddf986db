"""``carrot-run``, kept at the top level as the design card lays out the repository; the commands live in
:mod:`carrot.cli` (the installed entry point), so ``python -m cli.main`` and ``python -m carrot.cli`` are the same."""
from carrot.cli import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    main()
