"""``python -m wanstudio.train``: see wanstudio/train/train.py."""

from .run import main

raise SystemExit(main())
