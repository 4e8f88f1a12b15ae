"""Where the offline training photographs come from, and how to get them.

Each source yields :class:`Candidate` photos with full provenance. Debian
packages are fetched with ``apt-get download`` and unpacked with ``dpkg -x``
(nothing is installed), the scikit-image wheel with ``pip download --no-deps``;
both are cached under ``<cache>/corpus``. Which files of a package are
*photographs* (not logos, drawings or UI graphics) was decided by looking at
them; the lists below record that decision.

Licences: for Debian packages the machine-readable ``/usr/share/doc/<pkg>/copyright``
(DEP-5) stanza matching the file is used (the last matching ``Files:``
pattern wins, matched against the path's trailing components, and for
container members against the member path), refined where the package ships
per-image licence data (LXQt's wallpaper ``License`` file, Palapeli's
``.desktop`` files, scikit-image's data docstrings).
"""

from __future__ import annotations

import ast
import fnmatch
import io
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from semsr.core.errors import InputError, UnavailableError
from semsr.core.paths import data_root
from semsr.data.corpus.containers import EetFile, RccFile, decode_eet_image


@dataclass(frozen=True)
class Candidate:
    """One source photo before conversion.

    ``path_in_package`` is the file inside the package (or below the data root
    for BSDS500); ``member`` the entry inside a container file.
    """

    source: str
    name: str
    load: Callable[[], bytes]
    path_in_package: str
    source_bytes: int
    licence: str
    licence_origin: str
    package: str | None = None
    package_version: str | None = None
    member: str | None = None
    downscale: int = 1


@dataclass(frozen=True)
class Unpacked:
    """An unpacked package: its root folder and version."""

    package: str
    version: str
    root: Path


# ----------------------------------------------------------------------------- fetching


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    if shutil.which(cmd[0]) is None:
        raise UnavailableError(f"`{cmd[0]}` is not available on this machine")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]
        raise UnavailableError(f"`{' '.join(cmd)}` failed: {last[0]}")
    return proc.stdout


def fetch_deb(package: str, cache: Path) -> Unpacked:
    """``apt-get download`` + ``dpkg -x`` a package into ``cache`` (reused when present)."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        _run(["apt-get", "download", package], cwd=debs)
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            raise UnavailableError(f"apt-get download {package} produced no .deb")
    deb = found[-1]
    version = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
    root = cache / "unpacked" / f"{package}_{version.replace(':', '%3a')}"
    if not (root / ".complete").exists():
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        _run(["dpkg", "-x", str(deb), str(root)])
        (root / ".complete").write_text(deb.name + "\n")
    return Unpacked(package, version, root)


def fetch_wheel(project: str, cache: Path) -> Path:
    """``pip download --no-deps`` a binary wheel of ``project`` into ``cache`` (reused when present)."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = project.replace("-", "_") + "-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        _run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(wheels), project]
        )
        found = sorted(wheels.glob(pattern))
        if not found:
            raise UnavailableError(f"pip download {project} produced no wheel")
    return found[-1]


# ----------------------------------------------------------------------------- licences


def normalise_licence(name: str) -> str:
    """Uniform spelling of a few licence names (``Public domain`` -> ``public-domain``, ``CC-BY 2.0`` -> ``CC-BY-2.0``)."""
    name = " ".join(name.split())
    if name.lower() in ("public domain", "public-domain", "pd"):
        return "public-domain"
    m = re.fullmatch(r"(?i)(CC[- ][A-Z-]+)[- ](\d(\.\d)?)", name)
    if m:
        return f"{m.group(1).upper().replace(' ', '-')}-{m.group(2)}"
    return name


def parse_dep5(text: str) -> list[tuple[list[str], str]]:
    """``(patterns, licence)`` of each ``Files:`` stanza of a DEP-5 copyright file, in order."""
    stanzas = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, val = line.partition(":")
                key = key.strip().lower()
                fields[key] = val.strip()
        if "files" in fields and "license" in fields:
            lic = fields["license"].split("  ")[0].strip() or "unknown"
            stanzas.append((fields["files"].split(), lic.split(" .")[0]))
    return stanzas


