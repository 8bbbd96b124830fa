"""Tables 1-3 of the paper, laid out as the paper lays them out, from the outputs of
scripts/reproduce_paper.sh, with every row checked against the set the paper builds it from (§4.2, §4.4).

Reads  --runs DIR: eval_table{1,2,3}/metrics.json (06_eval.py) and the samples.json of every
       synthetic set they name (05_sample.py); ssl/table.md (07_ssl_seg.py) when present.
Writes DIR/tables.md: Tables 1-3 with every row the paper has, the paper's own figures beside them, and
       links to Figure 4 (eval_table1/mds.png) and Figure 6 (ssl/dice.png).

What each row must be built from (the recipe; a wrong one stops this script with exit code 2):
  Table 1, Lad and Medical Diffusion   the augmented mask set: original and augmented masks (§3.4.1, §4.2),
                                       as many samples as the training set (§4.2)
  Table 2, V0                          Table 1's Medical Diffusion set (the paper's figures are equal)
  Table 2, ✓ rows (V1, V2, V3, Full)   original and augmented masks, as many as the training set (§4.4.1);
                                       Full is Table 1's Lad set
  Table 2, × rows                      augmented masks only ("unseen"), as many as the training set
  Table 3, every w                     augmented masks only, --table3-size of them (256 in §4.4.2), the same
                                       masks for every w
HA-GAN (Table 1) is not part of this codebase: its row is kept, marked as not run, with the paper's figures.

    python scripts/paper_tables.py --runs runs/act1k --dataset act1k
"""

import argparse
import json
import sys
from pathlib import Path

MIXED, UNSEEN = "original + augmented", "augmented only"
COLUMNS = ("fid", "fid_local", "mmd", "mmd_local", "ms_ssim")
HEADER = "| FID ↓ holistic | FID ↓ localised | MMD ↓ holistic | MMD ↓ localised | MS-SSIM ↓ |"

# The paper's figures, in COLUMNS order (Tables 1-3). Tables 2 and 3 are reported for one dataset;
# their V0 row equals Table 1's Medical Diffusion on AbdomenCT-1K, so that is the one they belong to.
PAPER = {
    ("act1k", 1): {
        "Real": (None, None, None, None, 0.5719),
        "HA-GAN": (0.4958, 0.0302, 1.4138, 0.3685, 0.9992),
        "Medical Diffusion": (0.0034, 0.0005, 0.0149, 0.0075, 0.6085),
        "Lad (Ours)": (0.0002, 0.0002, 0.0003, 0.0011, 0.5940),
    },
    ("totalseg", 1): {
        "Real": (None, None, None, None, 0.4447),
        "HA-GAN": (0.2889, 0.1696, 1.1055, 0.7922, 0.9987),
        "Medical Diffusion": (0.0012, 0.0005, 0.0031, 0.0003, 0.4584),
        "Lad (Ours)": (0.0007, 0.0005, 0.0015, 0.0011, 0.4574),
    },
    ("act1k", 2): {
        "— V0": (0.0034, 0.0005, 0.0149, 0.0075, 0.6085),
        "✓ V1": (0.0020, 0.0004, 0.0080, 0.0051, 0.5984),
        "✓ V2": (0.0002, 0.0003, 0.0009, 0.0020, 0.5989),
        "✓ V3": (0.0003, 0.0004, 0.0027, 0.0028, 0.5983),
        "✓ Full": (0.0002, 0.0002, 0.0003, 0.0011, 0.5940),
        "× V1": (0.0027, 0.0009, 0.0093, 0.0078, 0.5973),
        "× V2": (0.0008, 0.0011, 0.0067, 0.0086, 0.6058),
        "× V3": (0.0006, 0.0009, 0.0061, 0.0070, 0.6053),
        "× Full": (0.0005, 0.0004, 0.0036, 0.0019, 0.6051),
    },
    ("act1k", 3): {
        "0.5": (0.0010, 0.0005, 0.0035, 0.0037, 0.6134),
        "1.0": (0.0005, 0.0005, 0.0005, 0.0023, 0.6002),
        "1.5": (0.0006, 0.0005, 0.0020, 0.0031, 0.6016),
        "2.0": (0.0006, 0.0004, 0.0010, 0.0020, 0.6010),
    },
}

