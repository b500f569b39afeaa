import sys

from quietstar.cli import main

sys.exit(main())
