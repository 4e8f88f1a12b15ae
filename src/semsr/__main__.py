import sys

from semsr.cli import main

sys.exit(main())
