import sys

from tribune.trainer.cli import main

sys.exit(main())
