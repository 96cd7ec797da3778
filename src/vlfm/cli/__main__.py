import sys

from vlfm.cli import main

sys.exit(main())
