"""``python -m knockout``: the command line (:func:`knockout.cli.main`)."""

import sys

from knockout.cli import main

sys.exit(main())
