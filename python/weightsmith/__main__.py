"""``python -m weightsmith`` and the ``weightsmith`` console script: the command line."""

import sys

from . import _native


def main() -> None:
    sys.exit(_native.main(["weightsmith"] + sys.argv[1:]))


if __name__ == "__main__":
    main()
