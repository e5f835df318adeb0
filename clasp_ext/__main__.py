"""``python -m clasp_ext generate ...`` (see clasp_ext.cli.generate)."""

import sys

from clasp_ext.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
