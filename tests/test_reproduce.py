"""`vaerepro reproduce NAME`: the aggregate across seeds (mean and 95 % Student-t interval), the judgement
of constructed results, the reproduction card's content, and bad input (exit 2, one line). Every preset's
--smoke end to end: tests/test_reproduce_smoke_*.py (through tests/smoke_reproduction.py)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest

from conftest import ROOT, compose
from vaerepro.reproductions import card, reproduce
from vaerepro.reproductions import judge as R
from vaerepro.reproductions import presets as P
from vaerepro.reproductions.results import Result, SeedResult

IWAE = P.PRESETS["iwae-mnist-iwae-k50-l1"]  # published -84.78 nats (Table 1), tolerance 1 nat


# --- the aggregate across seeds ----------------------------------------------------------------------
def test_t_quantiles_are_the_tables():
    # Student's t, 0.975 quantile (two-sided 95 %), from any printed table
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 29: 2.045}
    for df, t in table.items():
        assert R.t_quantile(0.975, df) == pytest.approx(t, abs=5e-4), df
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in range(1, 40):
        assert R.t_quantile(0.975, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-9)
    for bad in ((0.975, 0), (0.975, 1.5), (0.4, 3), (1.0, 3)):
        with pytest.raises(ValueError):
            R.t_quantile(*bad)


def test_aggregate_is_mean_and_t_interval_by_hand():
    # three seeds -85, -84, -86: mean -85, sd 1 (n - 1), half-width t(0.975, 2) * 1 / sqrt 3 = 2.4842
    a = R.aggregate([-85.0, -84.0, -86.0], [0.2, 0.3, 0.4])
    assert (a.n, a.mean, a.sd) == (3, -85.0, pytest.approx(1.0))
    assert a.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert a.half_width == pytest.approx(2.48414, abs=1e-5)
    assert a.se_examples == pytest.approx(0.3)  # one test set: the seeds' SEs averaged
    assert a.interval == pytest.approx(math.hypot(2.48414, 0.6), abs=1e-5)  # and 2 SE in quadrature
    # five seeds 1..5: mean 3, sd sqrt(2.5), half-width 2.776445 * 1.581139 / sqrt 5 = 1.96324
    b = R.aggregate([1, 2, 3, 4, 5])
    assert (b.mean, b.sd) == (3.0, pytest.approx(math.sqrt(2.5)))
    assert b.half_width == pytest.approx(1.96324, abs=1e-5) and b.se_examples is None
    assert b.interval == pytest.approx(b.half_width)
    one = R.aggregate([-85.5], [0.25])  # one seed: no interval
    assert (one.n, one.mean, one.sd, one.half_width, one.interval) == (1, -85.5, None, None, None)
    none = R.aggregate([None, math.nan])  # nothing finite
    assert (none.n, none.mean) == (0, None)
    assert R.aggregate([1.0, None, 3.0]).n == 2


def test_verdict_with_the_interval_across_seeds():
    pub = IWAE.published[0]
    v = R.verdict(pub, -85.0, 0.3, interval=2.5556)
    assert v.kind == "reproduced" and v.uncertainty == pytest.approx(3.5556)
    assert v.reasons == ("|difference| 0.22 <= tolerance 1 + 95 % half-width 2.56",)
    assert R.verdict(pub, -88.4, 0.3, interval=2.5556).kind == "not reproduced"
    assert R.verdict(pub, -85.0, 0.3).uncertainty == pytest.approx(1.6)  # no interval: 2 SE
    with pytest.raises(ValueError, match="interval"):
        R.verdict(pub, -85.0, interval=-1.0)
    kinds = [R.Verdict(k, (), None, None) for k in ("reproduced", "not reproduced", "not comparable")]
    assert R.overall(kinds[:1]) == "reproduced" and R.overall(kinds[:2]) == "not reproduced"
    assert R.overall(kinds) == "not comparable" and R.overall([]) == "not comparable"


# --- judging constructed results ---------------------------------------------------------------------
def _records(log_px: float, se: float, converged: bool = True) -> dict:
    ev = {"log_px": log_px, "log_px_se": se, "elbo": log_px - 5, "elbo_se": se, "num_samples": 5000}
    ev |= {"converged": converged, "convergence": {"reasons": [] if converged else ["ESS too low"]}}
    return {"eval.json": ev, "train.json": {"train_elbo": log_px - 4, "epochs": 3280}}


def test_judge_follows_the_protocol_or_says_why_not():
    followed = dataclasses.replace(IWAE, missing=())  # as if the schema had every setting
    protocol = compose(*IWAE.overrides)
    runs = [(s, _records(v, se)) for s, v, se in ((0, -85.0, 0.2), (1, -84.0, 0.3), (2, -86.0, 0.4))]
    devs, (m,) = R.judge(followed, protocol, runs, protocol=protocol)
    assert devs == [] and m.verdict.kind == "reproduced" and m.values[1] == (1, -84.0, 0.3)
    assert m.aggregate.interval == pytest.approx(math.hypot(2.48414, 0.6), abs=1e-5)
    # one seed; a setting changed from the protocol's default
    run = compose(*IWAE.overrides, "train.early_stopping=true")
    devs, (m,) = R.judge(followed, run, [(0, _records(-85.0, 0.2, converged=False))], protocol=protocol)
    assert devs == [
        "other setting: train.early_stopping=True, the protocol's False",
        "fewer seeds: 1 run(s), a verdict needs 3 (the paper does not say how many)",
    ]
    assert m.verdict.kind == "not comparable" and m.aggregate.half_width is None
    # where each number comes from: the presets name a key of eval.json or train.json
    aevb = {p.metric: (p.measured, p.measured_se) for p in P.PRESETS["aevb-frey-z2"].published}
    assert aevb == {
        "test ELBO": ("eval.json:elbo", "eval.json:elbo_se"),
        "train ELBO": ("train.json:train_elbo", ""),
    }
    assert R.measured_value(P.PRESETS["aevb-frey-z2"].published[1], runs[0][1]) == (-89.0, None)


def test_an_unconverged_estimate_at_the_papers_k_is_compared_with_a_note(tmp_path):
    """IWAE's Table 1 prints L_5000, the importance-sampled bound at K = 5000, as its log-likelihood: a seed
    whose L_5000 still rises with K (not converged) measured the paper's quantity, so it is judged, and the
    card and the printed summary note that it is a bound. Were the note a reason, a loosely fitting model's
    row could never be reproduced."""
    followed = dataclasses.replace(IWAE, missing=())
    protocol = compose(*IWAE.overrides)
    runs = [
        (s, _records(v, se, converged=s != 1))
        for s, v, se in ((0, -85.0, 0.2), (1, -84.0, 0.3), (2, -86.0, 0.4))
    ]
    runs_k5000 = copy.deepcopy(runs)
    devs, (m,) = R.judge(followed, protocol, runs, protocol=protocol)
    assert devs == [] and m.verdict.kind == "reproduced", m.verdict
    note = (
        f"{R.NOT_CONVERGED}: the log p(x) of seed 1, K = 5000 (ESS too low): L_K, a lower bound on "
        "log p(x) in expectation, as the paper's number is at the preset's K"
    )
    assert m.notes == (note,) and not [r for r in m.verdict.reasons if R.NOT_CONVERGED in r]
    # the same seeds at another K: not comparable for the K, and the note stays
    run = compose(*IWAE.overrides, "eval.num_samples=1000")
    for _, records in runs:
        records["eval.json"]["num_samples"] = 1000
    devs, (m,) = R.judge(followed, run, runs, protocol=protocol)
    assert devs == [f"{R.DIFFERENT_K}: eval.num_samples=1000, the paper's 5000"]
    assert m.verdict.kind == "not comparable" and m.notes == (note.replace("5000", "1000"),)
    # on the card under the verdict, and in what `vaerepro reproduce` prints
    result = _result(tmp_path, followed, [-85.0, -84.0, -86.0], seeds=3)
    result.measurements[:] = R.judge(followed, protocol, runs_k5000, protocol=protocol)[1]
    assert result.verdict == "reproduced"
    md = card.write_card(result)["md"].read_text()
    assert f"Note: {note}." in md.split("## Published and measured")[0]
    assert f"  note: {note}\n" in card.summary(result, {"md": "card.md"})


def test_a_number_in_another_data_space_than_the_papers_gets_no_difference():
    """IWAE's log p(x) is a pmf on binary pixels: seeds run as a density on [0,1] (or a Bernoulli on grey
    levels) measured another unit, so measured - published is not shown, and the verdict says why."""
    followed = dataclasses.replace(IWAE, missing=())
    protocol = compose(*IWAE.overrides)
    runs = [(s, _records(-85.0, 0.2)) for s in range(3)]
    for r in runs:
        r[1]["eval.json"] |= {"data_space": "binary", "improper": False}
    (m,) = R.judge(followed, protocol, runs, protocol=protocol)[1]
    assert m.verdict.kind == "reproduced" and m.verdict.difference == pytest.approx(
        -85.0 - IWAE.published[0].value
    )
    runs[2][1]["eval.json"] |= {"data_space": "continuous", "improper": True}
    (m,) = R.judge(followed, protocol, runs, protocol=protocol)[1]
    assert m.verdict.kind == "not comparable" and m.verdict.difference is None
    assert m.verdict.reasons == (
        f"{R.OTHER_UNITS}: seed 2 measured on continuous pixels (a Bernoulli on grey levels, not a density), "
        "the paper on binary pixels; their difference is not shown",
    )
    assert card._published_row(m)[3] == "n/a"  # the card


# --- the card ----------------------------------------------------------------------------------------
ENV = {"git commit": "0123abc", "data digest": "sha256 of prepared/x_train.npy: feedbeef", "python": "3.11.7"}
ENV |= {"torch": "2.13.0", "lightning": "2.6.6", "training device": "CPU (x86_64, 2 cores) x 1 device(s)"}


def _result(tmp_path, preset, values, **plan_kw):
    p = reproduce.plan(preset, root=ROOT, out=tmp_path, **plan_kw)
    train = {"epochs": 3280, "train_time_s": 12.5}
    if p.config["train"]["lr_candidates"]:  # train.json's record of the step-size pilots (stepsize.py)
        pilots = {
            "candidates": [0.01, 0.02, 0.1],
            "pilot_steps": 100,
            "pilot_bounds": [-250.5, -241.3, -1e15],
        }
        train["lr_selection"] = pilots | {"chosen": 0.02}
    seeds = [
        SeedResult(
            s,
            tmp_path / f"seed_{s}",
            _records(v, 0.3)["eval.json"],
            {"train_elbo": v - 4, **train},
            meta={"sizes": {"train": 1375, "val": 196, "test": 394}},
            curve=[{"epoch": e, "train_elbo": v - 9 + e, "val_elbo": v - 8 + e} for e in range(3)],
            wall_s=20.0,
        )  # fmt: skip
        for s, v in enumerate(values)
    ]
    devs, ms = R.judge(preset, p.config, [(s.seed, s.records) for s in seeds], protocol=p.protocol)
    return Result(p, seeds, devs, ms, ENV, 61.0, ("sqlite:///x.db", "parent123"))


def test_card_shows_published_measured_difference_verdict_and_environment(tmp_path):
    result = _result(tmp_path, dataclasses.replace(IWAE, missing=()), [-85.0, -84.0, -86.0], seeds=3)
    assert result.verdict == "reproduced"
    paths = card.write_card(result)
    assert paths["md"] == tmp_path / "reports" / "reproductions" / "iwae-mnist-iwae-k50-l1.md"
    md, html = paths["md"].read_text(), paths["html"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| test log p(x) | -84.78"))
    # published (as printed), measured mean ± 95 % t across 3 seeds, difference ± half-width, the band
    assert "-84.78 (printed: 84.78)" in row and "-85.00 ± 2.48 (95 % t, 3 seeds)" in row
    assert "-0.22 ± 2.56" in row and "| 3.56 |" in row and "eval.json:log_px" in row
    why = "\\|difference\\| 0.22 <= tolerance 1 + 95 % half-width 2.56"  # | escaped in a Markdown table
    assert f"| test log p(x) | reproduced | {why} |" in md
    assert "Departures from the protocol" not in md
    for key, value in ENV.items():
        assert f"| {key} | {value} |" in md
    assert "| MLflow | run parent123 in sqlite:///x.db" in md
    assert "Table 1, MNIST, IWAE, 1 stochastic layer, k = 50, NLL" in md and P.IWAE in md
    assert "| train.lr | 0.001 | 0.001 |" in md  # the protocol's settings beside the run's
    assert "| 1 | -84.00 ± 0.30 | 5000 | 3280 | true | 20.0 | 12.5 |" in md  # each seed
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in md and "vaerepro fetch" in md
    assert "61.0 s in all" in md and "h a seed on 2 CPU cores" in md
    assert "![training and validation bound" in md and paths["figures"][0].is_file()
    assert "bound against training samples" not in md  # Table 1 is no curve: no such figure
    assert "data:image/png;base64," in html and "-85.00 ± 2.48 (95 % t, 3 seeds)" in html


def test_the_cards_unit_says_what_a_number_in_nats_is_of(tmp_path):
    """The card's unit column read "nats per example" for IWAE's pmf on binary pixels, Frey Face's density
    and AEVB's MNIST bounds alike, though the last are of a Bernoulli on grey levels, no density (an improper
    run, which every report and MLflow name marks): it now says which."""
    units = {
        (name, pub.metric): card._unit_text(pub)
        for name in ("iwae-mnist-iwae-k50-l1", "aevb-mnist-z3", "aevb-frey-z2", "cb-mnist-cb")
        for pub in P.PRESETS[name].published
    }
    assert units[("iwae-mnist-iwae-k50-l1", "test log p(x)")] == (
        "nats per example, of a Bernoulli pmf on binary pixels"
    )
    improper = "nats per example, IMPROPER: a Bernoulli on grey levels (continuous pixels), not a density"
    assert units[("aevb-mnist-z3", "test ELBO")] == units[("aevb-mnist-z3", "train ELBO")] == improper
    assert units[("aevb-frey-z2", "test ELBO")] == "nats per example, of a density on pixels in [0,1]"
    assert units[("cb-mnist-cb", "kNN accuracy")] == "fraction of test images"
    result = _result(tmp_path, dataclasses.replace(IWAE, missing=()), [-85.0, -84.0, -86.0], seeds=3)
    md = card.write_card(result)["md"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| test log p(x) | -84.78"))
    assert "| nats per example, of a Bernoulli pmf on binary pixels | eval.json:log_px |" in row
    # what `vaerepro reproduce` prints at the end says it too: it read "measured -85.00 ..., published -84.78"
    printed = card.summary(result, {"md": "card.md"})
    assert "published -84.78 (nats per example, of a Bernoulli pmf on binary pixels): reproduced" in printed


def test_the_cards_training_time_of_a_resumed_seed_says_it_is_its_last_runs(tmp_path):
    """A seed stopped and resumed (`--resume`) timed only the epochs after its checkpoint in train.json: the
    card's "training (s)" read as the seed's whole training beside its summed wall time."""
    result = _result(tmp_path, dataclasses.replace(IWAE, missing=()), [-85.0, -84.0, -86.0], seeds=3)
    result.seeds[1].train["resumed_after_epochs"] = 3000
    md = card.write_card(result)["md"].read_text()
    assert "| 0 | -85.00 ± 0.30 | 5000 | 3280 | true | 20.0 | 12.5 |" in md
    assert (
        "| 1 | -84.00 ± 0.30 | 5000 | 3280 | true | 20.0 | 12.5 (resumed after 3000 epochs: its last run's "
        "only) |" in md
    )


def test_card_of_one_seed_off_protocol_says_why_not(tmp_path):
    preset = P.PRESETS["aevb-frey-z2"]
    result = _result(tmp_path, preset, [900.0], smoke=True)
    assert result.verdict == "not comparable" and len(result.plan.seeds) == 1
    md = card.write_card(result)["md"].read_text()
    assert result.plan.card_dir == tmp_path / "reports" / "reproductions" / "smoke"  # never a real card
    assert "WARNING:** a smoke run" in md and "--seeds 1 --smoke" in md
    assert "| test ELBO | 872.40 (none: a figure, read off" in md
    assert "| 896.00 (1 seed: no interval) | -38.60 | 3.00 (no SE recorded) |" in md  # train.json: 934.60
    assert (
        "| 895.00 (1 seed: no interval; SE across examples 0.30) | +22.60 ± 0.60 | 3.60 |" in md
    )  # ELBO 900 - 5
    epochs = preset.settings["train.max_epochs"]
    for reason in (
        "| other data | data='mnist5k', the paper's 'frey_faces' |",
        f"| shortened schedule | train.max_epochs=2, the paper's {epochs} |",
        "| other data | data.max_examples=500, the protocol's None |",
        "| fewer seeds | 1 run(s), a verdict needs 3",
    ):
        assert reason in md, reason
    assert "This run's data: mnist5k" in md and "https://cs.nyu.edu/~roweis/data/" in md
    # AEVB's step-size selection is run, its reading of "the first few iterations" stated: no departure
    assert f"| {R.NOT_IMPLEMENTED} |" not in md and "| step-size selection | " in md
    assert "seed 0: 0.02 (0.01: -250.5, 0.02: -241.3, 0.1: -1e+15)." in md  # the pilots' choice
    # Figure 2's axis: training samples seen at each epoch's end, (epoch + 1) x 1,375 training images
    assert card.samples_seen(result.seeds[0]) == [1375, 2750, 4125]
    assert "![bound against training samples seen" in md and "As Figure 2:" in md
    assert (result.plan.card_dir / "aevb-frey-z2_figures" / "bound_against_samples.png").is_file()


@pytest.mark.parametrize("name", sorted(P.PRESETS))
@pytest.mark.slow
def test_every_presets_smoke_plan_validates_and_is_not_comparable(name, tmp_path):
    """Every preset (each also runs end to end: test_reproduce_smoke_*.py): its --smoke configuration
    composes and validates, and departs from the protocol by other data and a shortened schedule, with one
    seed, while the protocol it is judged against keeps the preset's own data."""
    preset = P.PRESETS[name]
    plan = reproduce.plan(preset, smoke=True, root=ROOT, out=tmp_path)
    assert (
        plan.seeds == (0,)
        and plan.config["data"]["source"] == "mnist5k"
        and plan.config["train"]["max_epochs"] == 2
    )
    found = R.deviations(preset, plan.config, seeds=1, protocol=plan.protocol)
    for reason in (R.OTHER_DATA, R.SHORTENED, R.FEWER_SEEDS):
        assert any(d.startswith(f"{reason}: ") for d in found), (reason, found)
    assert plan.protocol["data"]["source"] == preset.settings["data"]


