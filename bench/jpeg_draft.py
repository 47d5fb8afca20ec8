"""CPU decode + test transform of big JPEG photos, with and without Split.load's draft
(libjpeg DCT scaling), side by side in one run, one process.

    python bench/jpeg_draft.py [--n 40] [--size 2000x1500] [--out bench/results/jpeg_draft.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ltcli.data import Split
from ltcli.transforms import test_resize, test_transform


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--size", default="2000x1500", help="photo size WxH")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    w, h = map(int, args.size.lower().split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="ltcli-draft-"))
    paths = []
    for i in range(args.n):
        small = np.random.default_rng(i).integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        p = tmp / f"{i}.jpg"
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(p, quality=90)
        paths.append(str(p))
    split = Split("bench", np.zeros(args.n, dtype=np.int64), paths=paths)
    tf = test_transform(224)
    rates = {}
    for rnd in range(2):  # alternate, so both see the same machine load
        for name, draft in (("full", None), ("draft", test_resize(224))):
            t0 = time.perf_counter()
            for i in range(args.n):
                tf(split.load(i, draft=draft))
            rates.setdefault(name, []).append(args.n / (time.perf_counter() - t0))
    best = {k: round(max(v), 1) for k, v in rates.items()}
    print(f"{w}x{h} JPEG -> test_transform(224), images/s on one core: full decode {best['full']}, "
          f"draft {best['draft']} ({best['draft'] / best['full']:.1f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps({"photo": [w, h], "images_per_s": best}, indent=2) + "\n")


if __name__ == "__main__":
    main()
