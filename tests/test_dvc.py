"""DVC where users compare runs, on the tiny config in a temporary git repository set up as README says
(`make repro`, then the commit it prints): `dvc metrics diff`, `dvc params diff` and `dvc exp show` compare
the first run with the next, their tables hold the headline numbers, `make exps` fits a 160-column terminal,
and `dvc plots show` draws its one plot without a network."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import BIN, ROOT, run
from test_pipeline import tiny_repo

VENV = BIN.parent
TEMPLATE = ROOT / "vendor" / "dvc-plots.html"  # built by `make plots-template`
COMMIT = "git add dvc.lock metrics plots && git commit -m 'Results of the pipeline'"  # what make repro prints
# the headline columns, the numbers in nats named under their data space, log p(x) and its SE by K too (the
# tiny config's eval.num_samples=50)
# what `make exps` always shows: every log p(x) with its SE and its convergence verdict (eval.json's
# `converged`), so a sort by log p(x) never hides that an estimate may still be far from it
HEADLINE = [
    "likelihood",
    "latent_dim",
    "binary.log_px_k50",
    "binary.log_px_k50_se",
    "binary.elbo",
    "knn_accuracy",
    "converged",
]
LINE_RGB = (0x94, 0x5D, 0xD6)  # the colour of DVC's first line (dvc_render's colour range)


def make(target: str, repo, env: dict | None = None) -> str:
    """`make target` with the project's Makefile in repo, on this venv, never reinstalling it (-o) nor
    fetching Vega."""
    old = ["-o", f"{VENV}/.installed", "-o", "vendor/dvc-plots.html"]
    return run(["make", "-s", *old, target, f"VENV={VENV}"], repo, env=env).stdout


def dvc(repo, *args: str, env: dict | None = None) -> str:
    """A dvc command's output, stdout and stderr together: DVC reports unreadable metrics on stderr."""
    proc = run(["dvc", *args], repo, env=env)
    return proc.stdout + proc.stderr


def dvc_json(repo, *args: str):
    return json.loads(run(["dvc", *args, "--json"], repo).stdout)


def width(table: str) -> int:
    return max(len(line.rstrip()) for line in table.splitlines())