def _pattern_matches(pattern: str, path: str) -> bool:
    parts = path.strip("/").split("/")
    return any(fnmatch.fnmatchcase("/".join(parts[i:]), pattern) for i in range(len(parts)))


def debian_licence(root: Path, package: str, path: str) -> tuple[str, str]:
    """``(licence, origin)`` of ``path`` from the package's copyright file."""
    copyright_path = root / "usr" / "share" / "doc" / package / "copyright"
    rel = f"usr/share/doc/{package}/copyright"
    if not copyright_path.exists():
        return "unknown", f"no {rel} in the package"
    text = copyright_path.read_text(errors="replace")
    if not text.startswith("Format:"):
        m = re.search(r"GNU (Lesser |Library )?General Public License.{0,200}?version (\d(\.\d)?)", text, re.S)
        lic = (
            f"{'L' if m and m.group(1) else ''}GPL-{m.group(2)}+"
            if m and "any later" in text
            else (f"GPL-{m.group(2)}" if m else "see copyright")
        )
        return lic, f"{rel} (free-form)"
    best = ("unknown", f"{rel}: no Files stanza matches")
    for patterns, lic in parse_dep5(text):
        hit = next((p for p in patterns if _pattern_matches(p, path)), None)
        if hit:
            best = (lic, f"{rel} (Files: {hit})")
    return best


def _desktop_licence(desktop: Path) -> tuple[str, str] | None:
    if not desktop.exists():
        return None
    text = desktop.read_text(errors="replace")
    lic = re.search(r"^X-KDE-PluginInfo-License=(.+)$", text, re.M)
    author = re.search(r"^X-KDE-PluginInfo-Author=(.+)$", text, re.M)
    if not lic:
        return None
    by = f", author {author.group(1).strip()}" if author else ""
    return lic.group(1).strip(), f"{desktop.name} X-KDE-PluginInfo-License{by}"


# ----------------------------------------------------------------------------- sources


def _file_candidate(
    source: str, pkg: Unpacked, file: Path, licence: tuple[str, str] | None = None, downscale: int = 1
) -> Candidate:
    rel = file.relative_to(pkg.root).as_posix()
    lic = licence or debian_licence(pkg.root, pkg.package, rel)
    return Candidate(
        source,
        file.stem,
        file.read_bytes,
        rel,
        file.stat().st_size,
        lic[0],
        lic[1],
        pkg.package,
        pkg.version,
        downscale=downscale,
    )


def iter_bsds500(cache: Path) -> Iterator[Candidate]:
    """BSDS500 train + test splits from ``<data root>/train/bsds500`` (disjoint from B100)."""
    root = data_root()
    folder = None if root is None else root / "train" / "bsds500"
    if folder is None or not folder.is_dir():
        raise UnavailableError("BSDS500 not found: expected <data root>/train/bsds500 (set SEMSR_DATA)")
    for f in sorted(folder.glob("*.jpg")):
        yield Candidate(
            "bsds500",
            f.stem,
            f.read_bytes,
            f"train/bsds500/{f.name}",
            f.stat().st_size,
            "BSDS500 research use (Berkeley Segmentation Dataset)",
            "Berkeley BSDS500 release; no redistribution beyond research use",
        )


# LXQt wallpapers that are photographs (the others are logos / vector art)
LXQT_PHOTOS = (
    "Butterfly-Kenneth-Wimer.jpg",
    "Valendas.png",
    "after-the-rain.jpg",
    "appleflower.png",
    "beam.png",
    "butterfly.png",
    "cloud.png",
    "drop.png",
    "flowers.png",
    "fog.jpg",
    "this-is-not-windows.jpg",
)


def iter_lxqt(cache: Path) -> Iterator[Candidate]:
    pkg = fetch_deb("lxqt-themes", cache)
    folder = pkg.root / "usr/share/lxqt/wallpapers"
    note = folder / "License"
    lic_note = None
    if note.exists():
        m = re.search(r"creativecommons\.org/licenses/([a-z-]+)/([\d.]+)", note.read_text())
        if m:
            lic_note = (f"CC-{m.group(1).upper()}-{m.group(2)}", "usr/share/lxqt/wallpapers/License")
    for name in LXQT_PHOTOS:
        f = folder / name
        if f.exists():
            yield _file_candidate("lxqt", pkg, f, lic_note)


