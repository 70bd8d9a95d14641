"""``python -m osp COMMAND ...``: the ``osp`` console script (osp.cli.main)."""
import sys

from osp.cli import main

if __name__ == "__main__":
    sys.exit(main())
