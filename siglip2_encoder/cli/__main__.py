"""``python -m siglip2_encoder.cli``: the command line."""

from . import main

raise SystemExit(main())
