"""``python -m quantizable``: the ``quantizable`` command."""

import sys

from quantizable.cli.main import main

sys.exit(main())
