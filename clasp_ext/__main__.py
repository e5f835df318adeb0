"""``python -m clasp_ext generate ...`` (see clasp_ext.decoding.cli)."""

import sys

from clasp_ext.decoding.cli import main

if __name__ == "__main__":
    sys.exit(main())