def header(table: str) -> str:
    return next(line for line in table.splitlines() if "Experiment" in line)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A fresh clone after `make repro` and the commit it prints; `dvc metrics diff` before that commit."""
    repo = tiny_repo(tmp_path_factory.mktemp("setup"), extra=("Makefile", "requirements.lock"))
    printed = make("repro", repo)
    assert COMMIT in printed and f"source {VENV}/bin/activate" in printed  # the README's commands are .venv's
    before = dvc(repo, "metrics", "diff")
    run(["bash", "-c", COMMIT], repo)
    return repo, before


@pytest.fixture(scope="module")
def compared(baseline):
    """The baseline and one experiment, applied to the workspace."""
    repo, _ = baseline
    run(["dvc", "exp", "run", "-S", "model.latent_dim=5"], repo)
    return repo


@pytest.mark.slow
def test_the_printed_commit_gives_dvc_its_baseline(baseline):
    repo, before = baseline
    assert "failed to load some metrics for following revisions: 'HEAD'" in before  # why the commit
    assert run(["git", "status", "--porcelain"], repo).stdout == ""  # it took every result
    ev = json.loads((repo / "metrics/eval.json").read_text())
    summary = json.loads((repo / "metrics/eval_summary.json").read_text())
    assert list(summary) == ["likelihood", "latent_dim", "binary", "knn_accuracy", "converged"]
    assert ev["num_samples"] == 50
    numbers = {"log_px_k50": ev["log_px"], "log_px_k50_se": ev["log_px_se"], "elbo": ev["elbo"]}
    assert summary["binary"] == numbers
    assert all(summary[k] == ev[k] for k in summary if k != "binary")
    for args in (["metrics", "diff"], ["params", "diff"], ["exp", "show", "--no-pager"]):
        out = dvc(repo, *args)
        assert "failed" not in out and "!" not in out, (args, out)
    diff = dvc_json(repo, "metrics", "diff", "--all")["metrics/eval_summary.json"]
    assert diff["binary.log_px_k50"] == {"old": ev["log_px"], "new": ev["log_px"], "diff": 0}
    params = dvc_json(repo, "params", "diff", "--all")["params.yaml"]
    assert params["model.latent_dim"] == {"old": 4, "new": 4, "diff": 0}


@pytest.mark.slow
def test_dvc_compares_the_first_run_with_an_experiment(baseline, compared):
    repo = compared
    first = json.loads(run(["git", "show", "HEAD:metrics/eval_summary.json"], repo).stdout)
    now = json.loads((repo / "metrics/eval_summary.json").read_text())
    out = dvc(repo, "metrics", "diff")
    assert "failed" not in out and "binary.log_px_k50" in out
    diff = dvc_json(repo, "metrics", "diff")["metrics/eval_summary.json"]
    assert diff["latent_dim"] == {"old": 4, "new": 5, "diff": 1}
    assert (diff["binary.log_px_k50"]["old"], diff["binary.log_px_k50"]["new"]) == (
        first["binary"]["log_px_k50"],
        now["binary"]["log_px_k50"],
    )
    params = dvc_json(repo, "params", "diff")
    assert params == {"params.yaml": {"model.latent_dim": {"old": 4, "new": 5, "diff": 1}}}

    rows = list(csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--csv"], repo).stdout)))
    assert [r["typ"] for r in rows] == ["baseline", "baseline", "branch_base"]  # workspace, HEAD, experiment
    assert "!" not in {v for r in rows for v in r.values()}
    head, exp = rows[1], rows[2]
    assert float(head["binary.log_px_k50"]) == pytest.approx(first["binary"]["log_px_k50"])  # the first: HEAD
    assert float(exp["binary.log_px_k50"]) == pytest.approx(now["binary"]["log_px_k50"])
    assert exp["latent_dim"] == "5"
    # metrics are the headline numbers: no bookkeeping, no ladder or convergence details
    assert {"quantized", "source", "data_dim", "num_samples", "ess"}.isdisjoint(rows[0])
    assert not [k for k in rows[0] if k.startswith(("convergence", "log_px_ladder"))]


@pytest.mark.slow
def test_exp_show_tables_show_the_headline_columns_in_160(compared):
    repo = compared
    # the baseline and latent_dim=5 (fits 160 columns); then also another likelihood, README's grid in
    # small: a second data space's three numbers in columns of their own (fits 230: 216 at K = 50)
    for overrides, columns in (
        ([], 160),
        (["-S", "likelihood=continuous_bernoulli", "-S", "model.latent_dim=5"], 230),
    ):
        if overrides:
            run(["dvc", "exp", "run", *overrides], repo)
        # `make exps`: the whole table fits; nothing is collapsed into "…"
        exps = make("exps", repo, env={"COLUMNS": str(columns)})
        print(f"\nmake exps at COLUMNS={columns}, {width(exps)} columns wide:\n{exps}")
        assert width(exps) <= columns and "…" not in exps and "!" not in exps
        assert set(HEADLINE) <= set(header(exps).split()), header(exps)
        assert "model.latent_dim" not in exps and ".dir" not in exps  # no duplicate of latent_dim, no hashes
        # plain `dvc exp show` in a terminal pipes the whole table (up to 1,024 columns) to `less -S`: the
        # headline numbers of the workspace's data space are on the first screen of a 160-column terminal
        # (`converged`, the file's last, is past it once the Created column holds a date)
        full = dvc(repo, "exp", "show", "--no-pager", env={"COLUMNS": "1024"})
        print(f"dvc exp show, {width(full)} columns wide; its first 160:\n{header(full)[:160]}")
        space = "continuous" if overrides else "binary"
        headline = {name.replace("binary.", f"{space}.") for name in HEADLINE if name != "converged"}
        assert headline <= set(header(full)[:160].split()), header(full)[:160]
    assert "continuous_bernoulli" in exps
    assert {"continuous.log_px_k50", "continuous.elbo"} <= set(header(exps).split()), header(exps)
    # a pmf's number and a density's are never differenced: each is beside a blank under its space's name
    diff = dvc_json(repo, "metrics", "diff", "HEAD")["metrics/eval_summary.json"]
    assert diff["likelihood"]["new"] == "continuous_bernoulli"
    for name in ("log_px_k50", "log_px_k50_se", "elbo"):
        assert diff[f"binary.{name}"]["new"] is None and diff[f"continuous.{name}"]["old"] is None, diff
        assert "diff" not in diff[f"binary.{name}"] and "diff" not in diff[f"continuous.{name}"], diff
    assert not any(key.startswith(("log_px", "elbo")) for key in diff), diff
    # nor drawn on one axis: `dvc plots diff` draws each data space's curve in its own plot
    plots = dvc_json(repo, "plots", "diff", "HEAD")
    assert not plots.get("errors"), plots["errors"]
    curves = {"HEAD": run(["git", "show", "HEAD:plots/elbo.csv"], repo).stdout}
    curves["workspace"] = (repo / "plots" / "elbo.csv").read_text()
    drawn = {}
    for name, (plot,) in plots["data"].items():
        values = plot["content"]["data"]["values"]
        drawn[name] = {(v["rev"], v["field"], float(v["epoch"]), float(v[v["field"]])) for v in values}
    expected = {
        f"plots/elbo_by_space/{space}.csv": {
            (rev, field, float(row["epoch"]), float(row[field]))
            for row in csv.DictReader(io.StringIO(curves[rev]))
            for field in ("train_elbo", "val_elbo")
        }
        for space, rev in (("binary", "HEAD"), ("continuous", "workspace"))
    }
    assert drawn == expected


@pytest.fixture(scope="module")
def another_k(compared):
    """The baseline's model evaluated at K = 20, the last experiment run."""
    repo = compared
    run(["dvc", "exp", "run", "-S", "eval.num_samples=20"], repo)
    assert "K=20" in (repo / "reports/report.md").read_text()
    return repo


