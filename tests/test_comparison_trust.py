"""Which runs the comparison across runs trusts: RUNNING runs (the report's own, others) and numbers that no
correct evaluation writes (a hand-edited or damaged eval.json, or such numbers in MLflow)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from test_report import CONFIG, Collector, make_out_dir, run
from vaerepro import compare, report_comparison, tracking
from vaerepro.config import compose, dump, find_project_root
from vaerepro.document import Fig, Table
from vaerepro.report import ResultFileError, write_report


def _tables(blocks, kind):
    return [b for b in blocks if isinstance(b, Table) and b.kind == kind]


def _ranked(blocks):
    (table,) = _tables(blocks, "ranking")
    return [row[:2] for row in table.rows]


def _excluded(blocks):
    (table,) = _tables(blocks, "excluded")
    return {row[0]: row[-1] for row in table.rows}


# ------------------------------------------------------------------------------------- RUNNING runs


def test_a_running_run_is_left_out_with_its_reason_and_the_report_own_run_is_ranked_and_marked(monkeypatch):
    drawn = []
    monkeypatch.setattr(report_comparison, "png", lambda fig: drawn.append(fig) or b"")
    rows = [
        run("done", "binary", -95.0),
        run("still-going", "binary", -80.0, status="RUNNING", latent_dim=5),  # best number, not finished
        run("mine", "binary", -90.0, status="RUNNING", latent_dim=10),  # the report's own run
    ]
    blocks = report_comparison.comparison_section(rows, this_run="id-mine")
    assert _ranked(blocks) == [["1", "mine (this run)"], ["2", "done"]]
    assert _excluded(blocks) == {
        "still-going": "status RUNNING, not finished: its numbers may be partial or still change"
    }
    # the figure: the running run is not drawn; this run's point carries the label
    (fig,) = [b for b in blocks if isinstance(b, Fig)]
    (ax,) = drawn[0].axes
    (line,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    assert list(line.get_xdata()) == [2, 10] and list(line.get_ydata()) == [-95.0, -90.0]
    (note,) = ax.texts
    assert note.get_text() == "this run" and tuple(note.xy) == (10, -90.0)
    assert "The arrow marks this run (mine)." in fig.caption
    # without knowing its own run, every RUNNING run is left out
    assert _ranked(report_comparison.comparison_section(rows)) == [["1", "done"]]


def test_runs_named_alike_are_told_apart_by_their_id(monkeypatch):
    """Runs of one likelihood, latent size and seed (a learning-rate loop) share a run name: their rows in
    the ranking, and in the list of runs left out, carry their run ids' first 8 characters; a name only one
    run has is shown as it is, and the report's own run keeps its mark."""
    monkeypatch.setattr(report_comparison, "png", lambda fig: b"")
    rows = [
        {**run("bernoulli-z2-s0", "binary", -95.0), "run_id": "aaaaaaaa1111"},
        {**run("bernoulli-z2-s0", "binary", -90.0), "run_id": "bbbbbbbb2222"},
        {**run("bernoulli-z2-s0", "binary", -80.0, status="RUNNING"), "run_id": "cccccccc3333"},
        run("bernoulli-z5-s0", "binary", -99.0, latent_dim=5),
    ]
    blocks = report_comparison.comparison_section(rows, this_run="aaaaaaaa1111")
    assert _ranked(blocks) == [
        ["1", "bernoulli-z2-s0 [bbbbbbbb]"],
        ["2", "bernoulli-z2-s0 [aaaaaaaa] (this run)"],
        ["3", "bernoulli-z5-s0"],
    ]
    assert list(_excluded(blocks)) == ["bernoulli-z2-s0 [cccccccc]"]


def test_the_report_marks_the_run_its_evaluation_logged_to(tmp_path):
    out = make_out_dir(tmp_path / "run")
    (out / "artifacts" / "mlflow_run.json").write_text(json.dumps({"run_id": "id-mine", "tracking_uri": "x"}))
    runs = [
        run("mine", "binary", -87.65, status="RUNNING"),  # ended FINISHED only after its report is written
        run("other", "binary", -95.0, latent_dim=5),
        run("killed-9", "binary", -60.0, latent_dim=10, status="RUNNING"),  # never ended
    ]
    this_run = tracking.stage_run_id(out)[0]  # as the report stage finds it (cli.stage_report)
    page = write_report(out, CONFIG, runs=runs, this_run=this_run)["html"].read_text(encoding="utf-8")
    parsed = Collector()
    parsed.feed(page)
    (table,) = [t for t in parsed.tables if t is not None]
    assert [r["cells"][:2] for r in table["rows"]] == [["1", "mine (this run)"], ["2", "other"]]
    assert "<td>killed-9</td>" in page and "status RUNNING, not finished" in page


