"""Makes a benchmark run as ``python benchmarks/<topic>/<script>.py`` find what it shares:
``benchmarks/`` (the ``helpers`` package) and ``benchmarks/decoding/`` (``quantized_decode``'s
byte counts, which other topics reuse). Imported for that effect only."""

import sys
from pathlib import Path

_BENCHMARKS = Path(__file__).resolve().parent.parent
for _folder in (_BENCHMARKS, _BENCHMARKS / "decoding"):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))
