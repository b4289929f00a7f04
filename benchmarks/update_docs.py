"""Write the reference pages of docs/ (cli.md, ops.md, methods.md) from the code itself (what each holds: `lib.docs`).

    python benchmarks/update_docs.py        (update_readme.py runs it too)

The pages describe this checkout's library: run with ``PYTHONPATH=.`` from the repository's root (or an
editable install of this checkout); another checkout's library is refused.
"""

from __future__ import annotations

import argparse
import sys

from lib import require_checkout


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    require_checkout()
    from lib.docs import write_pages

    write_pages()
    return 0


if __name__ == "__main__":
    sys.exit(main())
