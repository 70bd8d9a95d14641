import sys

from osp.cli import main

sys.exit(main())
