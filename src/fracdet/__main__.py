"""``python -m fracdet``: the command line without an installed entry point (e.g. ``PYTHONPATH=src``)."""

from fracdet.cli import main

raise SystemExit(main())
