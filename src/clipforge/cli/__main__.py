"""``python -m clipforge.cli``: the same as the ``clipforge`` command."""
import sys

from . import main

sys.exit(main())
