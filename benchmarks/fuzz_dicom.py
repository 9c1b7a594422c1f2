"""Long fuzzing of the DICOM decoder: damaged headers must be read or refused with fracdet's own error.

    python benchmarks/fuzz_dicom.py [--tries 40000] [--seed 1] [--out benchmarks/results-fuzz-dicom.json]

The suite mutates 200 headers a run (``tests/test_bad_inputs.py``); this runs as many as asked. Each try
takes one of the readable DICOM variants of ``tests/dicom_files.py`` (every transfer syntax and display
pipeline fracdet reads) of a small radiograph-like image, overwrites one to six bytes among its first 600
(the preamble, the file meta and the first elements) and decodes it with
:func:`fracdet.data.decode.decode_image`. Anything other than a decoded image or an
:class:`~fracdet.data.decode.ImageReadError` is an escape: in the web app, a 500. Reported: the tries, and
the escapes by variant and exception type, with one example's mutations to replay. The same seed and tries
give the same files.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.dicom_files import READABLE, available, write_bytes  # noqa: E402


def seeds() -> list[tuple[str, bytes]]:
    grey = np.zeros((48, 40), np.uint8)
    grey[::3] = 200
    grey[:, ::5] = 90
    return [(v.name, write_bytes(v.build(grey))) for v in READABLE if available(v)]


def main(argv: list[str] | None = None) -> int:
    from fracdet.data.decode import ImageReadError, decode_image

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=40_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    files = seeds()
    rng = random.Random(args.seed)
    escapes: collections.Counter[tuple[str, str]] = collections.Counter()
    examples: dict[tuple[str, str], dict] = {}
    start = time.perf_counter()
    warnings.simplefilter("ignore")  # pydicom warns on every damaged value
    for k in range(args.tries):
        name, data = rng.choice(files)
        damaged = bytearray(data)
        edits = [(rng.randrange(min(len(data), 600)), rng.randrange(256)) for _ in range(rng.randint(1, 6))]
        for at, value in edits:
            damaged[at] = value
        try:
            decode_image(bytes(damaged))
        except ImageReadError:
            pass
        except Exception as exc:
            key = (name, type(exc).__name__)
            escapes[key] += 1
            examples.setdefault(key, {"try": k, "edits": edits, "message": str(exc)[:120]})
        if sys.stderr.isatty() and k % 1000 == 999:
            rate = (k + 1) / (time.perf_counter() - start)
            print(f"\r{k + 1:,}/{args.tries:,} tries, {rate:.0f}/s, {sum(escapes.values())} escapes", end="",
                  file=sys.stderr, flush=True)  # fmt: skip
    seconds = time.perf_counter() - start
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(f"{args.tries:,} tries in {seconds:.0f} s (seed {args.seed}): {sum(escapes.values())} escapes")
    for (name, kind), count in escapes.most_common():
        print(f"  {count:5d}  {name}: {kind} (first at try {examples[(name, kind)]['try']})")
    if args.out:
        rows = [{"variant": n, "exception": e, "count": c, **examples[(n, e)]} for (n, e), c in escapes.most_common()]
        args.out.write_text(json.dumps({"tries": args.tries, "seed": args.seed, "seconds": round(seconds, 1),
                                        "escapes": rows}, indent=2) + "\n")  # fmt: skip
    return 1 if escapes else 0


if __name__ == "__main__":
    raise SystemExit(main())
