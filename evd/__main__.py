"""``python -m evd`` is the ``evd`` command."""

import sys

from evd.cli import main

sys.exit(main())
