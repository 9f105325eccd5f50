"""report: a self-contained report from fake result files with known numbers."""

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from vaerepro.compare import space_label
from vaerepro.report import ladder_is_decreasing, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOG_PX, LOG_PX_SE = -87.6543, 0.1234  # printed as "-87.65 ± 0.12 nats/example"

CONFIG = {
    "seed": 0,
    "data": {"source": "mnist5k", "space": "auto"},
    "model": {"latent_dim": 2, "hidden_dims": [500], "activation": "tanh"},
    "likelihood": {"name": "bernoulli", "allow_improper": False},
    "train": {"objective": "elbo", "max_epochs": 5},
    "eval": {"num_samples": 1000},
}

INCREASING = [
    {"k": 1, "log_px": -95.0, "se": 0.3},
    {"k": 10, "log_px": -90.1, "se": 0.2},
    {"k": 100, "log_px": -88.2, "se": 0.15},
    {"k": 1000, "log_px": LOG_PX, "se": LOG_PX_SE},
]
# k=100 falls 1.0 nats below k=10, > 3 * sqrt(0.2^2 + 0.2^2) = 0.85; k=1000 recovers within error bars.
DECREASING = [
    {"k": 1, "log_px": -95.0, "se": 0.3},
    {"k": 10, "log_px": -90.0, "se": 0.2},
    {"k": 100, "log_px": -91.0, "se": 0.2},
    {"k": 1000, "log_px": -90.5, "se": 0.1},
]


def make_out_dir(root: Path, ladder=INCREASING, latent_dim=2, space="binary", improper=False) -> Path:
    rng = np.random.default_rng(0)
    (root / "metrics").mkdir(parents=True)
    (root / "plots").mkdir()
    (root / "artifacts").mkdir()
    ev = {
        "log_px": ladder[-1]["log_px"],
        "log_px_se": ladder[-1]["se"],
        "elbo": -96.25,
        "elbo_se": 0.31,
        "kl": 6.5,
        "recon": -89.75,
        "bits_per_dim": 0.1613,
        "active_units": 2,
        "num_samples": ladder[-1]["k"],
        "ess": 12.5,
        "ess_fraction": 0.0125,
        "log_px_ladder": ladder,
        "likelihood": "bernoulli",
        "data_space": space,
        "latent_dim": latent_dim,
        "improper": improper,
        "num_examples": 1000,
        "data_dim": 784,
        "quantized": False,
        "source": "mnist5k",
        "knn_accuracy": None,
    }
    (root / "metrics" / "eval.json").write_text(json.dumps(ev))
    tr = {"train_elbo": -97.0, "val_elbo": -98.0, "best_val_elbo": -97.5, "epochs": 5, "best_epoch": 4}
    (root / "metrics" / "train.json").write_text(json.dumps({**tr, "train_time_s": 12.3}))
    lines = ["epoch,train_elbo,val_elbo"] + [f"{e},{-150 + 10 * e},{-152 + 10 * e}" for e in range(1, 6)]
    (root / "plots" / "elbo.csv").write_text("\n".join(lines) + "\n")
    arrays = {
        "inputs": rng.random((8, 6, 6)),
        "reconstructions": rng.random((8, 6, 6)),
        "prior_samples": rng.random((8, 6, 6)),
    }
    if latent_dim == 2:
        arrays["manifold"] = rng.random((5, 5, 6, 6))
        arrays["manifold_grid"] = np.array([-1.28, -0.52, 0.0, 0.52, 1.28])
    np.savez(root / "artifacts" / "samples.npz", **arrays)
    return root


def run(name, space, log_px, likelihood="bernoulli", latent_dim=2, improper=False, status="FINISHED", **kw):
    return {
        "run_id": f"id-{name}",
        "run_name": name,
        "likelihood": likelihood,
        "data_space": space,
        "improper": improper,
        "latent_dim": latent_dim,
        "log_px": log_px,
        "log_px_se": 0.2,
        "elbo": None if log_px is None else log_px - 5,
        "bits_per_dim": 0.2,
        "status": status,
        "source": "mnist5k",
        **kw,
    }