@pytest.mark.slow
def test_a_gpu_reproduction_as_the_readme_gives_it_follows_the_protocol(tmp_path):
    """README's GPU command (trainer=gpu with float32 matmuls): the device, and the step as one CUDA graph
    (trainer.cuda_graph=auto, the same numbers up to float rounding) are no departure; TF32 matmuls, which
    trainer=gpu sets unless told otherwise, are one, and so is mixed precision."""
    preset = P.PRESETS["aevb-mnist-z20"]

    def departures(*user: str) -> list[str]:
        plan = reproduce.plan(preset, user, seeds=3, root=ROOT, out=tmp_path)
        return R.deviations(preset, plan.config, seeds=3, protocol=plan.protocol)

    assert departures("trainer=gpu", "trainer.matmul_precision=highest") == []
    assert departures("trainer=gpu", "trainer.matmul_precision=highest", "trainer.cuda_graph=false") == []
    assert departures("trainer=gpu", "trainer.matmul_precision=highest", "trainer.steps_per_call=10") == []
    assert departures("trainer=gpu") == [
        f"{R.OTHER_SETTING}: trainer.matmul_precision='high', the protocol's 'highest'"
    ]
    found = departures("trainer=gpu", "trainer.matmul_precision=highest", "trainer.precision=bf16-mixed")
    assert found == [f"{R.OTHER_SETTING}: trainer.precision='bf16-mixed', the protocol's '32-true'"]


