"""`python -m privseg` is the same as the `privseg` command."""

import sys

from privseg.cli import main

sys.exit(main())
