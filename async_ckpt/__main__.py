"""``python -m async_ckpt``: the same as the ``async-ckpt`` command."""

import sys

from async_ckpt.cli import main

sys.exit(main())