@pytest.mark.slow
def test_dvc_never_differences_or_ranks_together_estimates_of_two_k(another_k):
    """An estimate from K = 20 importance samples is lower in expectation than one from K = 50 of the same
    model (Burda et al. 2016). Both were named binary.log_px: `dvc metrics diff` differenced them, a change
    that was K's alone, and `dvc exp show --sort-by binary.log_px` ranked their rows together. Each K now
    has columns of its own, and the other K's row is blank there."""
    repo = another_k
    ev = json.loads((repo / "metrics/eval.json").read_text())
    first = json.loads(run(["git", "show", "HEAD:metrics/eval.json"], repo).stdout)
    assert (ev["num_samples"], first["num_samples"]) == (20, 50)
    diff = dvc_json(repo, "metrics", "diff", "HEAD")["metrics/eval_summary.json"]
    for suffix, value in (("", "log_px"), ("_se", "log_px_se")):
        assert diff[f"binary.log_px_k50{suffix}"] == {"old": first[value], "new": None}, diff
        assert diff[f"binary.log_px_k20{suffix}"] == {"old": None, "new": ev[value]}, diff
    shown = run(["dvc", "exp", "show", "--csv", "--sort-by", "binary.log_px_k50"], repo).stdout
    rows = list(csv.DictReader(io.StringIO(shown)))
    k20_rows = [r for r in rows if r["eval.num_samples"] == "20"]
    assert k20_rows and all(r["binary.log_px_k50"] == "" for r in k20_rows), rows
    assert all(r["binary.log_px_k20"] == "" for r in rows if r["eval.num_samples"] == "50"), rows
    # `make exps` keeps both K's columns
    assert {"binary.log_px_k50", "binary.log_px_k20"} <= set(header(make("exps", repo)).split())


