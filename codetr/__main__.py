"""``python -m codetr ...`` (and ``torchrun ... -m codetr train ...``): the ``codetr`` command."""

from codetr.cli import main

raise SystemExit(main())
