"""``python -m hub_ccrop.cli``: the ``hub-ccrop`` command under its former module name (:mod:`hub_ccrop.commands`)."""

import sys

from hub_ccrop.commands import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
