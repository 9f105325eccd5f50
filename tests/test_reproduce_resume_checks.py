"""`vaerepro reproduce NAME --resume` over constructed reproductions whose seeds all ran before: no seed's
process starts, so what reproduce does with what is on disk is checked in seconds. A damaged result file
is one line naming it; a seed that ran with another configuration (conf/ changed between the invocations)
is refused, nothing touched; and the MLflow parent run names its numbers under the space the seeds
measured in, never the paper's when the run changed it."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess

import pytest
import yaml

from conftest import ROOT
from vaerepro.reproductions import presets as P
from vaerepro.reproductions import reproduce, resumption

IWAE = "iwae-mnist-iwae-k50-l1"  # test log p(x), binary space, published -84.78


def _eval(log_px: float) -> dict:
    return {"log_px": log_px, "log_px_se": 0.1, "elbo": log_px - 5, "elbo_se": 0.1, "num_samples": 5000}


def stopped(out, name, user, seeds=3, *, ran_with=None, eval_json=None):
    """A reproduction of `name` stopped after every seed finished (markers, metrics/eval.json, Hydra's
    .hydra/config.yaml as the seed's process writes it: the plan's config, or `ran_with(config)`);
    `eval_json(seed)`: the text of a seed's eval.json, where given. Returns the plan."""
    p = reproduce.plan(P.PRESETS[name], user, seeds=seeds, root=ROOT, out=out)
    ledger = resumption.Ledger.fresh(p.run_dir, p.asked)
    ledger.begin(None, fresh=True)
    for s in p.seeds:
        d = p.run_dir / f"seed_{s}"
        (d / "metrics").mkdir(parents=True)
        (d / ".hydra").mkdir()
        text = eval_json(s) if eval_json else None
        (d / "metrics" / "eval.json").write_text(text or json.dumps(_eval(-85.0 + s / 10)))
        (d / "metrics" / "train.json").write_text(json.dumps({"epochs": 3280, "train_elbo": -86.0}))
        config = json.loads(json.dumps(p.config)) | {"seed": s}
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(ran_with(config) if ran_with else config))
        resumption.write_marker(d, s, resumption.SeedWall(10.0, 1), None)
    ledger.end("KILLED", 30.0)
    return p


def resume(monkeypatch, name, user, out, seeds=3) -> tuple[int, str, str]:
    """`vaerepro reproduce NAME USER --seeds N --out OUT --resume`: (exit status, stdout, stderr); no seed's
    process may start."""

    real = subprocess.Popen

    def no_seed(args, *a, **kw):
        assert "vaerepro.cli" not in args, f"a seed's process was started: {args}"
        return real(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", no_seed)
    argv = [name, *user, "--seeds", str(seeds), "--out", str(out), "--resume"]
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        status = P.main(argv)
    return status, o.getvalue(), e.getvalue()


def snapshot(d) -> dict[str, bytes]:
    """Every file under d and its bytes, but the reproductions' locks (resumption.held: empty files that
    every invocation opens, holding no record)."""
    files = (f for f in sorted(d.rglob("*")) if f.is_file() and not re.fullmatch(r"\..+\.lock", f.name))
    return {str(f.relative_to(d)): f.read_bytes() for f in files}


def test_resume_reads_finished_seeds_and_judges_them(tmp_path, monkeypatch):
    # the constructed reproduction resumes as a real one does: every seed read from disk
    user = ["tracking.enabled=false"]
    stopped(tmp_path, IWAE, user)
    status, stdout, err = resume(monkeypatch, IWAE, user, tmp_path)
    assert status == 0, err
    assert "test log p(x): measured -84.90 ± 0.25 (95 % t, 3 seeds), published -84.78" in stdout


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"log_px": -85.0, "log_px_se"', "not JSON: "),  # cut short
        ("[1, 2]", "a JSON list, not an object"),
        ('{"log_px": -85.0, "log_px_se": -0.25}', "log_px_se = -0.25 is negative"),  # hand-edited
    ],
)
@pytest.mark.slow
def test_a_damaged_result_file_is_one_line_naming_it(tmp_path, monkeypatch, text, why):
    user = ["tracking.enabled=false"]
    p = stopped(tmp_path, IWAE, user, eval_json=lambda s: text if s == 1 else None)
    before = snapshot(tmp_path)
    status, stdout, err = resume(monkeypatch, IWAE, user, tmp_path)
    damaged = p.run_dir / "seed_1" / "metrics" / "eval.json"
    assert status == 2 and stdout == "" and err.count("\n") == 1, err
    assert err.startswith(f"vaerepro reproduce: {damaged}: seed 1's result cannot be read ({why}"), err
    assert snapshot(tmp_path) == before  # refused before anything was written: the record too