@pytest.mark.slow
def test_exp_apply_brings_back_the_experiments_report(compared, another_k):
    """`dvc exp apply` restores an experiment's outputs; the report was a plain output kept nowhere, so the
    workspace went on showing the report of whichever experiment ran last (another_k) beside the applied
    one's numbers and params (and a queued experiment's report was never kept at all)."""
    repo = another_k
    rows = list(csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--csv"], repo).stdout)))
    bernoulli_z5 = {"model.latent_dim": "5", "likelihood.name": "bernoulli", "eval.num_samples": "50"}
    (z5,) = [r["Experiment"] for r in rows if r["Experiment"] and bernoulli_z5.items() <= r.items()]
    run(["dvc", "exp", "apply", z5], repo)
    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert (ev["latent_dim"], ev["num_samples"]) == (5, 50)
    md = (repo / "reports/report.md").read_text()
    assert md.splitlines()[0].endswith("latent size 5, source mnist5k"), md.splitlines()[0]
    assert re.findall(r"estimate of log p\(x\), K=(\d+)", md) == ["50"]
    assert "report" not in dvc(repo, "status")  # the workspace's report is the applied experiment's


def _line_pixels(png) -> int:
    """Pixels of the page's screenshot in the colour of DVC's first line (anti-aliasing aside)."""
    from PIL import Image

    rgb = Image.open(png).convert("RGB")
    return sum(1 for px in rgb.getdata() if sum(abs(a - b) for a, b in zip(px, LINE_RGB, strict=True)) < 60)


@pytest.mark.slow
def test_plots_show_draws_its_one_plot_offline(baseline, tmp_path):
    repo, _ = baseline
    if not TEMPLATE.is_file():
        pytest.skip(f"no {TEMPLATE}: `make plots-template` (run by make test) builds it with npm")
    # DVC's own page: one plot, epoch on x (no second one against Lightning's step), Vega from a CDN
    run(["dvc", "plots", "show", "-o", str(tmp_path / "cdn")], repo)
    cdn = tmp_path / "cdn" / "index.html"
    page = cdn.read_text()
    assert page.count("vegaEmbed(") == 1 and '"field": "step"' not in page and '"field": "epoch"' in page

    (repo / "vendor").mkdir()
    shutil.copy2(TEMPLATE, repo / "vendor")
    make("plots-template", repo)  # points .dvc/config.local at the template, as make repro and make test do
    run(["dvc", "plots", "show"], repo)
    offline = repo / "dvc_plots" / "index.html"
    html = offline.read_text()
    # nothing to fetch: vega, vega-lite and vega-embed are inline
    assert not re.search(r"<script[^>]*\bsrc\s*=", html)
    assert html.count("vegaEmbed(") == 1 and '"field": "epoch"' in html and "val_elbo" in html
    ignored = ["dvc_plots/index.html", "vendor/dvc-plots.html", ".dvc/config.local"]
    assert run(["git", "check-ignore", *ignored], repo).stdout.split() == ignored

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("needs Chromium to draw the page (Debian: apt-get install chromium)")
    drawn = {}
    for name, page in (("cdn", cdn), ("offline", offline)):
        shot = tmp_path / f"{name}.png"
        args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        args += ["--proxy-server=127.0.0.1:9"]  # a closed port: every request fails, offline on any machine
        args += [f"--user-data-dir={tmp_path / (name + '-profile')}", "--virtual-time-budget=10000"]
        run([*args, "--window-size=900,700", f"--screenshot={shot}", page.as_uri()], tmp_path)
        drawn[name] = _line_pixels(shot)
        print(f"\n{name}: {shot}")
    # two ELBO curves drawn (a 300-pixel-wide plot); DVC's page stays blank, which the issue reported
    assert drawn["offline"] > 300 and drawn["cdn"] == 0, drawn


def test_make_exps_keeps_log_px_columns_of_any_k_and_of_experiments_evaluated_before_k_was_named():
    """`make exps` keeps the headline columns by a regular expression (--keep): log p(x) and its SE of any K
    of each space, the columns that experiments evaluated before K was in the names have (binary.log_px),
    which would otherwise be hidden from the table, and the convergence verdict; not training's ELBO."""
    (line,) = [x for x in (ROOT / "Makefile").read_text().splitlines() if x.startswith("EXPS_KEEP :=")]
    keep = re.compile(line.split(":=", 1)[1].strip().replace("$$", "$"))
    kept = ["binary.log_px_k5000", "continuous.log_px_k20_se", "improper.elbo", "binary.log_px", "converged"]
    assert all(keep.match(name) for name in [*kept, "binary.log_px_se", "latent_dim", "knn_accuracy"])
    assert not any(keep.match(n) for n in ["binary.best_val_elbo", "binary.log_px_kx", "eval.num_samples"])


def test_plots_template_without_npm_says_so_and_leaves_dvc_its_page(tmp_path):
    for name in ("Makefile", "requirements.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    tools = tmp_path / "bin"  # a PATH with the recipe's tools but no npm
    tools.mkdir()
    for tool in ("mktemp", "rm", "sed", "mkdir", "tar", "mv"):
        (tools / tool).symlink_to(shutil.which(tool))
    cmd = [shutil.which("make"), "-s", "-o", f"{VENV}/.installed", "plots-template", f"VENV={VENV}"]
    env = {**os.environ, "PATH": str(tools)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "npm could not fetch vega@" in proc.stdout and "CDN" in proc.stdout
    assert not (tmp_path / "vendor").exists() and not (tmp_path / ".dvc").exists()


def test_the_report_stage_reruns_on_any_key_of_params_yaml():
    """The report prints the whole config (its Configuration table) and compares the run with the others of
    tracking.experiment: a key no earlier stage reads (eval.device when eval.json comes out the same,
    tracking.*) must still rewrite it, or the report names another configuration than params.yaml's."""
    import yaml

    params = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"].get("params", [])
    assert {"params.yaml": None} in params, params
