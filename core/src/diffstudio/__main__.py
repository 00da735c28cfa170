"""``python -m diffstudio``: the command line (works under ``accelerate launch -m diffstudio``)."""

from diffstudio.cli import main

raise SystemExit(main())
