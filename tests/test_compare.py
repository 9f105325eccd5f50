"""compare: grouping by (data space, improper) and refusing to rank across groups."""

import math

import pytest

from vaerepro.compare import (
    IncomparableError,
    check_comparable,
    comparability_key,
    converged,
    group_comparable,
    measurement,
    rank,
    space_label,
)


def row(name, space="binary", improper=False, log_px=-90.0, **kw):
    return {
        "run_id": f"id-{name}",
        "run_name": name,
        "likelihood": kw.pop("likelihood", "bernoulli"),
        "data_space": space,
        "improper": improper,
        "latent_dim": kw.pop("latent_dim", 2),
        "log_px": log_px,
        **kw,
    }


def test_group_comparable_mixed_rows_keeps_order():
    rows = [
        row("b1"),
        row("c1", "continuous", likelihood="gaussian"),
        row("b2"),
        row("i1", "continuous", improper=True),
        row("c2", "continuous", likelihood="continuous_bernoulli"),
    ]
    groups = group_comparable(rows)
    assert list(groups) == [("binary", False), ("continuous", False), ("continuous", True)]
    assert [r["run_name"] for r in groups[("binary", False)]] == ["b1", "b2"]
    assert [r["run_name"] for r in groups[("continuous", False)]] == ["c1", "c2"]
    assert [r["run_name"] for r in groups[("continuous", True)]] == ["i1"]


def test_improper_strings_from_mlflow_params_are_parsed():
    # MLflow params are strings: bool("False") would be True.
    assert comparability_key(row("a", improper="False")) == ("binary", False)
    assert comparability_key(row("a", improper="true")) == ("binary", True)
    with pytest.raises(IncomparableError, match="maybe"):
        comparability_key(row("a", improper="maybe"))


def test_every_spelling_of_improper_that_is_read_is_read_right():
    # what _as_bool accepts, each way round; numbers (an MLflow metric 0.0 / 1.0) as their truth value
    for text, flag in [("true", True), ("1", True), ("yes", True), (" TRUE ", True)]:
        assert comparability_key(row("a", improper=text)) == ("binary", flag), text
    for text in ("false", "0", "no", "", " False "):
        assert comparability_key(row("a", improper=text)) == ("binary", False), text
    assert comparability_key(row("a", improper=1.0)) == ("binary", True)
    assert comparability_key(row("a", improper=0.0)) == ("binary", False)


def test_rank_sorts_within_one_group():
    rows = [row("a", log_px=-95.0), row("b", log_px=-88.5), row("c", log_px=-91.0)]
    assert [r["run_name"] for r in rank(rows, "log_px")] == ["b", "c", "a"]
    assert [r["run_name"] for r in rank(rows, "log_px", higher_is_better=False)] == ["a", "c", "b"]
    assert check_comparable(rows) == ("binary", False)


def test_rank_ties_keep_input_order():
    rows = [row("a", log_px=-90.0), row("b", log_px=-90.0), row("c", log_px=-80.0)]
    assert [r["run_name"] for r in rank(rows, "log_px")] == ["c", "a", "b"]


def test_mixed_spaces_refused_naming_both():
    rows = [row("bin-run"), row("cont-run", "continuous", likelihood="gaussian", log_px=700.0)]
    for call in (lambda: rank(rows, "log_px"), lambda: check_comparable(rows, "the sweep")):
        with pytest.raises(IncomparableError) as e:
            call()
        msg = str(e.value)
        assert "binary" in msg and "continuous" in msg
        assert "bin-run" in msg and "cont-run" in msg
        assert "different units" in msg
    with pytest.raises(IncomparableError, match=r"^the sweep cannot share one scale"):
        check_comparable(rows, "the sweep")


def test_improper_and_proper_in_one_space_refused():
    rows = [
        row("cb", "continuous", likelihood="continuous_bernoulli", log_px=900.0),
        row("bern-grey", "continuous", improper=True, log_px=-60.0),
    ]
    with pytest.raises(IncomparableError) as e:
        rank(rows, "log_px")
    assert "improper=True" in str(e.value) and "improper=False" in str(e.value)
    assert "bern-grey" in str(e.value)
    # improper runs alone are one group, and can be ordered among themselves
    assert check_comparable(rows[1:]) == ("continuous", True)


def test_rows_without_finite_metric_not_ranked():
    rows = [
        row("ok", log_px=-90.0),
        row("nan", log_px=math.nan),
        row("none", log_px=None),
        row("inf", log_px=math.inf),
        {k: v for k, v in row("missing").items() if k != "log_px"},
        row("best", log_px=-85.0),
    ]
    assert [r["run_name"] for r in rank(rows, "log_px")] == ["best", "ok"]
    assert rank([], "log_px") == []