def iter_palapeli(cache: Path) -> Iterator[Candidate]:
    pkg = fetch_deb("palapeli-data", cache)
    for f in sorted((pkg.root / "usr/share/palapeli/collection").glob("*.jpg")):
        yield _file_candidate("palapeli", pkg, f, _desktop_licence(f.with_suffix(".desktop")))


def iter_kphotoalbum(cache: Path) -> Iterator[Candidate]:
    pkg = fetch_deb("kphotoalbum", cache)
    for f in sorted((pkg.root / "usr/share/kphotoalbum/demo").glob("*.jpg")):
        if f.name != "qt-logo.jpg":  # a logo, not a photograph
            yield _file_candidate("kphotoalbum", pkg, f)


# Enlightenment backgrounds that are photographs (Dunes, Flat-*, Paper-Flower, Squiggle*, Sunset-Hills are art)
ENLIGHTENMENT_PHOTOS = (
    "Bamboo",
    "Foggy-Trees",
    "God-Rays",
    "Green-Maple",
    "Lichen-Branches",
    "Mountain",
    "Peaks",
    "Red-Maple",
    "Sea-of-Lanterns",
    "Snow-Trees",
    "Spruce-Needles",
    "Sunset-Clouds",
    "White-Flower",
    "Yellow-Flower",
)


def iter_enlightenment(cache: Path) -> Iterator[Candidate]:
    """The largest JPEG of each photographic ``.edj`` background (the others are downscaled copies)."""
    pkg = fetch_deb("enlightenment-data", cache)
    folder = pkg.root / "usr/share/enlightenment/data/backgrounds"
    for stem in ENLIGHTENMENT_PHOTOS:
        f = folder / f"{stem}.edj"
        if not f.exists():
            continue
        eet = EetFile(f)
        best = None
        for entry in eet.names():
            if not entry.startswith("edje/images/"):
                continue
            img = decode_eet_image(eet.read(entry))
            if img is None or img.jpeg is None:
                continue
            with Image.open(io.BytesIO(img.jpeg)) as im:
                area = im.width * im.height
            if best is None or area > best[0]:
                best = (area, entry, img.jpeg)
        if best is None:
            continue
        rel = f.relative_to(pkg.root).as_posix()
        lic = debian_licence(pkg.root, pkg.package, rel)
        data = best[2]
        yield Candidate(
            "enlightenment",
            stem,
            lambda data=data: data,
            rel,
            len(data),
            lic[0],
            lic[1],
            pkg.package,
            pkg.version,
            member=best[1],
        )


def parse_credits(text: str) -> list[dict[str, object]]:
    """Stanzas of a GCompris-style resource README: ``Copyright:``, ``License:``, ``Source:``, ``Files:`` list."""
    stanzas = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, object] = {"files": []}
        in_files = False
        for line in block.splitlines():
            m = re.match(r"^([A-Za-z-]+):\s*(.*)$", line.strip())
            if m and m.group(1).lower() in ("copyright", "license", "source", "comments", "files", "author"):
                key, val = m.group(1).lower(), m.group(2).strip()
                in_files = key == "files"
                if in_files:
                    fields["files"] = val.split()
                else:
                    fields[key] = val
            elif in_files and line.strip():
                fields["files"] += line.split()  # type: ignore[operator]
        if fields["files"] and "license" in fields:
            stanzas.append(fields)
    return stanzas


def rcc_credits_licence(rcc: RccFile, member: str) -> tuple[str, str] | None:
    """Licence of ``member`` from the nearest ``README`` credits file above it in the archive."""
    parts = member.split("/")
    for depth in range(len(parts) - 1, 0, -1):
        folder = "/".join(parts[:depth])
        readme = f"{folder}/README"
        if readme not in rcc.entries:
            continue
        rel = "/".join(parts[depth:])
        for st in parse_credits(rcc.read(readme).decode("utf-8", errors="replace")):
            if any(fnmatch.fnmatchcase(rel, f) for f in st["files"]):  # type: ignore[union-attr]
                lic = str(st["license"])
                extra = "; ".join(f"{k}: {st[k]}" for k in ("copyright", "source") if k in st)
                return lic, f"{readme} in the archive ({extra})"
    return None