@pytest.mark.slow
def test_a_seed_curve_cut_short_is_one_line_naming_it(tmp_path, monkeypatch):
    """A finished seed's plots/elbo.csv cut short (or another training's) was drawn on the card as the seed's
    training curve; train.json's last-epoch numbers are its last row, so the resume refuses it in one line
    naming the file, before anything is written. Whole curves are read as before."""
    user = ["tracking.enabled=false"]
    p = stopped(tmp_path, IWAE, user)
    rows = ["epoch,train_elbo,val_elbo", "0,-120.5,-118.25", "1,-95.5,-94.75"]
    for s in p.seeds:
        d = p.run_dir / f"seed_{s}"
        (d / "plots").mkdir()
        (d / "plots" / "elbo.csv").write_text("\n".join(rows) + "\n")
        tr = {"epochs": 2, "train_elbo": -95.5, "val_elbo": -94.75}
        (d / "metrics" / "train.json").write_text(json.dumps(tr))
    cut = p.run_dir / "seed_1" / "plots" / "elbo.csv"
    cut.write_text("\n".join(rows[:2]) + "\n0,-95")  # cut short in its last row
    before = snapshot(tmp_path)
    status, stdout, err = resume(monkeypatch, IWAE, user, tmp_path)
    assert status == 2 and stdout == "" and err.count("\n") == 1, err
    assert err.startswith(f"vaerepro reproduce: {cut}: seed 1's result cannot be read (its last row "), err
    assert snapshot(tmp_path) == before
    cut.write_text("\n".join(rows) + "\n")
    status, stdout, err = resume(monkeypatch, IWAE, user, tmp_path)
    assert status == 0, err


@pytest.mark.slow
def test_resume_refuses_seeds_that_ran_with_another_configuration(tmp_path, monkeypatch):
    """conf/ changed between the invocations (here: the default of train.early_stopping, which no preset
    sets): the seeds on disk ran with the old default, the plan has the new one; one verdict must not mix
    them, and resuming would judge the old seeds against the new protocol."""
    user = ["tracking.enabled=false"]

    def old_conf(config):
        config["train"]["early_stopping"] = True
        return config

    p = stopped(tmp_path, IWAE, user, ran_with=old_conf)
    before = snapshot(tmp_path)
    status, stdout, err = resume(monkeypatch, IWAE, user, tmp_path)
    hydra = p.run_dir / "seed_0" / ".hydra" / "config.yaml"
    assert status == 2 and stdout == "" and err.count("\n") == 1, err
    assert (
        f"--resume: seed 0 ran with train.early_stopping=True ({hydra}), this invocation would run "
        "train.early_stopping=False: conf/ has changed since it ran"
    ) in err
    assert snapshot(tmp_path) == before
    # only where and how fast it ran differs (an evaluation batch size): resumed
    p = stopped(tmp_path / "b", IWAE, user, ran_with=lambda c: c | {"eval": c["eval"] | {"batch_size": 7}})
    assert resume(monkeypatch, IWAE, user, tmp_path / "b")[0] == 0


@pytest.mark.slow
def test_mlflow_names_the_numbers_under_the_space_the_seeds_measured_in(tmp_path, monkeypatch):
    """IWAE's preset run on grey levels (a Bernoulli on [0, 1] pixels, improper) is not comparable (other
    data); its numbers must not be logged as `binary/...`, beside the binarised runs' pmf, nor with the
    paper's binary number and a difference across the two units."""
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    user = ["data.space=continuous", "likelihood.allow_improper=true"]
    stopped(tmp_path, IWAE, user)
    status, stdout, err = resume(monkeypatch, IWAE, user, tmp_path)
    assert status == 0, err
    assert "other data: data.space='continuous', the paper's 'binary'" in stdout
    record = json.loads((tmp_path / "runs" / "reproductions" / IWAE / resumption.RECORD).read_text())
    parent = MlflowClient(store).get_run(record["mlflow"]["parent_run_id"])
    names = set(parent.data.metrics)
    assert "improper/reproduction/test_log_px_mean" in names
    assert not any(n.startswith("binary/") for n in names), names
    assert not any(n.endswith(("_published", "_difference")) for n in names), names
    assert parent.data.tags["vaerepro.verdict"] == "not comparable"


@pytest.mark.slow
def test_a_reproduction_another_invocation_is_running_is_refused(tmp_path, monkeypatch):
    """A second `vaerepro reproduce` of a running reproduction read its RUNNING record as a stopped one,
    and its --resume started a second process training into the same seed directory (both wrote
    best.ckpt.tmp; the first failed). The running invocation holds a lock that its seeds' processes inherit:
    another invocation, resuming or not (--fresh too), is refused in one line, writing nothing; once the last
    holder ends, it runs."""
    import sys
    import time

    user = ["tracking.enabled=false"]
    p = stopped(tmp_path, IWAE, user)
    lock = p.run_dir.with_name(f".{p.run_dir.name}.lock")
    expected = (
        f"vaerepro reproduce: {p.run_dir}: another `vaerepro reproduce` (or a seed it started) is running "
        f"this reproduction (it holds {lock}); wait for it to end, or stop it (its seeds stop at their epoch "
        "end on SIGTERM) and resume with --resume\n"
    )
    with resumption.held(p.run_dir) as fd:  # the running invocation
        # a seed it started, which inherits the lock (reproduce._run_seed) and outlives the hold here
        seed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=(fd,))
        before = snapshot(tmp_path)
        status, stdout, err = resume(monkeypatch, IWAE, user, tmp_path)
        assert (status, stdout, err) == (2, "", expected)
    try:
        for extra in ([], ["--fresh"]):  # the invocation has ended, its seed still runs
            argv = [IWAE, *user, "--seeds", "3", "--out", str(tmp_path), *extra]
            e = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(e):
                assert P.main(argv) == 2
            assert e.getvalue() == expected
        assert snapshot(tmp_path) == before
    finally:
        seed.kill()
        seed.wait()
    time.sleep(0.1)
    status, stdout, err = resume(monkeypatch, IWAE, user, tmp_path)  # no holder left: it resumes
    assert status == 0, err