# Table -> (eval folder, title, rows); a row is (label, the set's name in 06's --fake,
# the composition it needs).
TABLES = {
    1: (
        "eval_table1",
        "Table 1: quantitative comparison of synthetic volumes",
        [
            ("Real", "real", None),
            ("HA-GAN", None, None),
            ("Medical Diffusion", "medical_diffusion", MIXED),
            ("Lad (Ours)", "lad", MIXED),
        ],
    ),
    2: (
        "eval_table2",
        "Table 2: ablation, conditioned on original + augmented masks (✓) and augmented only (×)",
        [
            ("— V0", "v0", MIXED),
            ("✓ V1", "v1", MIXED),
            ("✓ V2", "v2", MIXED),
            ("✓ V3", "v3", MIXED),
            ("✓ Full", "full", MIXED),
            ("× V1", "v1_x", UNSEEN),
            ("× V2", "v2_x", UNSEEN),
            ("× V3", "v3_x", UNSEEN),
            ("× Full", "full_x", UNSEEN),
        ],
    ),
    3: (
        "eval_table3",
        "Table 3: guidance strength w in sampling",
        [
            ("0.5", "w0.5", UNSEEN),
            ("1.0", "w1.0", UNSEEN),
            ("1.5", "w1.5", UNSEEN),
            ("2.0", "w2.0", UNSEEN),
        ],
    ),
}
SAME_SET = [((1, "medical_diffusion"), (2, "v0")), ((1, "lad"), (2, "full"))]  # one set, two tables


class RecipeError(Exception):
    """A table row built from a set the paper does not define for it."""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--runs", type=Path, required=True, help="a dataset's run folder (runs/act1k, runs/tiny/act1k, ...)"
    )
    p.add_argument(
        "--dataset", choices=["act1k", "totalseg"], required=True, help="which of the paper's columns"
    )
    p.add_argument(
        "--table3-size", type=int, default=256, help="augmented masks per w in Table 3 (§4.4.2: 256)"
    )
    return p.parse_args(argv)


def read_index(folder):
    path = Path(folder) / "samples.json"
    if not path.is_file():
        raise RecipeError(
            f"{folder}: no samples.json, so nobody can say which masks this set was sampled from"
        )
    return json.loads(path.read_text())


def check_row(table, label, name, need, result, table3_size):
    """Raise RecipeError unless the set behind a row has the composition and size the paper defines."""
    where = f"Table {table}, row {label} ({name} = {result['folder']})"
    index = read_index(result["folder"])
    have = index["written"]
    if result["n"] != have["original"] + have["augmented"] or have != index["composition"]:
        raise RecipeError(
            f"{where}: evaluated {result['n']} volumes, but the set holds {have} of the planned "
            f"{index['composition']} (an unfinished or mixed folder)"
        )
    if need == MIXED and not (have["original"] > 0 and have["augmented"] > 0):
        raise RecipeError(
            f"{where}: needs original and augmented masks (§3.4.1, §4.4.1), the set has {have}"
        )
    if need == UNSEEN and have["original"] > 0:
        raise RecipeError(f"{where}: needs augmented masks only (§4.4), the set has {have}")
    size = table3_size if table == 3 else index["n_train"]
    if result["n"] != size:
        raise RecipeError(
            f"{where}: {result['n']} samples, the paper uses {size} "
            + ("(§4.4.2)" if table == 3 else "(as many as the training set, §4.2)")
        )


def same_masks(folders):
    """Raise RecipeError unless every folder was conditioned on the same masks (Table 3: one mask
    set, four w)."""

    def masks(folder):
        return {
            sid: (r["case"], r["mask"], r["augmentation"])
            for sid, r in read_index(folder)["samples"].items()
        }

    first = masks(folders[0])
    for f in folders[1:]:
        if masks(f) != first:
            raise RecipeError(
                f"Table 3: {f} was conditioned on other masks than {folders[0]}; every w must see "
                f"the same augmented masks (§4.4.2)"
            )


