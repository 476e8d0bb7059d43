"""``python -m hub_ccrop ...`` = ``hub-ccrop ...`` (``accelerate launch -m hub_ccrop train RECIPE``)."""

import sys

from hub_ccrop.commands import main

if __name__ == "__main__":
    sys.exit(main())
