"""report: a self-contained report from fake result files with known numbers; document: its blocks."""

import base64
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from vaerepro.compare import space_label
from vaerepro.document import (
    Caution,
    Fig,
    Heading,
    Table,
    differences,
    flatten,
    png,
    render_md,
    write_figures,
)
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


CONVERGED = {
    "converged": True,
    "convergence": {
        "reasons": [],
        "ladder_gain": 0.0457,
        "ladder_gain_se": 0.0123,
        "ladder_from_k": 100,
        "ladder_to_k": 1000,
        "ladder_gain_sigmas": 2.0,
        "ladder_gain_tol": 0.1,
        "ess_hmean": 9.87,
        "ess_floor": 5.0,
    },
}


def make_out_dir(
    root: Path,
    ladder=INCREASING,
    latent_dim=2,
    space="binary",
    improper=False,
    quantized=False,
    verdict=CONVERGED,
    prior_samples=None,
) -> Path:
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
        "quantized": quantized,
        "source": "mnist5k",
        "knn_accuracy": None,
        **verdict,
    }
    (root / "metrics" / "eval.json").write_text(json.dumps(ev))
    tr = {"train_elbo": -97.0, "val_elbo": -98.0, "best_val_elbo": -97.5, "epochs": 5, "best_epoch": 4}
    (root / "metrics" / "train.json").write_text(json.dumps({**tr, "train_time_s": 12.3}))
    # the training's curve: its last row is train.json's last epoch, as train.py writes them
    lines = ["epoch,train_elbo,val_elbo"] + [f"{e},{-147 + 10 * e},{-148 + 10 * e}" for e in range(1, 6)]
    (root / "plots" / "elbo.csv").write_text("\n".join(lines) + "\n")
    arrays = {
        "inputs": rng.random((8, 6, 6)),
        "reconstructions": rng.random((8, 6, 6)),
        "prior_samples": rng.random((8, 6, 6)) if prior_samples is None else prior_samples,
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
        assert "-87.65 ± 0.12 nats/example (converged)" in text
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
    assert sorted(compare_figs) == ["fig-compare-binary-proper", "fig-compare-continuous-proper"]
    alts = {img["alt"] for img in parsed.imgs}
    for space, improper in [("binary", False), ("continuous", False)]:
        assert f"Comparison across runs: {space_label(space, improper)}" in alts
    # the improper group holds one run: a sentence says so instead of a one-point axis
    assert "Only one run in this group (grey-bern): nothing to compare it with, so no figure" in page

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


@pytest.mark.parametrize("keep", [0, 0.5])
def test_a_truncated_samples_file_is_one_line_naming_it_and_nothing_is_written(tmp_path, keep):
    """artifacts/samples.npz cut short (an evaluation killed while writing it): one line naming the file and
    the stage that rewrites it, not numpy's or zipfile's traceback, and no report written."""
    out = make_out_dir(tmp_path / "run")
    samples = out / "artifacts" / "samples.npz"
    data = samples.read_bytes()
    samples.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(FileNotFoundError) as err:
        write_report(out, CONFIG)
    assert str(err.value).startswith(f"{samples}: not a readable .npz archive, truncated or damaged (")
    assert str(err.value).endswith("run `vaerepro evaluate` again to rewrite it")
    assert not (out / "reports").exists()
    samples.unlink()  # a missing file is said in the report, as before
    assert "samples.npz not found" in write_report(out, CONFIG)["md"].read_text()


def test_a_curve_that_is_not_the_trainings_is_one_line_naming_it_and_nothing_is_written(tmp_path):
    """plots/elbo.csv cut short, emptied, of another training, or not text: it was drawn as it was (or a
    UnicodeDecodeError traceback) beside train.json's numbers and best epoch. train.json's last-epoch
    numbers are the curve's last row, so the report refuses, in one line naming the file, a curve that does
    not end with them, and writes nothing; the training's own curve is drawn."""
    out = make_out_dir(tmp_path / "run")
    path = out / "plots" / "elbo.csv"
    whole = path.read_bytes()
    damaged = {
        "cut short": whole[: len(whole) - 10],
        "cut at a row": whole[: whole.rstrip(b"\n").rfind(b"\n") + 1],
        "empty": b"",
        "another training's": whole.replace(b"-98", b"-99"),
        "not text": b"\x80\x02PK" * 20,
    }
    for why, data in damaged.items():
        path.write_bytes(data)
        with pytest.raises(FileNotFoundError) as err:
            write_report(out, CONFIG)
        assert str(err.value).startswith(f"{path}: "), why
        assert "run `vaerepro train` again" in str(err.value), why
        assert not (out / "reports").exists(), why
    path.write_bytes(b"step,loss\n1,2.5\n")  # a table of other columns: said so, not "no rows"
    with pytest.raises(FileNotFoundError) as err:
        write_report(out, CONFIG)
    assert str(err.value) == (
        f"{path}: no train_elbo or val_elbo column (its columns: step, loss); run `vaerepro train` again to "
        "rewrite it"
    )
    path.write_bytes(whole)
    assert 'id="fig-training_curves"' in write_report(out, CONFIG)["html"].read_text()


@pytest.mark.slow
def test_different_data_sets_in_one_space_get_separate_figures_and_rankings(tmp_path):
    out = make_out_dir(tmp_path / "run")
    runs = [
        run("mnist-cb", "continuous", 1100.0, likelihood="continuous_bernoulli"),
        run("frey-g", "continuous", 900.0, likelihood="gaussian", source="frey_faces"),
    ]
    page = write_report(out, CONFIG, runs=runs)["html"].read_text(encoding="utf-8")
    parsed = Collector()
    parsed.feed(page)
    assert not [f for f in parsed.figures if f.startswith("fig-compare-")]  # one run each: no axis
    for name in ("mnist-cb", "frey-g"):
        assert f"Only one run in this group ({name})" in page
    ranking = [t for t in parsed.tables if t is not None]
    assert sorted(len(t["rows"]) for t in ranking) == [1, 1]  # never ranked against each other

    # one data set and unit, but estimates with another K, or of another test split: separate rankings, each
    # saying what it measured
    runs = [
        run("k5000", "binary", -86.0, num_samples="5000", test_set="aaaaaaaaaaaa"),
        run("k100", "binary", -84.0, num_samples="100", test_set="aaaaaaaaaaaa"),
        run("other-split", "binary", -85.0, num_samples="5000", test_set="bbbbbbbbbbbb"),
        run("k5000-b", "binary", -87.0, latent_dim=5, num_samples="5000", test_set="aaaaaaaaaaaa"),
    ]
    paths = write_report(out, CONFIG, runs=runs, report_dir=tmp_path / "rep-k")
    md = paths["md"].read_text(encoding="utf-8")
    parsed = Collector()
    parsed.feed(paths["html"].read_text(encoding="utf-8"))
    ranking = [t for t in parsed.tables if t is not None]
    assert sorted(len(t["rows"]) for t in ranking) == [1, 1, 2]
    a, b = "test set aaaaaaaaaaaa", "test set bbbbbbbbbbbb"
    for what in (f"{a}, K = 5000", f"{a}, K = 100", b):
        assert f"binary pixels — Bernoulli pmf (nats/example) — data mnist5k, {what}" in md, what
    ranked = _md_table_after(md, "data mnist5k, test set aaaaaaaaaaaa, K = 5000")
    assert [r[1] for r in ranked] == ["k5000", "k5000-b"]  # k100's higher number is not ranked above them
    figures = tmp_path / "rep-k" / "figures"
    compared = {p.name for p in figures.glob("compare-*.png")}
    assert len(compared) == 1  # the one group with two latent sizes
    # the same report again with no comparison: its earlier figure does not stay beside it
    write_report(out, CONFIG, runs=[], report_dir=tmp_path / "rep-k")
    assert not list(figures.glob("compare-*.png")) and list(figures.glob("*.png"))

    # two runs of one data set, but only one with a latent size: still one point, no figure
    runs = [run("z2", "binary", -95.0), run("nolatent", "binary", -96.0, latent_dim=None)]
    page = write_report(out, CONFIG, runs=runs, report_dir=tmp_path / "rep2")["html"].read_text()
    assert "fig-compare-" not in page and "2 runs, 1 of them with a latent size" in page


def _md_table_after(md: str, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after `heading`."""
    lines = md.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_headline_first_and_configuration_last(report):
    paths, _, _ = report
    md = paths["md"].read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", md, flags=re.MULTILINE)
    assert headings[0] == "Metrics (test set)" and headings[-1] == "Configuration"
    rows = _md_table_after(md, "## Metrics (test set)")
    assert [r[0] for r in rows[:5]] == ["log p(x)", "ELBO", "KL(q(z\\|x) ‖ p(z))", "bits/dim", "convergence"]
    assert rows[0][1] == "-87.65 ± 0.12 nats/example (converged)"
    assert rows[4][1] == (
        "converged: last ladder step +0.05 ± 0.01 nats/example (K=100 → K=1000); "
        "ESS harmonic mean 9.9 samples"
    )
    assert "more than 2 paired SE and 0.10 nats/example, or the ESS harmonic mean is below 5" in rows[4][2]


def test_the_best_epoch_says_it_is_counted_from_0(report):
    """train.json's best_epoch counts from 0 (as plots/elbo.csv and the curve's axis do): a 5-epoch training
    whose last epoch was best read "epochs 5" and "best validation ..., epoch 4", which reads as the fourth
    epoch of five; the MLflow run's description read "trained 5 epochs; ... at epoch 4" likewise."""
    from conftest import tiny_config
    from vaerepro import tracking

    paths, _, _ = report
    rows = {r[0]: r for r in _md_table_after(paths["md"].read_text(encoding="utf-8"), "### Training")}
    assert rows["epochs"][1] == "5"
    assert rows["best validation"][2] == "lower bound (ELBO), epoch 4 (from 0, as the curve counts)"
    train = {"epochs": 5, "best_epoch": 4, "best_val_elbo": -97.5}
    assert tracking.runs.headline(tiny_config(), train=train).endswith(
        "trained 5 epochs; best validation ELBO -97.50 nats/example at epoch 4 (counted from 0)"
    )


def test_the_training_time_of_a_resumed_training_says_it_is_its_last_invocations(tmp_path):
    """A training resumed after 2 of its 3 epochs timed only its third: the report read "epochs 3" and
    "training time 10.9 s, wall clock", as if the three had taken 10.9 s."""
    out = make_out_dir(tmp_path / "run")
    train_json = out / "metrics" / "train.json"
    rows = {r[0]: r for r in _md_table_after(write_report(out, CONFIG)["md"].read_text(), "### Training")}
    assert rows["training time"][1:] == ["12.3 s", "wall clock"]  # a training from the start
    train_json.write_text(json.dumps({**json.loads(train_json.read_text()), "resumed_after_epochs": 2}))
    rows = {r[0]: r for r in _md_table_after(write_report(out, CONFIG)["md"].read_text(), "### Training")}
    assert rows["epochs"][1] == "5"
    assert rows["training time"][1:] == [
        "12.3 s",
        "wall clock of the last invocation's 3 epoch(s) only, resumed after 2 epochs",
    ]


@pytest.mark.parametrize(
    ("space", "quantized", "wording"),
    [
        ("binary", False, "a pmf on binary pixels, nothing added"),
        ("binary", True, "a pmf on binary pixels, nothing added"),  # an eval.json from before the fix
        ("continuous", True, "+ 8 bits for the dequantized 8-bit data (log 256 per dimension)"),
        ("continuous", False, "a density on float pixels in [0,1], nothing added (can be negative)"),
    ],
)
@pytest.mark.slow
def test_bits_per_dim_wording_per_data_space(tmp_path, space, quantized, wording):
    out = make_out_dir(tmp_path / "run", space=space, quantized=quantized)
    md = write_report(out, CONFIG)["md"].read_text(encoding="utf-8")
    (row,) = [r for r in _md_table_after(md, "## Metrics (test set)") if r[0] == "bits/dim"]
    assert row[1] == "0.1613 bits/dim"
    assert row[2].startswith("−log p(x) / (D ln 2), from the log p(x) estimate") and row[2].endswith(wording)
    assert ("+ 8 bits" in md) is (space == "continuous" and quantized)


NOT_CONVERGED = {
    "converged": False,
    "convergence": {
        **CONVERGED["convergence"],
        "reasons": [
            "ladder still rising: +26.70 ± 2.10 nats/example from K=100 to K=1000 (paired SE)",
            "ESS too low: harmonic mean 1.4 < 5 samples per example",
        ],
        "ladder_gain": 26.7,
        "ladder_gain_se": 2.1,
        "ess_hmean": 1.4,
    },
}


def test_an_unconverged_estimate_is_marked_and_never_wins_a_ranking(tmp_path):
    out = make_out_dir(tmp_path / "run", verdict=NOT_CONVERGED)
    runs = [
        run("conv-a", "binary", -95.0, converged=1.0),  # as MLflow gives it back: test/converged
        run("wild", "binary", -60.0, converged=0.0),  # the best number, from an unconverged estimate
        run("conv-b", "binary", -100.0, converged=True, latent_dim=5),
        run("unchecked", "binary", -97.0, latent_dim=10),  # evaluated before the verdict existed
    ]
    paths = write_report(out, CONFIG, runs=runs)
    page, md = paths["html"].read_text(encoding="utf-8"), paths["md"].read_text(encoding="utf-8")
    # this run: the verdict beside its log p(x), and a warning with the reasons
    rows = _md_table_after(md, "## Metrics (test set)")
    assert rows[0][1] == "-87.65 ± 0.12 nats/example (NOT CONVERGED)"
    for text in (page, md):
        assert "the log p(x) estimate has not converged in K=1000: ladder still rising: +26.70" in text
    assert "; ESS too low: harmonic mean 1.4 < 5 samples per example. It is a lower bound" in md
    assert rows[4][1].startswith("NOT CONVERGED: last ladder step +26.70 ± 2.10 nats/example")
    # the comparison: the unconverged run comes last, unranked, marked, with a note
    parsed = Collector()
    parsed.feed(page)
    (table,) = [t for t in parsed.tables if t is not None]
    cells = [r["cells"] for r in table["rows"]]
    assert [c[:2] for c in cells] == [["1", "conv-a"], ["2", "unchecked"], ["3", "conv-b"], ["—", "wild"]]
    assert cells[3][5] == "-60.00 ± 0.20 nats/example (NOT CONVERGED)"
    assert cells[0][5].endswith("(converged)") and cells[1][5].endswith("(convergence not checked)")
    assert "Rank —: the log p(x) estimate has NOT CONVERGED" in page


PAIRED = [
    {"k": 1, "log_px": -95.0, "se": 0.3, "gain": None, "gain_se": None},
    {"k": 10, "log_px": -90.1, "se": 0.2, "gain": 4.9, "gain_se": 0.1},
    {"k": 100, "log_px": -90.4, "se": 0.2, "gain": -0.3, "gain_se": 0.05},
]


def test_ladder_uses_paired_errors(tmp_path):
    # a drop of 0.3 nats: within the unpaired error bars (3 x 0.28), six paired SEs
    assert ladder_is_decreasing(PAIRED) == [(10, 100)]
    unpaired = [{k: v for k, v in p.items() if k != "gain_se"} for p in PAIRED]
    assert ladder_is_decreasing(unpaired) == []
    out = make_out_dir(tmp_path / "run", ladder=PAIRED)
    md = write_report(out, CONFIG)["md"].read_text(encoding="utf-8")
    rows = _md_table_after(md, "## log p(x) against the number of importance samples")
    assert rows == [
        ["1", "-95.00 ± 0.30 nats/example", "n/a"],
        ["10", "-90.10 ± 0.20 nats/example", "+4.90 ± 0.10 nats/example"],
        ["100", "-90.40 ± 0.20 nats/example", "-0.30 ± 0.05 nats/example"],
    ]
    assert "k=10 → k=100" in md and "the standard error of the change" in md
    assert "the change from the previous k, the mean of the per-example differences" in md


@pytest.mark.slow
def test_prior_samples_use_the_inputs_grey_scale(tmp_path):
    """0 is drawn black and 1 white, as the inputs: a white background is the model's, not the plot's."""
    from matplotlib.image import imread

    dark = {}
    for value in (0.0, 1.0):
        out = make_out_dir(tmp_path / f"v{value}", prior_samples=np.full((8, 6, 6), value))
        paths = write_report(out, CONFIG, runs=None)
        png = imread(paths["md"].parent / "figures" / "prior_samples.png")[..., :3]  # (H, W, 3) in [0, 1]
        dark[value] = float((png.mean(-1) < 0.1).mean())  # fraction of black pixels
    assert dark[0.0] > 0.3 and dark[1.0] < 0.05
    md = paths["md"].read_text(encoding="utf-8")
    assert "(0 black, 1 white; not inverted)" in md and "aggregate posterior" in md


# ------------------------------------------------------------------------------------ the document model


def test_flatten_gives_dotted_keys_in_order_and_the_config_table_prints_them(report):
    nested = {"seed": 0, "model": {"dims": [500], "enc": {"act": "tanh"}}, "tag": None}
    flat = [("seed", 0), ("model.dims", [500]), ("model.enc.act", "tanh"), ("tag", None)]
    assert list(flatten(nested).items()) == flat
    assert flatten({"a": {"b": 1}}, prefix="cfg.") == {"cfg.a.b": 1} and flatten({}) == {}
    rows = dict(_md_table_after(report[0]["md"].read_text(encoding="utf-8"), "## Configuration"))
    assert rows["model.hidden_dims"] == "[500]" and rows["model.activation"] == "tanh"  # lists as JSON
    assert rows["likelihood.allow_improper"] == "false"


def test_differences_names_each_leaf_both_hold_with_other_values():
    recorded = {"seed": 0, "model": {"dims": [500], "act": "tanh"}, "eval": {"k": 10}, "old": 1}
    current = {"seed": 1, "model": {"dims": [500, 500], "act": "tanh"}, "eval": {"k": 20}, "new": 2}
    assert differences(recorded, current) == {
        "seed": (1, 0),
        "model.dims": ([500, 500], [500]),
        "eval.k": (20, 10),
    }  # in current's order; keys only one of them holds are not compared
    assert list(differences(recorded, current, skip=("eval", "model"))) == ["seed"]
    assert differences(recorded, recorded) == {}


@pytest.mark.slow
def test_the_configuration_table_is_the_one_the_stages_recorded(tmp_path):
    """The report printed the configuration it was given beside the records' numbers: under an edited
    params.yaml (another data.path, learning rate, seed) a table of settings those numbers were not made
    with. It prints eval.json's `config`, and marks each key train.json's `config` holds otherwise (eval.*
    and tracking.* aside: the training reads neither)."""
    out = make_out_dir(tmp_path / "run")
    metrics = out / "metrics"
    ev, tr = (json.loads((metrics / f).read_text()) for f in ("eval.json", "train.json"))
    evaluated = {**CONFIG, "seed": 3, "train": {**CONFIG["train"], "max_epochs": 7}, "tracking": {"on": 1}}
    trained = {**evaluated, "train": CONFIG["train"], "eval": {"num_samples": 5}, "tracking": {"on": 0}}
    (metrics / "eval.json").write_text(json.dumps({**ev, "config": evaluated}))
    (metrics / "train.json").write_text(json.dumps({**tr, "config": trained}))
    edited = {**CONFIG, "seed": 9, "model": {**CONFIG["model"], "hidden_dims": [64]}}
    md = write_report(out, edited)["md"].read_text(encoding="utf-8")
    rows = dict(_md_table_after(md, "## Configuration"))
    assert rows["seed"] == "3" and rows["model.hidden_dims"] == "[500]"  # eval.json's, not the given ones
    assert rows["train.max_epochs"] == "7 (training: 5)"  # the training ran with 5
    assert rows["eval.num_samples"] == "1000" and rows["tracking.on"] == "1"  # the training reads neither
    assert [k for k, v in rows.items() if "training:" in v] == ["train.max_epochs"]
    assert "ran with otherwise" in md
    (metrics / "train.json").write_text(json.dumps({**tr, "config": evaluated}))  # one configuration
    md = write_report(out, edited)["md"].read_text(encoding="utf-8")
    assert "training:" not in md and dict(_md_table_after(md, "## Configuration"))["train.max_epochs"] == "7"
    (metrics / "eval.json").write_text(json.dumps(ev))  # an eval.json from before it held one
    rows = dict(
        _md_table_after(write_report(out, edited)["md"].read_text(encoding="utf-8"), "## Configuration")
    )
    assert rows["seed"] == "9 (training: 3)" and rows["model.hidden_dims"] == "[64] (training: [500])"
    (metrics / "train.json").write_text(json.dumps(tr))  # records from before they held one: the given one
    rows = dict(
        _md_table_after(write_report(out, edited)["md"].read_text(encoding="utf-8"), "## Configuration")
    )
    assert rows["seed"] == "9" and rows["model.hidden_dims"] == "[64]"


@pytest.mark.slow
def test_the_environment_table_gives_each_stages_device_and_versions_as_recorded(tmp_path):
    """The report's Environment section, before its Configuration: the git commit, the device and each
    package's version that eval.json and train.json record (`commit`, `device`, `versions`), a column a
    stage; a commit recorded as none is said to be unknown; a stage whose record names none of them (written
    before they did) has no column, and records that name none give no section."""
    out = make_out_dir(tmp_path / "run")
    metrics = out / "metrics"
    ev, tr = (json.loads((metrics / f).read_text()) for f in ("eval.json", "train.json"))
    evaluated = {"python": "3.11.7", "vaerepro": "0.1.0", "torch": "2.13.0+cpu"}
    trained = {"python": "3.11.7", "vaerepro": "0.1.0", "torch": "2.12.1+cu126", "numpy": "2.4.6"}
    gpus = "cuda:0 (NVIDIA H200), 4 processes"
    (metrics / "eval.json").write_text(
        json.dumps({**ev, "device": "cpu (x86_64, 2 cores)", "versions": evaluated, "commit": None})
    )
    trained_at = "a" * 40 + "-dirty"
    (metrics / "train.json").write_text(
        json.dumps({**tr, "device": gpus, "versions": trained, "commit": trained_at})
    )
    md = write_report(out, CONFIG)["md"].read_text(encoding="utf-8")
    assert re.findall(r"^## (.+)$", md, flags=re.MULTILINE)[-2:] == ["Environment", "Configuration"]
    assert "|  | evaluation | training |" in md.split("## Environment", 1)[1]
    assert _md_table_after(md, "## Environment") == [
        ["git commit", "unknown (not a git checkout)", trained_at],
        ["device", "cpu (x86_64, 2 cores)", gpus],
        ["python", "3.11.7", "3.11.7"],
        ["vaerepro", "0.1.0", "0.1.0"],
        ["torch", "2.13.0+cpu", "2.12.1+cu126"],
        ["numpy", "not recorded", "2.4.6"],
    ]
    (metrics / "train.json").write_text(json.dumps(tr))  # a training recorded before either was
    md = write_report(out, CONFIG)["md"].read_text(encoding="utf-8")
    assert "|  | evaluation |\n" in md.split("## Environment", 1)[1]
    assert _md_table_after(md, "## Environment")[4] == ["torch", "2.13.0+cpu"]
    (metrics / "eval.json").write_text(json.dumps(ev))
    assert "## Environment" not in write_report(out, CONFIG)["md"].read_text(encoding="utf-8")


def test_document_imports_neither_the_report_nor_matplotlib():
    """document is the core both reports build on: no import cycle, and a light import (files, which writes
    the reports whole, and quick_exit, which the package imports first, use the standard library only)."""
    code = "import sys, vaerepro.document; print(*sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    heavy = [m for m in out.split() if m.startswith(("vaerepro.", "matplotlib", "numpy"))]
    assert sorted(heavy) == ["vaerepro.document", "vaerepro.files", "vaerepro.quick_exit"]


def test_blocks_render_to_markdown_linking_the_figures_written(tmp_path):
    blocks = [
        Heading("Part"),
        Caution("careful"),
        Table(["k", "v"], [["x|y", "1"]]),
        Fig("one", "a [1]", png(Figure()), "c"),
    ]
    paths, rel = write_figures(blocks, tmp_path / "figures")
    assert paths == [tmp_path / "figures" / "one.png"] and paths[0].read_bytes().startswith(PNG_SIGNATURE)
    md = render_md("T", blocks, rel)
    assert md.splitlines()[:4] == ["# T", "", "## Part", ""] and "> **WARNING:** careful" in md
    assert "| x\\|y | 1 |" in md and "![a \\[1\\]](figures/one.png)" in md and "*c*" in md


def test_the_comparison_figure_keeps_unconverged_estimates_off_its_lines(monkeypatch):
    # AEVB Figure 2's lines join the mean log p(x) at each latent size: an unconverged estimate (here the
    # best number, -60) averaged into them would draw a converged-looking line through (-95 - 60) / 2
    from vaerepro import report_comparison

    drawn = []
    monkeypatch.setattr(report_comparison, "png", lambda fig: drawn.append(fig) or b"")
    rows = [
        run("conv-a", "binary", -95.0, converged=1.0),
        run("wild", "binary", -60.0, converged=0.0),
        run("conv-b", "binary", -100.0, converged=True, latent_dim=5),
        run("unchecked", "binary", -97.0, latent_dim=10),
    ]
    (fig,) = [b for b in report_comparison.comparison_section(rows) if isinstance(b, Fig)]
    (ax,) = drawn[0].axes
    (line,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    assert list(line.get_xdata()) == [2, 5, 10]
    assert list(line.get_ydata()) == [-95.0, -100.0, -97.0]
    # the unconverged point is still drawn, hollow and named as such in the legend and the caption
    assert "bernoulli, NOT CONVERGED (not joined)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert "1 run(s) whose log p(x) estimate has NOT CONVERGED: hollow markers" in fig.caption


def test_the_comparison_figure_joins_the_mean_over_seeds_at_each_latent_size(monkeypatch):
    # three seeds at latent size 2 and two at 5, each likelihood its own line: the line passes through the
    # mean of each size's runs (the errorbar points are the runs themselves)
    from vaerepro import report_comparison

    drawn = []
    monkeypatch.setattr(report_comparison, "png", lambda fig: drawn.append(fig) or b"")
    rows = [
        run("z2-s0", "continuous", 600.0, likelihood="gaussian"),
        run("z2-s1", "continuous", 610.0, likelihood="gaussian"),
        run("z2-s2", "continuous", 626.0, likelihood="gaussian"),
        run("z5-s0", "continuous", 640.0, likelihood="gaussian", latent_dim=5),
        run("z5-s1", "continuous", 650.0, likelihood="gaussian", latent_dim=5),
        run("cb-z2", "continuous", 900.0, likelihood="continuous_bernoulli"),
        run("cb-z5", "continuous", 950.0, likelihood="continuous_bernoulli", latent_dim=5),
    ]
    report_comparison.comparison_section(rows)
    (ax,) = drawn[0].axes
    lines = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    assert [(list(ln.get_xdata()), list(ln.get_ydata())) for ln in lines] == [
        ([2, 5], [612.0, 645.0]),
        ([2, 5], [900.0, 950.0]),
    ]


def test_each_likelihood_has_one_colour_in_every_figure(monkeypatch):
    # the colours came from matplotlib's cycle figure by figure: a Gaussian alone in one figure was C0, the
    # colour of the continuous Bernoulli in the next. Here two figures of one data space (two test sets)
    from matplotlib.colors import to_hex

    from vaerepro import likelihoods, report_comparison

    assert set(report_comparison.LIKELIHOOD_COLOURS) == set(likelihoods.REGISTRY)
    drawn = []
    monkeypatch.setattr(report_comparison, "png", lambda fig: drawn.append(fig) or b"")
    rows = [
        run("g-a", "continuous", 600.0, likelihood="gaussian", test_set="aaaa"),
        run("g-a5", "continuous", 640.0, likelihood="gaussian", latent_dim=5, test_set="aaaa"),
        run("cb-b", "continuous", 900.0, likelihood="continuous_bernoulli", test_set="bbbb"),
        run("g-b", "continuous", 610.0, likelihood="gaussian", test_set="bbbb", converged=False),
        run("nameless", "continuous", 620.0, likelihood=None, latent_dim=5, test_set="bbbb"),
    ]
    report_comparison.comparison_section(rows)
    seen = [{c.get_label(): to_hex(c.lines[0].get_color()) for c in fig.axes[0].containers} for fig in drawn]
    expected = {lik: to_hex(c) for lik, c in report_comparison.LIKELIHOOD_COLOURS.items()}
    assert seen == [
        {"gaussian": expected["gaussian"]},
        {
            "continuous_bernoulli": expected["continuous_bernoulli"],
            "gaussian, NOT CONVERGED (not joined)": expected["gaussian"],
            "?": to_hex("C7"),
        },
    ]
    assert len(set(expected.values()) | {to_hex("C7")}) == 4


def test_the_improper_group_and_only_it_carries_the_warning_that_it_is_not_comparable(monkeypatch):
    from vaerepro import report_comparison

    monkeypatch.setattr(report_comparison, "png", lambda fig: b"")
    rows = [
        run("grey-a", "continuous", -60.0, improper=True),
        run("cb", "continuous", 900.0, likelihood="continuous_bernoulli"),
        run("grey-b", "continuous", -55.0, improper=True, latent_dim=5),
    ]
    blocks = report_comparison.comparison_section(rows)
    headings = [i for i, b in enumerate(blocks) if isinstance(b, Heading) and b.level == 3]
    groups = {
        blocks[i].text: blocks[i + 1 : j] for i, j in zip(headings, [*headings[1:], len(blocks)], strict=True)
    }
    assert list(groups) == [space_label("continuous", True), space_label("continuous", False)]
    improper, proper = groups.values()
    assert isinstance(improper[0], Caution) and improper[0].text.startswith(
        "IMPROPER runs: Bernoulli likelihoods on grey-level pixels, not normalised densities."
    )
    assert "not comparable with any proper run" in improper[0].text
    assert not [b for b in proper if isinstance(b, Caution)]


def test_active_units_of_a_two_layer_model_are_shown_per_layer(tmp_path):
    """As Burda et al. print them: z1's + z2's, each of its layer's size."""
    out = make_out_dir(tmp_path / "out", latent_dim=100)
    ev = json.loads((out / "metrics" / "eval.json").read_text())
    ev.update(active_units=27, active_units_by_layer=[22, 5])
    (out / "metrics" / "eval.json").write_text(json.dumps(ev))
    config = {**CONFIG, "model": {**CONFIG.get("model", {}), "latent_dim": 100, "latent_dim_2": 50}}
    md = write_report(out, config, report_dir=tmp_path / "rep")["md"].read_text(encoding="utf-8")
    assert "| active units | 22 + 5 of 100 + 50 | latent dimensions in use, z1 + z2 |" in md


# --- the report never shows an evaluation of other weights beside a training ------------------------------


@pytest.mark.slow
def test_an_evaluation_of_other_weights_than_the_training_describes_is_refused(tmp_path):
    """train.json and eval.json each name the sha256 of the models/best.ckpt they describe; the report
    refuses, in one line naming eval.json and both digests, a pair that differ, writing nothing, and reports
    a pair that agree, or records written before the files named a checkpoint."""
    out = make_out_dir(tmp_path / "run")
    metrics = out / "metrics"
    ev, tr = (json.loads((metrics / f).read_text()) for f in ("eval.json", "train.json"))
    write_json = {
        f: (lambda d, f=f: (metrics / f).write_text(json.dumps(d))) for f in ("eval.json", "train.json")
    }
    write_json["eval.json"]({**ev, "checkpoint_sha256": "a" * 64})
    write_json["train.json"]({**tr, "best_checkpoint_sha256": "b" * 64})
    expected = (
        f"{metrics / 'eval.json'}: evaluated another models/best.ckpt (sha256 aaaaaaaaaaaa) than the "
        f"training in {metrics / 'train.json'} wrote (bbbbbbbbbbbb): the model was trained again after its "
        "evaluation; run `vaerepro evaluate` again"
    )
    with pytest.raises(FileNotFoundError) as err:
        write_report(out, CONFIG)
    assert str(err.value) == expected
    assert not (out / "reports").exists()
    write_json["train.json"]({**tr, "best_checkpoint_sha256": "a" * 64})
    assert write_report(out, CONFIG)["md"].is_file()
    write_json["train.json"](tr)  # a train.json from before the key: not checked
    assert write_report(out, CONFIG)["md"].is_file()


@pytest.mark.slow
def test_training_again_after_an_evaluation_stops_the_report_until_evaluated_again(tmp_path, prepared_tiny):
    """The stages as `vaerepro train`, `evaluate` and `report` run them on one directory: after a second
    training (another seed: other weights in models/best.ckpt) the report refuses the first evaluation;
    evaluated again, it reports the new model (train.json and eval.json name the same checkpoint); the
    report stage under another configuration than the evaluated one is refused too."""
    from conftest import ROOT, copy_prepared, tiny_config
    from vaerepro.cli import stage_report
    from vaerepro.evaluate import evaluate
    from vaerepro.report import LABELS, config_labels
    from vaerepro.sources import file_sha256
    from vaerepro.train import train

    out = copy_prepared(prepared_tiny, tmp_path)
    first, second = (tiny_config("train.max_epochs=1", "eval.num_samples=10", f"seed={s}") for s in (0, 1))
    train(first, out, enable_progress_bar=False)
    evaluate(first, out, progress=False)
    write_report(out, first.to_dict())
    train(second, out, enable_progress_bar=False)
    best = file_sha256(out / "models" / "best.ckpt")
    read = {f: json.loads((out / "metrics" / f).read_text()) for f in ("eval.json", "train.json")}
    assert read["train.json"]["best_checkpoint_sha256"] == best != read["eval.json"]["checkpoint_sha256"]
    with pytest.raises(FileNotFoundError, match=r"eval.json: evaluated another models/best.ckpt"):
        write_report(out, second.to_dict())
    evaluate(second, out, progress=False)
    ev = json.loads((out / "metrics" / "eval.json").read_text())
    assert ev["checkpoint_sha256"] == best
    # what the check compares: the config's values of the labels eval.json records, equal for its own config
    assert (
        config_labels(second.to_dict(), second.data_space)
        == {k: ev[k] for k in LABELS}
        == {
            "likelihood": "bernoulli",
            "latent_dim": 4,
            "num_samples": 10,
            "source": "mnist5k",
            "data_space": "binary",
        }
    )
    assert write_report(out, second.to_dict())["md"].is_file()
    # the report stage under another configuration than the one evaluated: refused, naming each key
    other = tiny_config("train.max_epochs=1", "eval.num_samples=11", "seed=1", "model.latent_dim=5")
    with pytest.raises(FileNotFoundError) as err:
        stage_report(other, out, ROOT)
    assert str(err.value) == (
        f"{out / 'metrics' / 'eval.json'}: evaluated another configuration than the report's "
        "(model.latent_dim: 5 in the config, 4 in eval.json; eval.num_samples: 11 in the config, 10 in "
        "eval.json); report with the config the stages ran with, or run them again with this one"
    )
    assert stage_report(second, out, ROOT)["md"].is_file()


def test_the_report_stage_under_an_edited_config_prints_the_one_the_stages_ran_under(
    tmp_path, prepared_tiny, caplog
):
    """The stages run by hand: train and evaluate under one config, then `vaerepro report` after the
    config was edited in keys the headline labels do not show (the learning rate, the seed, the split seed,
    a training key changed between the training and the evaluation). The report's table is what each stage
    ran under, and the stage warns that it is not the config it was given."""
    from conftest import ROOT, copy_prepared, tiny_config
    from vaerepro.cli import stage_report
    from vaerepro.evaluate import evaluate
    from vaerepro.train import train

    out = copy_prepared(prepared_tiny, tmp_path)
    cfg = tiny_config("train.max_epochs=1", "eval.num_samples=10", "tracking.enabled=false")
    train(cfg, out, enable_progress_bar=False)
    evaluate(
        tiny_config("train.max_epochs=2", "eval.num_samples=10", "tracking.enabled=false"),
        out,
        progress=False,
    )
    recorded = {
        f: json.loads((out / "metrics" / f).read_text())["config"] for f in ("train.json", "eval.json")
    }
    assert (
        recorded["train.json"]["train"]["max_epochs"] == 1
        and recorded["eval.json"]["train"]["max_epochs"] == 2
    )
    edited = tiny_config(
        "train.max_epochs=2", "eval.num_samples=10", "tracking.enabled=false", "train.lr=0.5", "seed=7"
    )
    with caplog.at_level("WARNING", logger="vaerepro"):
        md = stage_report(edited, out, ROOT)["md"].read_text(encoding="utf-8")
    rows = dict(_md_table_after(md, "## Configuration"))
    assert rows["train.lr"] == _cell_of(cfg.train.lr) and rows["seed"] == "0"
    assert rows["train.max_epochs"] == "2 (training: 1)"
    assert [r.getMessage() for r in caplog.records if "report prints" in r.getMessage()] == [
        f"the report prints the configuration {out / 'metrics' / 'eval.json'} was evaluated under, which "
        "differs from this one in seed, train.lr"
    ]


def _cell_of(value) -> str:
    return json.dumps(value)


def test_an_evaluation_that_fails_leaves_the_previous_ones_files_together(
    tmp_path, prepared_tiny, monkeypatch
):
    """evaluate computes everything before it writes a file: one that fails at its last computation (the
    report's images) leaves the previous evaluation's eval.json, per_example.npz and samples.npz as they
    were, so the report never shows one evaluation's images beside another's numbers."""
    from conftest import copy_prepared, tiny_config
    from vaerepro import evaluate as evaluate_mod
    from vaerepro.train import train

    out = copy_prepared(prepared_tiny, tmp_path)
    cfg = tiny_config("train.max_epochs=1", "eval.num_samples=10")
    train(cfg, out, enable_progress_bar=False)
    evaluate_mod.evaluate(cfg, out, progress=False)
    files = [
        out / "metrics" / "eval.json",
        out / "artifacts" / "per_example.npz",
        out / "artifacts" / "samples.npz",
    ]
    before = [f.read_bytes() for f in files]

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(evaluate_mod, "sample_images", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate_mod.evaluate(tiny_config("train.max_epochs=1", "eval.num_samples=12"), out, progress=False)
    assert [f.read_bytes() for f in files] == before


class Killed(BaseException):
    """A kill -9 between two files, as an exception nothing catches."""


def _killed(*args, **kwargs):
    raise Killed


def test_an_evaluation_killed_between_its_numbers_and_its_summary_leaves_no_earlier_summary(
    tmp_path, prepared_tiny, monkeypatch
):
    """eval_summary.json (DVC's headline numbers) was written after eval.json: an evaluation killed between
    the two left the new eval.json beside the earlier evaluation's summary, which `dvc metrics show` and
    `dvc exp show` then read as this one's. The summary is removed before the first file is written and
    written last: after such a kill there is none, and eval.json is the new evaluation's whole record."""
    from conftest import copy_prepared, tiny_config
    from vaerepro import evaluate as evaluate_mod
    from vaerepro.files import write_json
    from vaerepro.train import train

    out = copy_prepared(prepared_tiny, tmp_path)
    cfg = tiny_config("train.max_epochs=1", "eval.num_samples=10")
    train(cfg, out, enable_progress_bar=False)
    evaluate_mod.evaluate(cfg, out, progress=False)
    summary = out / "metrics" / "eval_summary.json"
    assert summary.is_file()

    def numbers_then_killed(path, data):
        if Path(path).name == "eval_summary.json":
            raise Killed
        return write_json(path, data)

    monkeypatch.setattr(evaluate_mod, "write_json", numbers_then_killed)
    with pytest.raises(Killed):
        evaluate_mod.evaluate(tiny_config("train.max_epochs=1", "eval.num_samples=12"), out, progress=False)
    assert json.loads((out / "metrics" / "eval.json").read_text())["num_samples"] == 12
    assert not summary.exists()


@pytest.mark.parametrize("killed_at", ["render_html", "render_md"])
@pytest.mark.slow
def test_a_report_killed_between_its_files_leaves_no_document_of_the_earlier_one(
    tmp_path, monkeypatch, killed_at
):
    """The report wrote its figures, then report.html, then report.md: a kill between them left the earlier
    report's report.md (and report.html) beside the new figures, which the Markdown links, read as one
    report. The two documents are removed first and written after the figures, the Markdown last: a kill
    leaves the new figures with no document, or with the new report.html only."""
    from vaerepro import document
    from vaerepro import report as report_mod

    out = make_out_dir(tmp_path / "run")
    paths = write_report(out, CONFIG)
    assert paths["html"].is_file() and paths["md"].is_file()
    ev = json.loads((out / "metrics" / "eval.json").read_text())
    (out / "metrics" / "eval.json").write_text(json.dumps({**ev, "elbo": -77.77}))
    for module in (document, report_mod):  # where the writer looks the renderer up
        monkeypatch.setattr(module, killed_at, _killed, raising=False)
    with pytest.raises(Killed):
        write_report(out, CONFIG)
    html, md = paths["html"], paths["md"]
    assert not md.exists()
    if killed_at == "render_html":
        assert not html.exists()
    else:
        assert "-77.77" in html.read_text(encoding="utf-8")
    assert sorted(p.name for p in (out / "reports" / "figures").iterdir()) == sorted(
        p.name for p in paths["figures"]
    )
