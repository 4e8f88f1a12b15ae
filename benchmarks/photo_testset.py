"""Build the default model's extra photo test set from the Debian package ``mate-backgrounds``.

The 13 photographs of ``mate-backgrounds`` 1.26.0-1 (``nature/*.jpg`` and ``abstract/Elephants.jpg``,
GPL-2+, authors in the package's ``copyright`` file) are not in the training corpus
(``semsr data build-corpus``) nor in any benchmark. Each photo is resized with area averaging so its
short side is 768 px (removes the JPEG blocks of the wallpapers) and cut into three 384 x 384 crops: top
left, centre, bottom right -- 39 HR images with sky, water, petals, bokeh, sand and foliage. A
``manifest.json`` records each crop's package, source path, source size, crop box and licence.

    apt-get download mate-backgrounds && dpkg -x mate-backgrounds_*.deb mate
    python benchmarks/photo_testset.py --root mate --out photos39
    semsr bench --methods default,realesrgan-x4plus --datasets hr:photos39 --degradation realesrgan
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

PACKAGE = "mate-backgrounds 1.26.0-1"
PHOTOS = [
    "nature/Aqua.jpg",
    "nature/Blinds.jpg",
    "nature/Dune.jpg",
    "nature/FreshFlower.jpg",
    "nature/Garden.jpg",
    "nature/GreenMeadow.jpg",
    "nature/LadyBird.jpg",
    "nature/RainDrops.jpg",
    "nature/Storm.jpg",
    "nature/TwoWings.jpg",
    "nature/Wood.jpg",
    "nature/YellowFlower.jpg",
    "abstract/Elephants.jpg",
]
SHORT_SIDE = 768
CROP = 384


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, required=True, help="the unpacked package (dpkg -x ... ROOT)")
    p.add_argument("--out", type=Path, required=True, help="output folder of the HR crops")
    args = p.parse_args()
    base = args.root / "usr/share/backgrounds/mate"
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for rel in PHOTOS:
        img = Image.open(base / rel).convert("RGB")
        w, h = img.size
        f = SHORT_SIDE / min(w, h)
        small = img.resize((round(w * f), round(h * f)), Image.Resampling.BOX)
        sw, sh = small.size
        boxes = {"tl": (0, 0), "c": ((sw - CROP) // 2, (sh - CROP) // 2), "br": (sw - CROP, sh - CROP)}
        for tag, (x, y) in boxes.items():
            name = f"{Path(rel).stem}_{tag}.png"
            small.crop((x, y, x + CROP, y + CROP)).save(args.out / name)
            manifest.append(
                {
                    "file": name,
                    "package": PACKAGE,
                    "source": f"/usr/share/backgrounds/mate/{rel}",
                    "source_size": [w, h],
                    "resized_to": [sw, sh],
                    "crop_box": [x, y, x + CROP, y + CROP],
                    "licence": "GPL-2+",
                }
            )
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(manifest)} crops in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
