"""`python -m launch RECIPE [key=value ...] --backend ...`: the same as `sft launch`."""

import sys

from launch.cli import main

sys.exit(main())
