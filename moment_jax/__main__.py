import sys

from moment_jax.cli import main

sys.exit(main())
