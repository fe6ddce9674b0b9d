"""``python -m clipforge``: the same as the ``clipforge`` command."""
import sys

from .cli import main

sys.exit(main())
