"""``python -m nanopar …``: see ``nanopar.cli``."""
from .cli import main

raise SystemExit(main())
