"""Manifests as a new user writes them: null ids, a header only, run from the manifest's own folder."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from encoders.extract import ExtractionError, extract
from encoders.factory import load_encoder
from encoders.manifest import Manifest, ManifestError


@pytest.fixture(scope="module")
def text_encoder(tiny_clip_files):
    return load_encoder(f"open_clip:text:{tiny_clip_files['json']}?batch_size=16")


def test_a_null_id_in_parquet_is_an_error_row_naming_its_row(tmp_path, text_encoder):
    m = tmp_path / "manifest.parquet"
    pd.DataFrame({"id": ["a", None, "c", float("nan")], "caption": ["one", "two", "three", "four"]}).to_parquet(m)
    s = extract(Manifest.read(m), "caption", text_encoder, tmp_path / "s.h5")
    assert s.n == 2 and s.errors == [("", "empty id at manifest row 1"), ("", "empty id at manifest row 3")]
    with pytest.raises(ExtractionError, match=r"row 1, id '', column 'caption': empty id at manifest row 1"):
        extract(Manifest.read(m), "caption", text_encoder, tmp_path / "f.h5", on_error="fail")


def test_a_header_only_manifest_is_one_clear_line_not_an_empty_complete_store(tmp_path):
    m = tmp_path / "manifest.csv"
    m.write_text("id,caption\n")
    with pytest.raises(ManifestError) as err:
        Manifest.read(m)
    assert str(err.value) == (f"manifest {m} has no rows (only a header): nothing to embed; add rows or check that "
                              "the right file was given")
    m.write_text("")
    with pytest.raises(ManifestError, match="cannot be read as a table: No columns to parse"):
        Manifest.read(m)


def test_manifest_named_from_its_own_folder_names_the_dataset(tmp_path, monkeypatch):
    folder = tmp_path / "birds"
    folder.mkdir()
    pd.DataFrame({"id": ["a"], "caption": ["x"]}).to_csv(folder / "manifest.csv", index=False)
    monkeypatch.chdir(folder)
    assert Manifest.read("manifest.csv").name == "birds"
    assert Manifest.read(os.path.join("..", "birds", "manifest.csv")).name == "birds"
