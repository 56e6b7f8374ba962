import sys

from pgleader.cli import main

sys.exit(main())
