"""What went into each table of the rehearsal (`make reproduce-tiny`: scripts/reproduce_paper.sh
with TINY=1 on phantoms). Marked `rehearsal`: these read its outputs in data/tiny/ and runs/tiny/, so
they run after it (the Makefile target runs both), not in `make test`."""

import hashlib
import json

import numpy as np
import pytest

from common import load_stage, read_nifti, xyz_to_dhw
from conftest import REPO

pytestmark = pytest.mark.rehearsal
ev = load_stage("06_eval")
pt = load_stage("scripts/paper_tables")
DATASETS = ("act1k", "totalseg")


@pytest.fixture(params=DATASETS)
def dataset(request):
    runs = REPO / "runs" / "tiny" / request.param
    prep = REPO / "data" / "tiny" / request.param / "prep"
    if not (runs / "tables.md").is_file():
        pytest.fail(
            f"{runs / 'tables.md'} is missing: run `make reproduce-tiny` (these tests check its outputs)"
        )
    return request.param, runs, prep


def mask_digest(path):
    return hashlib.sha1(np.ascontiguousarray(read_nifti(path, None)[0]).tobytes()).hexdigest()


def test_every_table_row_from_the_set_the_paper_defines(dataset):
    name, runs, _ = dataset
    metrics = pt.check(runs, table3_size=4)  # raises on a wrong recipe
    text = (runs / "tables.md").read_text()
    for t, (_, _, rows) in pt.TABLES.items():
        assert set(metrics[t]["results"]) == {"real"} | {n for _, n, _ in rows if n}, (
            f"Table {t}: other sets"
        )
        for label, _, _ in rows:
            assert f"| {label} |" in text
    for figure in ("eval_table1/mds.png", "ssl/dice.png", "ssl/table.md"):
        assert (runs / figure).stat().st_size > 0


def test_set_compositions_and_masks(dataset):
    _, runs, prep = dataset
    n_train = len(json.loads((prep / "split.json").read_text())["train"])
    for folder, original, augmented in [
        ("samples_full", n_train - n_train // 2, n_train // 2),
        ("samples_v0", n_train - n_train // 2, n_train // 2),
        ("samples_v2_unseen", 0, n_train),
        ("samples_table3_w1.0", 0, 4),
    ]:
        index = json.loads((runs / folder / "samples.json").read_text())
        assert index["written"] == {"original": original, "augmented": augmented}, folder
        for sid, rec in index["samples"].items():
            mine = mask_digest(runs / folder / f"{sid}_mask.nii.gz")
            source = mask_digest(prep / "masks" / f"{rec['case']}.nii.gz")
            assert (mine == source) == (rec["mask"] == "original"), (folder, sid, rec)
    # Table 3: every w saw the same augmented masks, voxel for voxel
    digests = [
        {
            p.name: mask_digest(p)
            for p in sorted((runs / f"samples_table3_w{w}").glob("sample_*_mask.nii.gz"))
        }
        for w in ("0.5", "1.0", "1.5", "2.0")
    ]
    assert len(digests[0]) == 4 and all(d == digests[0] for d in digests)


def test_localised_box_from_the_training_masks(dataset):
    _, runs, prep = dataset
    train = json.loads((prep / "split.json").read_text())["train"]
    box = ev.organ_box([xyz_to_dhw(read_nifti(prep / "masks" / f"{c}.nii.gz", None)[0]) for c in train])
    for t in (1, 2, 3):
        settings = json.loads((runs / f"eval_table{t}" / "metrics.json").read_text())["settings"]
        assert (
            settings["organ_box"] == box
            and settings["organ_box_from"] == f"{len(train)} masks of the training split"
        )
        assert settings["features"]["weights"] == "random"  # the rehearsal's offline path, announced


def test_missing_tumours_are_reported(dataset):
    name, _, prep = dataset
    summary = json.loads((prep / "masks" / "summary.json").read_text())
    # the TotalSegmentator layout labels no tumour (like the real dataset): 02 must say so in its summary
    assert bool(summary["warnings"]) == (summary["counts"]["with_tumour"] == 0)
    if name == "totalseg":
        assert summary["counts"]["with_tumour"] == 0 and "no mask holds a tumour" in summary["warnings"][0]
