"""python -m kseed: the same as the kseed-fed console script."""
import sys

from .cli import main

sys.exit(main())
