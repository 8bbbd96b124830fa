"""scripts/paper_tables.py: the recipe behind each table row. Hand-made eval outputs and sample
indexes: the right recipe passes, and each wrong one the paper run could make (originals in an ×
row or in Table 3, no augmentation in Table 1, Table 3's w seeing other masks, a short or
half-finished set) stops it."""

import json

import pytest

from common import load_stage

pt = load_stage("scripts/paper_tables")

N_TRAIN, N3 = 6, 4


def sample_set(folder, n_original, n_augmented, n_train=N_TRAIN, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    samples = {}
    for i in range(n_original + n_augmented):
        aug = i >= n_original
        samples[f"sample_{i:05d}"] = {
            "case": f"c{i % n_train}",
            "mask": "augmented" if aug else "original",
            "augmentation": {"rotate_deg": float(seed + i)} if aug else None,
        }
    counts = {"original": n_original, "augmented": n_augmented}
    (folder / "samples.json").write_text(
        json.dumps({"composition": counts, "written": counts, "n_train": n_train, "samples": samples})
    )
    return folder


def paper_run(root):
    """The outputs of a right recipe: the sets of reproduce_paper.sh and the three evaluations."""
    sets = {m: sample_set(root / f"samples_{m}", 3, 3) for m in ("v0", "v1", "v2", "v3", "full")}
    sets |= {f"{m}_x": sample_set(root / f"samples_{m}_unseen", 0, 6) for m in ("v1", "v2", "v3", "full")}
    sets |= {
        f"w{w}": sample_set(root / f"samples_table3_w{w}", 0, N3) for w in ("0.5", "1.0", "1.5", "2.0")
    }
    row = lambda folder: {
        "n": sum(json.loads((folder / "samples.json").read_text())["written"].values()),
        "folder": str(folder),
        "fid": 0.1,
        "fid_local": 0.2,
        "mmd": 0.3,
        "mmd_local": 0.4,
        "ms_ssim": 0.5,
    }
    evals = {
        "eval_table1": {"lad": sets["full"], "medical_diffusion": sets["v0"]},
        "eval_table2": {
            k: sets[k] for k in ("v0", "v1", "v2", "v3", "full", "v1_x", "v2_x", "v3_x", "full_x")
        },
        "eval_table3": {k: sets[k] for k in ("w0.5", "w1.0", "w1.5", "w2.0")},
    }
    for name, fakes in evals.items():
        results = {"real": {"n": 8, "folder": "prep", "ms_ssim": 0.6}} | {
            k: row(f) for k, f in fakes.items()
        }
        (root / name).mkdir()
        (root / name / "metrics.json").write_text(
            json.dumps(
                {
                    "settings": {
                        "features": {"note": "random"},
                        "organ_box": [0, 1, 0, 1, 0, 1],
                        "organ_box_from": "6 masks",
                    },
                    "results": results,
                }
            )
        )
    return root


def rewrite(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_the_right_recipe_passes_and_every_row_is_written(tmp_path):
    root = paper_run(tmp_path)
    assert pt.main(pt.get_args(["--runs", str(root), "--dataset", "act1k", "--table3-size", str(N3)])) == 0
    text = (root / "tables.md").read_text()
    for label in (
        "Real",
        "HA-GAN",
        "Medical Diffusion",
        "Lad (Ours)",
        "— V0",
        "✓ Full",
        "× V3",
        "| 0.5 |",
        "| 2.0 |",
    ):
        assert label in text
    assert "not run: HA-GAN" in text and "0.4958" in text  # the paper's figure beside the missing row
    assert text.count("| 3 orig. + 3 aug. |") == 7 and text.count("| 0 orig. + 6 aug. |") == 4


@pytest.mark.parametrize(
    "mistake",
    [
        "table1 from original masks only",  # the old 05 default: only originals, as many as the training set
        "x row with originals",
        "table3 from original masks",
        "table3 w sees other masks",
        "table3 wrong size",
        "set smaller than the training set",
        "half-finished set",
        "v0 is not table 1's medical diffusion",
        "missing row",
    ],
)
def test_a_wrong_recipe_is_refused(tmp_path, mistake):
    root = paper_run(tmp_path)
    if mistake == "table1 from original masks only":
        sample_set(root / "samples_full", 6, 0)
    elif mistake == "x row with originals":
        sample_set(root / "samples_v2_unseen", 1, 5)
    elif mistake == "table3 from original masks":
        for w in ("0.5", "1.0", "1.5", "2.0"):
            sample_set(root / f"samples_table3_w{w}", N3, 0)
    elif mistake == "table3 w sees other masks":
        sample_set(root / "samples_table3_w1.5", 0, N3, seed=1)
    elif mistake == "table3 wrong size":
        sample_set(root / "samples_table3_w1.0", 0, N3 + 1)
        rewrite(root / "eval_table3" / "metrics.json", lambda d: d["results"]["w1.0"].update(n=N3 + 1))
    elif mistake == "set smaller than the training set":
        sample_set(root / "samples_v1", 2, 2)
        rewrite(root / "eval_table2" / "metrics.json", lambda d: d["results"]["v1"].update(n=4))
    elif mistake == "half-finished set":
        rewrite(root / "samples_v3" / "samples.json", lambda d: d["written"].update(augmented=1))
    elif mistake == "v0 is not table 1's medical diffusion":
        other = sample_set(root / "samples_v0_again", 3, 3)
        rewrite(
            root / "eval_table2" / "metrics.json", lambda d: d["results"]["v0"].update(folder=str(other))
        )
    elif mistake == "missing row":
        rewrite(root / "eval_table2" / "metrics.json", lambda d: d["results"].pop("v2_x"))
    with pytest.raises(pt.RecipeError):
        pt.check(root, N3)
    assert pt.main(pt.get_args(["--runs", str(root), "--dataset", "act1k", "--table3-size", str(N3)])) == 2
    assert not (root / "tables.md").exists()