def load_table(runs, table):
    folder, _, _ = TABLES[table]
    path = runs / folder / "metrics.json"
    if not path.is_file():
        raise RecipeError(
            f"{path} is missing: run 06_eval.py for Table {table} (scripts/reproduce_paper.sh)"
        )
    return json.loads(path.read_text())


def check(runs, table3_size=256):
    """Every row of Tables 1-3 against its recipe; returns {table: metrics.json}."""
    metrics = {t: load_table(runs, t) for t in TABLES}
    for t, (_, _, rows) in TABLES.items():
        results = metrics[t]["results"]
        for label, name, need in rows:
            if name is None:
                continue
            if name not in results:
                raise RecipeError(
                    f"Table {t}: no row {label}: {runs / TABLES[t][0]} has no set named {name!r}"
                )
            if need is not None:
                check_row(t, label, name, need, results[name], table3_size)
    for (ta, a), (tb, b) in SAME_SET:
        fa, fb = metrics[ta]["results"][a]["folder"], metrics[tb]["results"][b]["folder"]
        if Path(fa).resolve() != Path(fb).resolve():
            raise RecipeError(f"Table {ta}'s {a} ({fa}) and Table {tb}'s {b} ({fb}) must be one set")
    same_masks([metrics[3]["results"][name]["folder"] for _, name, _ in TABLES[3][2]])
    return metrics


def cell(v):
    return "–" if v is None else f"{v:.4f}"


def render(runs, dataset, metrics):
    lines = [f"# Tables 1-3 for {dataset} ({runs})", ""]
    note = metrics[1]["settings"]["features"]["note"]
    lines += [
        f"Features: {note}. Localised: the organ box {metrics[1]['settings']['organ_box']} "
        f"({metrics[1]['settings']['organ_box_from']}).",
        "",
    ]
    for t, (folder, title, rows) in TABLES.items():
        results = metrics[t]["results"]
        paper = PAPER.get((dataset, t))
        lines += [
            f"## {title}",
            "",
            "| Row | N | masks "
            + HEADER
            + (" paper: FID / FID loc / MMD / MMD loc / MS-SSIM |" if paper else ""),
            "|---" * (8 + bool(paper)) + "|",
        ]
        for label, name, _ in rows:
            r = results.get(name) if name else None
            ref = " | " + " / ".join(cell(v) for v in paper[label]) if paper else ""
            if r is None:
                lines.append(
                    f"| {label} | – | not run: HA-GAN is not part of this codebase "
                    + "| – " * 5
                    + ref
                    + " |"
                )
                continue
            comp = read_index(r["folder"])["written"] if name != "real" else None
            masks = "–" if comp is None else f"{comp['original']} orig. + {comp['augmented']} aug."
            lines.append(
                f"| {label} | {r['n']} | {masks} | "
                + " | ".join(cell(r.get(c)) for c in COLUMNS)
                + ref
                + " |"
            )
        lines += ["", f"From `{runs / folder / 'metrics.json'}`.", ""]
    lines += ["## Figure 4: MDS of the features", "", f"![Figure 4]({TABLES[1][0]}/mds.png)", ""]
    ssl = runs / "ssl" / "table.md"
    lines += ["## Figure 6: SSL-ALPNet Dice", ""]
    lines += (
        [ssl.read_text().strip(), "", "![Figure 6](ssl/dice.png)"]
        if ssl.is_file()
        else ["(ssl/table.md missing)"]
    )
    return "\n".join(lines) + "\n"


def main(args):
    try:
        metrics = check(args.runs, args.table3_size)
    except RecipeError as e:
        print(f"paper_tables.py: {e}", file=sys.stderr)
        return 2
    text = render(args.runs, args.dataset, metrics)
    out = args.runs / "tables.md"
    tmp = out.with_name(".tables.md.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(text)
    print(f"wrote {out}: every row of Tables 1-3 built from the set the paper defines")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args()))
