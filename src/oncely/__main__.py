"""``python -m oncely``: the ``oncely`` command (see :mod:`oncely.cli`)."""

from oncely.cli import main

if __name__ == "__main__":
    main()
