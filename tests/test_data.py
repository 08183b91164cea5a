"""The evaluation corpus split is fixed and disjoint."""

from pathlib import Path

import pytest

from veil.data import corpus_text, split_files
from veil.errors import DataError


def test_split_is_fixed_and_disjoint():
    files = [Path(f"play_{i:02d}_gut.txt") for i in range(12)]
    held = split_files(list(reversed(files)), "heldout")
    train = split_files(files, "train")
    assert [f.name for f in held] == ["play_04_gut.txt", "play_09_gut.txt"]
    assert not set(held) & set(train) and len(held) + len(train) == 12


def test_unknown_corpus_and_split():
    with pytest.raises(DataError, match="unknown corpus"):
        corpus_text("wikipedia", "train")
    with pytest.raises(DataError, match="unknown split"):
        split_files([], "test")
