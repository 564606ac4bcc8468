"""`python -m cat_train.queue ...` runs the command as `python -m cat_train queue ...` does."""
import sys

from .cli import main

sys.exit(main())