RUNS = [
    run("bin-z2", "binary", -130.0),
    run("bin-z10", "binary", -95.0, latent_dim=10),
    run("bin-z5", "binary", -105.0, latent_dim=5),
    run("gauss-z2", "continuous", 600.0, likelihood="gaussian"),
    run("cb-z10", "continuous", 1100.0, likelihood="continuous_bernoulli", latent_dim="10"),
    run("grey-bern", "continuous", -60.0, improper=True),
    run("crashed", "binary", -10.0, status="FAILED"),
    run("unevaluated", "binary", None),
    {"run_id": "id-nospace", "run_name": "nospace", "status": "FINISHED", "log_px": -1.0},
]
GROUPS = {("binary", "false"), ("continuous", "false"), ("continuous", "true")}


class Collector(HTMLParser):
    """Images, figure ids and the rows of ranking tables (with their data-space markers)."""

    def __init__(self):
        super().__init__()
        self.imgs, self.figures, self.tables = [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "figure":
            self.figures.append(a.get("id", ""))
        elif tag == "table" and a.get("class") == "ranking":
            self.tables.append({"key": (a["data-space"], a["data-improper"]), "rows": []})
        elif tag == "table":
            self.tables.append(None)
        elif tag == "tr" and self.tables and self.tables[-1] is not None and "data-space" in a:
            self.tables[-1]["rows"].append({"key": (a["data-space"], a["data-improper"]), "cells": []})
        elif tag == "td":
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            table = self.tables[-1] if self.tables else None
            if table is not None and table["rows"]:
                table["rows"][-1]["cells"].append("".join(self._cell))
            self._cell = None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = make_out_dir(tmp_path_factory.mktemp("run"))
    paths = write_report(out, CONFIG, runs=RUNS)
    page = paths["html"].read_text(encoding="utf-8")
    parsed = Collector()
    parsed.feed(page)
    return paths, page, parsed


def test_html_is_self_contained_with_valid_pngs(report):
    paths, page, parsed = report
    assert paths["html"] == paths["html"].parent / "report.html" and paths["html"].parent.name == "reports"
    for external in ('src="http', "src='http", 'href="http', "<script", "<link", "url("):
        assert external not in page
    assert len(parsed.imgs) == len(paths["figures"]) >= 7
    for img in parsed.imgs:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        assert base64.b64decode(img["src"][len(prefix) :], validate=True).startswith(PNG_SIGNATURE)
        assert img["alt"]


def test_markdown_references_existing_figures(report):
    paths, _, _ = report
    md = paths["md"].read_text(encoding="utf-8")
    refs = re.findall(r"!\[(?:\\.|[^\]\\])*\]\(([^)]+)\)", md)  # alt text may hold escaped brackets
    assert len(refs) == len(paths["figures"])
    for ref in refs:
        assert not ref.startswith(("data:", "http", "/"))
        f = paths["md"].parent / ref
        assert f.is_file() and f.read_bytes().startswith(PNG_SIGNATURE)


def test_numbers_carry_units_spaces_and_kinds(report):
    paths, page, parsed = report
    md = paths["md"].read_text(encoding="utf-8")
    for text in (page, md):
        assert "-87.65 ± 0.12 nats/example" in text
        assert "estimate of log p(x), K=1000" in text
        assert "lower bound (ELBO)" in text
        assert "0.1613 bits/dim" in text
        for space, improper in [("binary", False), ("continuous", False), ("continuous", True)]:
            assert space_label(space, improper) in text
    assert "VAE report: bernoulli likelihood, binary data, latent size 2, source mnist5k" in page
    assert "model.hidden_dims" in page  # flattened config
    for section in ("fig-training_curves", "fig-ladder", "fig-reconstructions", "fig-prior_samples"):
        assert section in parsed.figures
    assert "fig-manifold" in parsed.figures  # latent_dim == 2
    assert "ladder goes down" not in page  # increasing ladder: no warning
    assert "IMPROPER run" not in page.split("Comparison across runs")[0]  # this run is proper


def test_comparison_one_figure_and_one_ranking_per_group(report):
    paths, page, parsed = report
    compare_figs = [f for f in parsed.figures if f.startswith("fig-compare-")]
    assert sorted(compare_figs) == [
        "fig-compare-binary-proper",
        "fig-compare-continuous-improper",
        "fig-compare-continuous-proper",
    ]
    alts = {img["alt"] for img in parsed.imgs}
    for space, improper in [("binary", False), ("continuous", False), ("continuous", True)]:
        assert f"Comparison across runs: {space_label(space, improper)}" in alts

    ranking = [t for t in parsed.tables if t is not None]
    assert {t["key"] for t in ranking} == GROUPS and len(ranking) == 3
    for table in ranking:
        assert table["rows"], "empty ranking table"
        assert all(r["key"] == table["key"] for r in table["rows"]), "a ranking table mixes data spaces"
    by_key = {t["key"]: [r["cells"][1] for r in t["rows"]] for t in ranking}
    assert by_key[("binary", "false")] == ["bin-z10", "bin-z5", "bin-z2"]
    assert by_key[("continuous", "false")] == ["cb-z10", "gauss-z2"]
    assert by_key[("continuous", "true")] == ["grey-bern"]
    assert "IMPROPER" in page and "improper" in page

    # failed, unevaluated and space-less runs are listed, never ranked
    ranked_names = {n for names in by_key.values() for n in names}
    for name in ("crashed", "unevaluated", "nospace"):
        assert name not in ranked_names
        assert f"<td>{name}</td>" in page
    assert "status FAILED" in page and "no log p(x)" in page and "has no data_space" in page

    md = paths["md"].read_text(encoding="utf-8")
    markers = re.findall(
        r'<!-- ranking-table data-space="(\w+)" data-improper="(\w+)" -->\n((?:\|.*\n)+)', md
    )
    assert {(s, i) for s, i, _ in markers} == GROUPS and len(markers) == 3
    for space, improper, table in markers:
        cells = [line.strip("|").split("|")[-1].strip() for line in table.splitlines()[2:]]
        expected = space + (" (IMPROPER)" if improper == "true" else "")
        assert cells and all(c == expected for c in cells)


def test_ladder_is_decreasing_known_pairs():
    assert ladder_is_decreasing(INCREASING) == []
    assert ladder_is_decreasing(DECREASING) == [(10, 100)]
    # order of the input does not matter; drops inside the error bars are not flagged
    assert ladder_is_decreasing(DECREASING[::-1]) == [(10, 100)]
    noisy = [{"k": 1, "log_px": -90.0, "se": 0.5}, {"k": 10, "log_px": -90.5, "se": 0.5}]
    assert ladder_is_decreasing(noisy) == []
    assert ladder_is_decreasing([{"k": 1, "log_px": -1.0}, {"k": 2, "log_px": -1.5}]) == [(1, 2)]


def test_decreasing_ladder_warns_and_improper_run_is_flagged(tmp_path):
    out = make_out_dir(tmp_path / "run", ladder=DECREASING, latent_dim=5, space="continuous", improper=True)
    paths = write_report(out, CONFIG, runs=None, report_dir=tmp_path / "rep")
    assert paths["html"].parent == tmp_path / "rep"
    page = paths["html"].read_text(encoding="utf-8")
    md = paths["md"].read_text(encoding="utf-8")
    for text in (page, md):
        assert "the log p(x) ladder goes down as k grows" in text
        assert "a sign of a bad proposal or a bug" in text
        assert "k=10 → k=100" in text
        assert "IMPROPER run" in text
        assert space_label("continuous", True) in text
    assert 'id="fig-manifold"' not in page  # latent_dim 5
    assert "No other runs were passed" in page


@pytest.mark.parametrize(
    ("name", "stage"), [("eval.json", "vaerepro evaluate"), ("train.json", "vaerepro train")]
)
def test_missing_result_file_names_it_and_its_stage(tmp_path, name, stage):
    out = make_out_dir(tmp_path / "run")
    (out / "metrics" / name).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(name) + ".*" + re.escape(stage)):
        write_report(out, CONFIG)


def test_different_data_sets_in_one_space_get_separate_figures_and_rankings(tmp_path):
    out = make_out_dir(tmp_path / "run")
    runs = [
        run("mnist-cb", "continuous", 1100.0, likelihood="continuous_bernoulli"),
        run("frey-g", "continuous", 900.0, likelihood="gaussian", source="frey_faces"),
    ]
    page = write_report(out, CONFIG, runs=runs)["html"].read_text(encoding="utf-8")
    parsed = Collector()
    parsed.feed(page)
    figs = sorted(f for f in parsed.figures if f.startswith("fig-compare-"))
    assert figs == ["fig-compare-continuous-proper-frey-faces", "fig-compare-continuous-proper-mnist5k"]
    ranking = [t for t in parsed.tables if t is not None]
    assert sorted(len(t["rows"]) for t in ranking) == [1, 1]  # never ranked against each other