def test_a_cpu_ddp_reproduction_as_scaling_out_gives_it_follows_the_protocol(tmp_path):
    """README's DDP on CPU processes (trainer=ddp trainer.accelerator=cpu, the global batch kept): trainer=ddp
    sets trainer.matmul_precision=high, which switches CUDA's TF32 matmuls and nothing on the CPU (the resume
    check compares it on CUDA only), so it is no departure there; on GPUs it still is."""
    preset = P.PRESETS["iwae-mnist-vae-k1-l1"]

    def departures(*user: str) -> list[str]:
        plan = reproduce.plan(preset, user, seeds=3, root=ROOT, out=tmp_path)
        return R.deviations(preset, plan.config, seeds=3, protocol=plan.protocol)

    assert (
        departures("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "train.batch_size=10") == []
    )
    assert departures("trainer=ddp", "trainer.devices=2", "train.batch_size=10") == [
        f"{R.OTHER_SETTING}: trainer.matmul_precision='high', the protocol's 'highest'"
    ]


# --- bad input: exit 2, one line naming it -----------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["no-such-preset"], "no-such-preset"),
        (["aevb-mnist-z20", "train.nope=1"], "train.nope"),
        (["aevb-mnist-z20", "model.latent_dim=0"], "model.latent_dim"),
        (["aevb-mnist-z20", "hydra.run.dir=/tmp/x"], "hydra.run.dir"),
        (["aevb-mnist-z20", "seed=3"], "--seeds"),
        (["aevb-mnist-z20", "--seeds", "0"], "--seeds"),
        (["aevb-mnist-z20", "--bogus"], "--bogus"),
        ([], "--list"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, named):
    assert P.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaerepro reproduce: ") and err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "runs").exists()  # refused before anything ran


def test_why_a_paper_gives_no_number_is_said_once_on_the_card(tmp_path):
    """The continuous Bernoulli preset's two values share one paragraph on why neither was found: the card
    printed it four times, in each row of the verdict table and under each value. It is now under
    "Published and measured" once, naming both values, and each verdict row points there."""
    preset = P.PRESETS["cb-mnist-cb"]
    (why,) = {pub.why_none for pub in preset.published}
    assert len(preset.published) == 2 and len(why) > 100
    md = card.write_card(_result(tmp_path, preset, [1400.0, 1410.0, 1420.0], seeds=3))["md"]
    text = md.read_text()
    assert text.count(why) == 1
    (pub_elbo, pub_knn) = preset.published
    assert f"{pub_elbo.metric} ({pub_elbo.where}) and {pub_knn.metric} ({pub_knn.where}): " in text
    for pub in preset.published:
        row = next(
            line for line in text.splitlines() if line.startswith(f"| {pub.metric} | not comparable |")
        )
        assert f"| {R.NO_NUMBER} (why: under Published and measured); " in row, row


def test_the_card_environment_is_what_the_seeds_records_say_they_ran_on_and_with(tmp_path):
    """A reproduction's environment takes each seed's commit, devices and versions from its train.json and
    eval.json (a seed resumed elsewhere or from other code: both values, joined), not from the machine and
    the checkout that write the card; for records from before they held them, this process's versions and
    machine, and the checkout's commit."""
    from conftest import tiny_config
    from vaerepro.versions import versions

    cfg = tiny_config()
    h200, cpu = "cuda:0 (NVIDIA H200)", "cpu (x86_64, 2 cores)"
    old = {"python": "3.11.7", "vaerepro": "0.1.0", "torch": "2.12.1+cu126"}
    new = {**old, "torch": "2.13.0+cpu"}
    trained_at, evaluated_at = "a" * 40 + "-dirty", "b" * 40
    seeds = [
        SeedResult(
            0,
            tmp_path,
            {"device": cpu, "versions": new, "commit": evaluated_at},
            {"device": h200, "versions": old, "commit": trained_at},
        ),
        SeedResult(
            1,
            tmp_path,
            {"device": cpu, "versions": new, "commit": evaluated_at},
            {"device": cpu, "versions": new, "commit": evaluated_at},
        ),
    ]
    env = reproduce.environment(tmp_path, cfg, seeds)
    assert env["git commit"] == f"{trained_at} / {evaluated_at}"
    assert env["training device"] == f"{h200} / {cpu}"
    assert env["evaluation device"] == cpu
    assert (env["python"], env["torch"]) == ("3.11.7", "2.12.1+cu126 / 2.13.0+cpu")
    assert "numpy" not in env  # no record names it
    before = reproduce.environment(tmp_path, cfg, [SeedResult(0, tmp_path, {}, {})])
    assert before["git commit"] == "unknown (not a git checkout)"  # tmp_path is none
    assert {k: before[k] for k in versions()} == versions()
    assert before["training device"].endswith(" x 1 device(s) x 1 node(s)")