def test_missing_data_space_names_the_run():
    bad = row("lost-run")
    del bad["data_space"]
    with pytest.raises(IncomparableError, match="lost-run.*data_space"):
        comparability_key(bad)
    with pytest.raises(IncomparableError, match="lost-run"):
        rank([row("fine"), bad], "log_px")
    no_flag = row("flagless")
    del no_flag["improper"]
    with pytest.raises(IncomparableError, match="flagless.*improper"):
        group_comparable([no_flag])


def test_space_labels():
    assert space_label("binary", False) == "binary pixels — Bernoulli pmf (nats/example)"
    assert space_label("continuous", False) == "continuous pixels in [0,1] — density (nats/example)"
    improper = space_label("continuous", True)
    assert improper.startswith("continuous pixels in [0,1] — IMPROPER")
    assert "not comparable" in improper
    assert len({space_label("binary", False), space_label("continuous", False), improper}) == 3


def test_rank_refuses_runs_on_different_data_sets():
    rows = [
        {"run_name": "a", "data_space": "continuous", "improper": False, "source": "mnist", "log_px": 1.0},
        {"run_name": "b", "data_space": "continuous", "improper": False, "source": "frey", "log_px": 2.0},
    ]
    with pytest.raises(IncomparableError, match="different data sets"):
        rank(rows, "log_px")
    assert [r["run_name"] for r in rank(rows[:1], "log_px")] == ["a"]


@pytest.mark.parametrize(
    ("other", "named"),
    [
        ({"num_samples": "100"}, "K = 100"),  # an MLflow param or tag: text
        ({"test_set": "0123456789ab"}, "test set 0123456789ab"),  # another split or file of one source
        ({"num_samples": None}, "K = unrecorded"),
    ],
)
def test_rank_refuses_estimates_with_another_k_or_of_another_test_set(other, named):
    """One source and unit, but not one measurement: a K = 100 estimate is lower in expectation than a
    K = 5000 one of the same model, and another test split is other images."""
    base = {"data_space": "binary", "improper": False, "source": "mnist", "test_set": "fedcba987654"}
    rows = [
        {"run_name": "a", **base, "num_samples": 5000, "log_px": -85.0},
        {"run_name": "b", **base, "num_samples": 5000, "log_px": -86.0, **other},
    ]
    with pytest.raises(IncomparableError, match="different numbers of importance samples") as e:
        rank(rows, "log_px")
    assert named in str(e.value) and "K = 5000" in str(e.value)
    same = [dict(rows[0]), {**rows[1], **{k: rows[0][k] for k in other}}]
    assert [r["run_name"] for r in rank(same, "log_px")] == ["a", "b"]
    assert measurement(rows[0]) == ("mnist", "fedcba987654", "5000")


def test_converged_reads_every_form_of_the_verdict():
    # eval.json bools, MLflow metrics (1.0 / 0.0), MLflow tags ("true" / "false"); None when absent or unclear
    forms = [(True, True), (False, False), (1.0, True), (0.0, False), ("true", True), ("False", False)]
    forms += [(None, None), (math.nan, None), ("maybe", None)]
    for value, verdict in forms:
        assert converged(row("a", converged=value)) is verdict, value
    assert converged(row("a")) is None


def test_an_unconverged_estimate_never_ranks_above_the_others():
    rows = [
        row("wild", log_px=1778.47, converged=0.0),  # the best number, not converged
        row("ok", log_px=-95.0, converged=1.0),
        row("also-wild", log_px=-80.0, converged=False),
        row("unchecked", log_px=-90.0),
        row("best", log_px=-88.0, converged=True),
    ]
    assert [r["run_name"] for r in rank(rows, "log_px")] == ["best", "unchecked", "ok", "wild", "also-wild"]
    # bits/dim comes from the same estimate: lower is better, unconverged still last
    for r, bpd in zip(rows, [0.05, 0.30, 0.10, 0.20, 0.25], strict=True):
        r["bits_per_dim"] = bpd
    ranked = rank(rows, "bits_per_dim", higher_is_better=False)
    assert [r["run_name"] for r in ranked] == ["unchecked", "best", "ok", "wild", "also-wild"]
    # the ELBO does not come from the importance-sampled estimate: ranked by value alone
    for r in rows:
        r["elbo"] = r["log_px"] - 5
    assert [r["run_name"] for r in rank(rows, "elbo")][0] == "wild"
