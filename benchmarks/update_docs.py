"""Write the reference pages of docs/ from the code itself: cli.md, ops.md and methods.md.

    python benchmarks/update_docs.py        (update_readme.py runs it too)

`docs/cli.md`: every option of the click command, as `--help` prints it. `docs/ops.md`: every registered op,
grouped by the family module that holds its rule, with the rule's formula (its docstring) and its opset range;
what is not listed freezes the channels it touches. `docs/methods.md`: every registered method with its `--help`
line, whether it needs calibration data, whether a dry run shows its plan, the criteria it takes and its own
settings (flag, default, help). Nothing in these pages is written by hand, so they cannot drift from the code.
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