GCOMPRIS_ARCHIVES = ("explore_*.rcc", "erase.rcc", "clickgame.rcc", "categorization.rcc")
GCOMPRIS_MIN_SIDE = 400


def iter_gcompris(cache: Path) -> Iterator[Candidate]:
    """Photographs (WebP, short side >= 400) inside GCompris' Qt resource archives, downscaled 2x."""
    pkg = fetch_deb("gcompris-qt-data", cache)
    folder = pkg.root / "usr/share/gcompris-qt/rcc"
    files = sorted({f for pat in GCOMPRIS_ARCHIVES for f in folder.glob(pat)})
    for f in files:
        rcc = RccFile(f)
        rel = f.relative_to(pkg.root).as_posix()
        for member in rcc.paths():
            if not member.lower().endswith((".webp", ".jpg", ".jpeg")):
                continue
            data = rcc.read(member)
            with Image.open(io.BytesIO(data)) as im:
                if min(im.size) < GCOMPRIS_MIN_SIDE or im.mode not in ("RGB", "L"):
                    continue
            lic = rcc_credits_licence(rcc, member) or debian_licence(pkg.root, pkg.package, member)
            yield Candidate(
                "gcompris",
                f"{f.stem}-{Path(member).stem}",
                lambda data=data: data,
                rel,
                len(data),
                lic[0],
                lic[1],
                pkg.package,
                pkg.version,
                member=member,
                downscale=2,
            )


SKIMAGE_PHOTOS = ("astronaut", "camera", "brick", "grass", "gravel", "moon")


def _skimage_notes(wheel: zipfile.ZipFile) -> dict[str, str]:
    """Docstring 'Notes' of the ``skimage.data`` loader functions (they state each image's origin)."""
    try:
        tree = ast.parse(wheel.read("skimage/data/_fetchers.py"))
    except KeyError:
        return {}
    notes = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in SKIMAGE_PHOTOS:
            doc = ast.get_docstring(node) or ""
            notes[node.name] = " ".join(doc.split("Notes", 1)[-1].replace("-----", " ").split())
    return notes


def _classify_licence(note: str, default: str) -> str:
    low = note.lower()
    if "cc0" in low:
        return "CC0-1.0"
    if "public domain" in low:
        return "public-domain"
    return default


def iter_skimage(cache: Path) -> Iterator[Candidate]:
    wheel_path = fetch_wheel("scikit-image", cache)
    version = wheel_path.name.split("-")[1]
    wheel = zipfile.ZipFile(wheel_path)
    notes = _skimage_notes(wheel)
    for stem in SKIMAGE_PHOTOS:
        member = f"skimage/data/{stem}.png"
        try:
            info = wheel.getinfo(member)
        except KeyError:
            continue
        note = notes.get(stem, "")
        lic = _classify_licence(note, "BSD-3-Clause")
        origin = f"skimage.data.{stem} docstring: {note[:200]}"
        if lic == "BSD-3-Clause":
            origin = f"scikit-image LICENSE.txt (Files: *); the docstring names no licence: {note[:120]}"
        yield Candidate(
            "skimage",
            stem,
            lambda m=member, p=wheel_path: zipfile.ZipFile(p).read(m),
            wheel_path.name,
            info.file_size,
            lic,
            origin,
            "scikit-image (PyPI wheel)",
            version,
            member=member,
        )


SOURCES: dict[str, Callable[[Path], Iterator[Candidate]]] = {
    "bsds500": iter_bsds500,
    "lxqt": iter_lxqt,
    "palapeli": iter_palapeli,
    "kphotoalbum": iter_kphotoalbum,
    "gcompris": iter_gcompris,
    "skimage": iter_skimage,
    "enlightenment": iter_enlightenment,
}
DEFAULT_SOURCES = ("bsds500", "enlightenment", "gcompris", "lxqt", "kphotoalbum", "palapeli", "skimage")


def iter_source(name: str, cache: Path) -> Iterator[Candidate]:
    """Candidates of one source (``InputError`` for unknown names)."""
    try:
        fn = SOURCES[name]
    except KeyError:
        raise InputError(f"unknown source {name!r}; known: {', '.join(SOURCES)}") from None
    return fn(cache)