def test_the_sweep_report_leaves_out_a_running_trial_run(tmp_path):
    import optuna

    from vaerepro.sweep.report import write_sweep_report

    study = optuna.create_study(direction="maximize")
    runs = [
        run("trial 0", "binary", -95.0),
        run("trial 1", "binary", -99.0, latent_dim=5),
        run("trial 2", "binary", -80.0, latent_dim=10, status="RUNNING"),
    ]
    md = write_sweep_report(study, tmp_path / "report", runs=runs)["md"].read_text()
    section = md.split("## Comparison across runs", 1)[1]
    ranking = section.split("### Not plotted, not ranked", 1)[0]
    assert "| 1 | trial 0 |" in ranking and "| 2 | trial 1 |" in ranking and "trial 2" not in ranking
    assert "| trial 2 | RUNNING |" in section and "status RUNNING, not finished" in section


# ------------------------------------------------------------------------------ impossible numbers


EVAL = {"log_px": -87.6, "log_px_se": 0.12, "num_examples": 1000, "data_space": "binary", "improper": False}


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"log_px_se": -0.5}, "log_px_se = -0.5 is negative: a standard error never is"),
        ({"log_px_se": math.nan}, "log_px_se = nan with a finite log p(x): evaluate writes a NaN standard"),
        ({"log_px": math.nan}, "log_px = nan without the verdict 'not converged'"),
        ({"log_px": math.nan, "converged": True}, "log_px = nan without the verdict 'not converged'"),
        ({"log_px": math.inf}, "log_px = inf without the verdict 'not converged'"),  # an unbounded density
        ({"log_px": -math.inf}, "log_px = -inf without the verdict 'not converged'"),  # every weight zero
        ({"log_px": 12.0}, "log_px = 12.0 nats/example on binary pixels under a Bernoulli: p(x) <= 1"),
        ({"log_px": 12.0, "converged": False}, "log_px = 12.0 nats/example on binary pixels"),
        (
            {"log_px": 2.0, "data_space": "continuous", "improper": True},
            "log_px = 2.0 nats/example on contin",
        ),
        ({"log_px": "-87.6"}, "log_px = '-87.6' is not a number"),  # text, not the number evaluate writes
        ({"elbo": "high"}, "elbo = 'high' is not a number"),
        (
            {"log_px_ladder": [{"k": 1, "log_px": -95.0, "se": -0.3}]},
            "log_px_ladder[0].se = -0.3 is negative",
        ),
        (
            {"log_px_ladder": [{"k": 1, "log_px": None, "se": "x"}]},
            "log_px_ladder[0].se = 'x' is not a number",
        ),
    ],
)
def test_numbers_no_evaluation_writes_are_named_with_their_key(change, problem):
    found = compare.impossible({**EVAL, **change}, strict=True)
    assert found is not None and found.startswith(problem), found


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"log_px_se": 0.0},  # every example's estimate equal
        {"log_px_se": math.nan, "num_examples": 1},  # one test example: no standard error (mean_se)
        # a non-finite estimate, recorded as evaluate records it (estimators.convergence)
        {"log_px": math.nan, "log_px_se": math.nan, "converged": False},
        {"log_px": 600.0, "data_space": "continuous"},  # a density's log can be positive
        {"log_px": 0.01},  # near-deterministic data: 10 nats over 1000 examples, probability up to e^-10
        {"log_px": None, "log_px_se": None},  # not evaluated: shown n/a, not refused
    ],
)
def test_numbers_a_correct_evaluation_can_write_are_accepted(change):
    assert compare.impossible({**EVAL, **change}, strict=True) is None


def test_mlflow_text_that_reads_as_a_number_is_not_refused():
    # tags and params come back from MLflow as text (num_samples: the K tag)
    assert compare.impossible({**EVAL, "num_samples": "1000"}) is None
    assert (
        compare.impossible({**EVAL, "num_samples": "1000"}, strict=True)
        == "num_samples = '1000' is not a number"
    )


