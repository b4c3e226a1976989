"""Tests for data/hub.py on local datasets (no network): a DatasetDict saved with save_to_disk and a folder of
parquet files in the hub's layout; cleaning, carving of missing dev/test splits, sampling, bad language keys."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from data.corpus import sha256_of
from data.hub import prepare_hub
from nmt.cli import main
from nmt.errors import NMTError


def pairs(count: int, start: int = 0) -> list[dict]:
    return [{"translation": {"de": f"Satz Nummer {i} .", "en": f"sentence number {i} ."}}
            for i in range(start, start + count)]


MESSY = [
    {"translation": {"de": "  zwei\nZeilen\t hier ", "en": "two\r\nlines\there"}},
    {"translation": {"de": "   ", "en": "nothing on the other side"}},
    {"translation": {"de": "nichts gegenüber", "en": ""}},
]


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


@pytest.fixture
def saved_dict(tmp_path) -> Path:
    folder = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(MESSY + pairs(100)),
        "validation": datasets.Dataset.from_list(pairs(5, 1000)),
        "test": datasets.Dataset.from_list(pairs(7, 2000)),
    }).save_to_disk(str(folder))
    return folder


@pytest.fixture
def parquet_folder(tmp_path) -> Path:
    """The hub's parquet layout with a train and a test split only."""
    folder = tmp_path / "parquet"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list(pairs(400)).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(pairs(6, 3000)).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    return folder


def test_saved_dataset_dict_is_cleaned_and_written_with_a_manifest(saved_dict, tmp_path):
    out = tmp_path / "corpus"
    manifest = prepare_hub(str(saved_dict), None, "de", "en", out)
    assert manifest["counts"] == {"train": 101, "dev": 5, "test": 7}
    assert lines(out / "train.de")[0] == "zwei Zeilen hier" and lines(out / "train.en")[0] == "two lines here"
    assert lines(out / "dev.en")[0] == "sentence number 1000 ."
    assert manifest["source"]["splits"] == {"train": "train", "dev": "validation", "test": "test"}
    assert json.loads((out / "manifest.json").read_text())["sha256"]["test.de"] == sha256_of(out / "test.de")


def test_language_direction_follows_src_and_tgt(saved_dict, tmp_path):
    prepare_hub(str(saved_dict), None, "en", "de", tmp_path / "corpus")
    assert lines(tmp_path / "corpus" / "test.en")[0] == "sentence number 2000 ."


def test_missing_dev_split_is_carved_from_train_deterministically(parquet_folder, tmp_path):
    first = prepare_hub(str(parquet_folder), None, "de", "en", tmp_path / "a")
    second = prepare_hub(str(parquet_folder), None, "de", "en", tmp_path / "b")
    assert first["counts"] == {"train": 380, "dev": 20, "test": 6}  # 5 % of train
    assert first["source"]["splits"]["dev"] == "carved from train"
    assert first["sha256"] == second["sha256"]
    dev, train = set(lines(tmp_path / "a" / "dev.de")), set(lines(tmp_path / "a" / "train.de"))
    assert dev and not dev & train


def test_dev_and_test_both_carved_when_named_splits_are_absent(saved_dict, tmp_path):
    manifest = prepare_hub(str(saved_dict), None, "de", "en", tmp_path / "c", dev_split="dev", test_split="eval")
    assert manifest["counts"] == {"train": 91, "dev": 5, "test": 5}
    assert manifest["source"]["splits"]["test"] == "carved from train"


def test_max_train_keeps_a_sample_in_corpus_order(parquet_folder, tmp_path):
    manifest = prepare_hub(str(parquet_folder), None, "de", "en", tmp_path / "d", max_train=50)
    assert manifest["counts"]["train"] == 50
    numbers = [int(line.split()[2]) for line in lines(tmp_path / "d" / "train.de")]
    assert numbers == sorted(numbers)


def test_bad_language_keys_are_an_nmt_error(saved_dict, parquet_folder, tmp_path):
    with pytest.raises(NMTError, match=r"languages \['de', 'en'\]"):
        prepare_hub(str(saved_dict), None, "fr", "en", tmp_path / "e")
    with pytest.raises(NMTError, match="not .'de', 'es'."):
        prepare_hub(str(parquet_folder), None, "de", "es", tmp_path / "f")
    with pytest.raises(NMTError, match="max_train"):
        prepare_hub(str(saved_dict), None, "de", "en", tmp_path / "g", max_train=-1)


def test_too_small_a_train_split_to_carve_from_is_an_nmt_error(tmp_path):
    datasets.Dataset.from_list(pairs(2)).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(NMTError, match="too few to carve dev, test"):
        prepare_hub(str(tmp_path / "single"), None, "de", "en", tmp_path / "h")


def test_prepare_hub_command_writes_the_corpus(saved_dict, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["prepare", "hub", "--name", str(saved_dict), "--src-lang", "de", "--tgt-lang", "en",
                 "--out", str(out)]) == 0
    assert len(lines(out / "test.en")) == 7
    assert main(["prepare", "hub", "--name", str(tmp_path / "nowhere"), "--src-lang", "de", "--tgt-lang", "en",
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
