import sys

from irmlens.cli import main

sys.exit(main())