def test_a_boolean_is_not_a_number_in_a_file_or_in_mlflow_text():
    # float(True) is 1.0: a JSON true where a count or an estimate belongs is damage, not one example
    for strict in (True, False):
        assert compare.impossible({**EVAL, "num_examples": True}, strict=strict) == (
            "num_examples = True is not a number"
        )
        assert (
            compare.impossible({**EVAL, "log_px": False}, strict=strict) == "log_px = False is not a number"
        )


def test_runs_with_impossible_numbers_are_left_out_of_the_comparison_with_the_reason():
    rows = [
        run("ok", "binary", -95.0),
        run("neg-se", "binary", -90.0, log_px_se=-0.2, latent_dim=5),
        run("positive", "binary", 12.0, latent_dim=10, num_examples=1000),  # a pmf's log p(x), far above 0
        run("wild", "binary", 1778.47, latent_dim=50, converged=0.0),  # test set size not recorded: N >= 1
        run("text", "binary", -85.0, num_samples="many", latent_dim=20),
        run("gauss", "continuous", 600.0, likelihood="gaussian"),  # a density: positive is fine
    ]
    blocks = report_comparison.comparison_section(rows)
    ranked = [t.rows for t in _tables(blocks, "ranking")]
    assert [[r[1] for r in t] for t in ranked] == [["ok"], ["gauss"]]
    assert _excluded(blocks) == {
        "neg-se": "impossible value: log_px_se = -0.2 is negative: a standard error never is",
        "positive": (
            "impossible value: log_px = 12.0 nats/example on binary pixels under a Bernoulli: p(x) <= 1, and "
            "an estimate this far above 0 over 1000 example(s) has probability below exp(-50)"
        ),
        "wild": (
            "impossible value: log_px = 1778.47 nats/example on binary pixels under a Bernoulli: p(x) <= 1, "
            "and an estimate this far above 0 over 1 example(s) has probability below exp(-50)"
        ),
        "text": "impossible value: num_samples = 'many' is not a number",
    }


def _damage(out: Path, **values) -> bytes:
    path = out / "metrics" / "eval.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
    return path.read_bytes()


def test_the_report_refuses_a_damaged_eval_json_and_changes_nothing(tmp_path):
    out = make_out_dir(tmp_path / "run")
    first = write_report(out, CONFIG, runs=[])
    before = {p: p.read_bytes() for p in (first["html"], first["md"])}
    damaged = _damage(out, log_px_se=-0.1234)
    with pytest.raises(ResultFileError) as err:
        write_report(out, CONFIG, runs=[])
    assert str(err.value) == (
        f"{out / 'metrics' / 'eval.json'}: log_px_se = -0.1234 is negative: a standard error never is; "
        "run `vaerepro evaluate` again to rewrite it"
    )
    assert (out / "metrics" / "eval.json").read_bytes() == damaged
    assert {p: p.read_bytes() for p in before} == before


def test_the_report_refuses_an_eval_json_without_log_px(tmp_path):
    """`{}` (a file emptied by hand) was a report of n/a's on '? data'."""
    out = make_out_dir(tmp_path / "run")
    (out / "metrics" / "eval.json").write_text("{}")
    with pytest.raises(ResultFileError) as err:
        write_report(out, CONFIG, runs=[])
    assert str(err.value) == (
        f"{out / 'metrics' / 'eval.json'}: no log_px, which every evaluation writes; run `vaerepro evaluate` "
        "again to rewrite it"
    )
    assert not (out / "reports").exists()


@pytest.mark.slow
def test_vaerepro_report_exits_2_with_one_line_naming_the_file_and_key(tmp_path):
    out = make_out_dir(tmp_path / "run")
    _damage(out, log_px=3.5)  # a binary pmf: log p(x) 3.5 nats/example over 1000 examples
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # the project root the command looks for
    raw = compose(["tracking.enabled=false"], config_dir=find_project_root(Path(__file__).parent) / "conf")
    (tmp_path / "params.yaml").write_text(dump(raw))
    # a process of its own: the command sets up logging and signal handlers
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("vaerepro")), "report", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"vaerepro report: {out / 'metrics' / 'eval.json'}: log_px = 3.5 nats/example on binary pixels under "
        "a Bernoulli: p(x) <= 1, and an estimate this far above 0 over 1000 example(s) has probability below "
        "exp(-50); run `vaerepro evaluate` again to rewrite it"
    ]
    assert not (out / "reports").exists()
