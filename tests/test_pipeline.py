"""The DVC pipeline end to end, in a temporary git + DVC repository, on a tiny config of the real data."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run, shrink_conf

pytestmark = pytest.mark.slow

EVAL_KEYS = {
    "log_px",
    "log_px_se",
    "elbo",
    "kl",
    "bits_per_dim",
    "active_units",
    "num_samples",
    "likelihood",
    "data_space",
    "latent_dim",
    "improper",
    "log_px_ladder",
    "ess",
    "knn_accuracy",
}


def tiny_repo(d, extra=()):
    """A git + DVC repository in d with the project's pipeline (and the files `extra` names), conf/ shrunk to
    the tiny config, committed."""
    for name in ("conf", "src", "dvc.yaml", "data.dvc", ".dvcignore", ".gitignore", *extra):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, d / name)
    (d / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(ROOT / ".dvc" / name, d / ".dvc" / name)
    shrink_conf(d / "conf")
    run(["git", "init", "-q"], d)
    run(["git", "config", "user.email", "ci@example.invalid"], d)
    run(["git", "config", "user.name", "ci"], d)
    run(["vaerepro", "params"], d)
    run(["git", "add", "-A"], d)
    run(["git", "commit", "-qm", "tiny pipeline"], d)
    return d


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return tiny_repo(tmp_path_factory.mktemp("repo"))


def test_dvc_repro_after_an_edit_of_conf_warns_that_params_yaml_is_not_conf(tmp_path):
    """`dvc repro` does not compose conf/: after an edit of conf/ it ran params.yaml under the old values,
    and said "Data and pipelines are up to date". The check stage depends on conf/, so it runs again and
    warns, naming the key and both values; it refuses nothing (params.yaml edited by hand is a config DVC
    users run on purpose). Under `dvc exp run`, which has just composed conf/ (DVC_EXP_NAME), it is silent."""
    repo = tiny_repo(tmp_path)
    first = run(["dvc", "repro", "check"], repo)
    assert "Running stage 'check'" in first.stdout and "WARNING" not in first.stdout + first.stderr
    model = repo / "conf" / "model" / "mlp.yaml"
    model.write_text(model.read_text().replace("latent_dim: 4\n", "latent_dim: 7\n"))  # the tiny config's 4
    edited = run(["dvc", "repro", "check"], repo)
    out = edited.stdout + edited.stderr
    assert "Running stage 'check'" in edited.stdout, out
    (line,) = [x for x in out.splitlines() if "WARNING" in x]
    assert "params.yaml is not conf/ as it composes now: model.latent_dim: params.yaml 4, conf/ 7." in line
    assert "`vaerepro params [OVERRIDES]`, then `dvc repro`" in line
    under_exp = run(["dvc", "repro", "--force", "check"], repo, env={"DVC_EXP_NAME": "sappy-kite"})
    assert "WARNING" not in under_exp.stdout + under_exp.stderr


def test_dvc_exp_run_warns_when_it_leaves_out_the_overrides_the_baseline_recorded(tmp_path):
    """`vaerepro params model.latent_dim=6`, committed, then `dvc exp run -S train.max_epochs=1`: DVC composes
    conf/ with its -S overrides alone, so the experiment ran conf/'s latent size while `dvc exp show` set it
    beside a baseline of 6, with no word. The check stage reads the baseline's params.yaml from git and
    warns, naming the key with both values and the -S that carries it; given with -S, nothing is said."""
    repo = tiny_repo(tmp_path)
    run(["vaerepro", "params", "model.latent_dim=6"], repo)
    run(["git", "commit", "-qam", "latent size 6"], repo)
    lost = run(["dvc", "exp", "run", "-S", "train.max_epochs=1", "check"], repo)
    out = lost.stdout + lost.stderr
    (line,) = [x for x in out.splitlines() if "WARNING" in x]
    assert "recorded in the baseline's params.yaml (model.latent_dim=6): " in line, out
    assert "model.latent_dim: experiment 4, baseline 6. " in line  # the tiny config's 4
    assert "dvc exp run -S model.latent_dim=6 -S ..." in line
    kept = run(["dvc", "exp", "run", "-S", "model.latent_dim=6", "-S", "train.max_epochs=1", "check"], repo)
    assert "WARNING" not in kept.stdout + kept.stderr


def test_embedded_data_matches_committed_data_dvc(repo):
    run(["vaerepro", "fetch"], repo)
    before = json.loads(run(["dvc", "status", "data.dvc", "--json"], repo).stdout)
    assert before in ({}, {"data.dvc": [{"changed outs": {"data": "not in cache"}}]}), (
        before
    )  # not "modified"
    run(["dvc", "commit", "--force", "data.dvc"], repo)  # what `make repro` does: fill the local cache
    # byte-for-byte materialisation: the workspace data has exactly the hash data.dvc records
    run(["git", "diff", "--exit-code", "data.dvc"], repo)
    assert json.loads(run(["dvc", "status", "data.dvc", "--json"], repo).stdout) == {}


def test_a_users_npz_under_data_is_versioned_and_prepared_again_when_it_changes(tmp_path):
    """docs/data.md's recipe for your own data under DVC: the file in data/, which data.dvc tracks and the
    prepare stage depends on. `dvc add data` versions it, and a new version of the file makes `dvc repro`
    prepare again from it (a file outside data/ is a path DVC never reads)."""
    import numpy as np

    repo = tiny_repo(tmp_path)
    run(["vaerepro", "fetch"], repo)  # data/ as data.dvc records it, as `make repro` starts

    def write(n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        x = (rng.random((n, 28, 28)) < 0.3).astype(np.uint8) * 255
        np.savez(repo / "data" / "mine.npz", x=x, y=rng.integers(0, 10, n))

    write(100, seed=0)
    run(["vaerepro", "params", "data=npz", "data.path=data/mine.npz"], repo)
    run(["dvc", "add", "data"], repo)
    assert "mine.npz" not in run(["git", "status", "--porcelain"], repo).stdout  # in DVC's cache, not git
    run(["dvc", "repro", "prepare"], repo)
    meta = json.loads((repo / "prepared" / "meta.json").read_text())
    assert (meta["source"], meta["n_raw"], sum(meta["sizes"].values())) == ("npz", 100, 100)

    write(150, seed=1)
    status = json.loads(run(["dvc", "status", "prepare", "--json"], repo).stdout)
    assert {"changed deps": {"data": "modified"}} in status["prepare"], status
    ran = run(["dvc", "repro", "prepare"], repo).stdout
    assert "Running stage 'prepare'" in ran, ran
    again = json.loads((repo / "prepared" / "meta.json").read_text())
    assert (again["n_raw"], sum(again["sizes"].values())) == (150, 150)
    assert again["raw_files"]["mine.npz"] != meta["raw_files"]["mine.npz"]


def test_dvc_repro_produces_files_and_numbers(repo):
    run(["vaerepro", "fetch"], repo)
    ran = run(["dvc", "repro"], repo)
    for f in (
        "prepared/meta.json",
        "models/best.ckpt",
        "models/last.ckpt",
        "metrics/train.json",
        "metrics/train_summary.json",
        "metrics/eval.json",
        "metrics/eval_summary.json",
        "plots/elbo.csv",
        "artifacts/samples.npz",
        "reports/report.html",
        "reports/report.md",
        "dvc.lock",
        "mlflow.db",
    ):
        assert (repo / f).is_file(), f

    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert EVAL_KEYS <= ev.keys()
    assert (ev["likelihood"], ev["data_space"], ev["improper"], ev["latent_dim"], ev["num_samples"]) == (
        "bernoulli",
        "binary",
        False,
        4,
        50,
    )
    for k in ("log_px", "log_px_se", "elbo", "kl", "bits_per_dim"):
        assert math.isfinite(ev[k]), k
    assert ev["log_px"] <= 0  # a pmf on binary pixels
    assert ev["log_px"] >= ev["elbo"] - 3 * ev["log_px_se"]  # importance sampling tightens the bound
    assert ev["kl"] >= 0
    assert ev["bits_per_dim"] == pytest.approx(-ev["log_px"] / (784 * math.log(2)))
    assert [r["k"] for r in ev["log_px_ladder"]] == [1, 10, 50]
    assert ev["log_px_ladder"][-1]["log_px"] == pytest.approx(ev["log_px"])
    assert 0 <= ev["active_units"] <= 4 and 0.1 <= ev["knn_accuracy"] <= 1
    # the stages say their results and where the report is, as `vaerepro run` does: `make repro` ended with
    # neither, so the first number a user saw was behind `dvc metrics show`
    said = ran.stdout + ran.stderr
    verdict = "converged" if ev["converged"] else "NOT CONVERGED"
    assert (
        f"log p(x) = {ev['log_px']:.3f} ± {ev['log_px_se']:.3f} nats/example (bernoulli, binary space; "
        f"K = 50, {verdict}); in {repo / 'metrics' / 'eval.json'}"
    ) in said, said
    assert f"report: {repo / 'reports' / 'report.html'} (and report.md)" in said, said
    tr = json.loads((repo / "metrics/train.json").read_text())
    assert (
        f"best validation ELBO = {tr['best_val_elbo']:.3f} nats/example (bernoulli, binary space) at epoch "
        f"{tr['best_epoch']} (from 0) of 3; in {repo / 'metrics' / 'train.json'}"
    ) in said, said

    tr = json.loads((repo / "metrics/train.json").read_text())
    assert tr["epochs"] == 3 and math.isfinite(tr["val_elbo"])
    assert len((repo / "plots/elbo.csv").read_text().splitlines()) == 4
    html = (repo / "reports/report.html").read_text()
    assert "data:image/png;base64," in html and "nats" in html

    second = run(["dvc", "repro"], repo).stdout
    assert "Data and pipelines are up to date" in second

    # DVC's metrics are the headline numbers; the whole records are plain outputs
    (shown,) = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout).values()
    assert set(shown["data"]) == {"metrics/eval_summary.json", "metrics/train_summary.json"}
    # the numbers in nats under their data space, log p(x) and its SE named by K too (binary.log_px_k50),
    # the labels and accuracy beside them
    summary = shown["data"]["metrics/eval_summary.json"]["data"]
    assert ev["num_samples"] == 50
    assert summary == {
        "likelihood": "bernoulli",
        "latent_dim": ev["latent_dim"],
        "binary": {"log_px_k50": ev["log_px"], "log_px_k50_se": ev["log_px_se"], "elbo": ev["elbo"]},
        "knn_accuracy": ev["knn_accuracy"],
        "converged": ev["converged"],
    }
    assert shown["data"]["metrics/train_summary.json"]["data"] == {
        "binary": {"best_val_elbo": tr["best_val_elbo"]},
        "epochs": tr["epochs"],
        "best_epoch": tr["best_epoch"],
    }
    run(["dvc", "plots", "show", "-o", "dvc_plots"], repo)
    assert (repo / "dvc_plots" / "index.html").is_file()


def test_the_python_example_of_the_docs_reproduces_the_evaluate_stage(repo):
    """docs/outputs.md's "A trained model in Python", run as written in the pipeline's directory: it loads the
    model and the test draw, and its importance-sampled log p(x) equals artifacts/per_example.npz's, the
    evaluate stage's, to float rounding (same K, same noise per example, another chunk size)."""
    run(["dvc", "repro"], repo)  # up to date when the test above ran: nothing runs
    text = (ROOT / "docs" / "outputs.md").read_text().split("## A trained model in Python", 1)[1]
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    checks = """
import json
ev = json.load(open("metrics/eval.json"))
print(json.dumps({
    "x": [list(x.shape), str(x.dtype), sorted(set(x.flatten().tolist()))[:3]],
    "raw": [str(splits.test.dtype), int(splits.test.max()) > 1, bool(splits.quantized)],
    "z": list(z.shape), "reconstructions": list(reconstructions.shape), "samples": list(samples.shape),
    "log_px": log_px.tolist(), "saved": saved.tolist(), "ladder": sorted(estimate.ladder),
    "k": ev["num_samples"], "latent_dim": ev["latent_dim"], "space": ev["data_space"],
}))
"""
    out = json.loads(run([sys.executable, "-c", code + checks], repo).stdout.splitlines()[-1])
    ev = json.loads((repo / "metrics/eval.json").read_text())
    n, d = ev["num_examples"], ev["data_dim"]
    # the tiny config's Bernoulli: binary pixels, 0 and 1 only
    assert out["space"] == "binary" and out["x"] == [[n, d], "torch.float32", [0.0, 1.0]]
    assert out["raw"] == ["uint8", True, True]  # as the docs say: 8-bit grey levels, before fixed_space
    assert out["z"] == [16, out["latent_dim"]] and out["reconstructions"] == out["samples"] == [16, d]
    assert out["ladder"][-1] == out["k"] == ev["num_samples"]
    assert len(out["log_px"]) == min(100, n) and out["log_px"] == pytest.approx(
        out["saved"], rel=1e-6, abs=1e-5
    )
    assert not any(math.isnan(v) for v in out["log_px"])


def test_a_refusal_under_dvc_repro_loses_no_result(repo, tmp_path):
    """DVC deletes a stage's outputs before it runs the stage: a config train or evaluate refuses (a value
    `dvc exp run -S` set, a precision this machine lacks) lost models/, metrics/ and plots/ first. The check
    stage refuses it before any other stage runs, in one line naming the key; train.resume=true too, which
    under DVC would find models/ deleted and train from the start, and `dvc repro -s train` (no check
    stage) is refused by the train stage itself."""
    import os
    import subprocess

    from conftest import BIN

    run(["vaerepro", "fetch"], repo)
    run(["dvc", "repro"], repo)
    kept = [p for p in ("models", "metrics", "plots", "artifacts") for p in sorted((repo / p).rglob("*"))]
    before = {p: p.read_bytes() for p in kept if p.is_file()}
    assert len(before) >= 8
    good = (repo / "params.yaml").read_text()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    try:
        for section, key, value, message in (
            ("model", "latent_dim", 0, "model.latent_dim: Input should be greater than or equal to 1"),
            ("eval", "precision", "tf32", "eval.precision=tf32: TF32 matmuls exist on CUDA devices only"),
            # DVC would delete models/ before the train stage: nothing to resume, and it would train anew
            ("train", "resume", True, "train.resume=true under DVC (stage check): DVC deletes models/"),
        ):
            params = yaml.safe_load(good)
            params[section][key] = value
            (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            proc = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
            line = proc.stderr.splitlines()[0]
            assert proc.returncode != 0 and line.startswith("vaerepro check: ") and message in line, (
                proc.stderr
            )
            assert "Traceback" not in proc.stderr
            assert {p: p.read_bytes() for p in before if p.is_file()} == before  # nothing deleted or changed
    finally:
        (repo / "params.yaml").write_text(good)
    # the config as it was: check runs again (its output was deleted), and its unchanged output reruns nothing
    again = run(["dvc", "repro"], repo).stdout
    assert [line for line in again.splitlines() if line.startswith("Running stage")] == [
        "Running stage 'check':"
    ]
    # the train stage alone (`dvc repro -s train`: no upstream stage runs) refuses it too, after DVC deleted
    # its outputs: in a copy of the repository, which the next tests do not share
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy, symlinks=True)
    params = yaml.safe_load(good)
    params["train"]["resume"] = True
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(["dvc", "repro", "-s", "train"], cwd=copy, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("vaerepro ")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vaerepro train: train.resume=true under DVC (stage train)"), lines


def test_dvc_repro_keeps_the_reproduction_cards_in_reports(repo):
    """`vaerepro reproduce NAME` writes its card into reports/reproductions/ of the project root, where the
    report stage writes report.{md,html} and figures/: with the whole reports/ an output of that stage, the
    card made `dvc status` call the stage changed, and the next `dvc repro` deleted it (DVC deletes a
    stage's outputs before running it) with the seeds' hours behind it."""
    run(["vaerepro", "fetch"], repo)
    run(["dvc", "repro"], repo)
    card = repo / "reports" / "reproductions" / "aevb-mnist-z3.md"  # where reproduce.plan puts a card
    card.parent.mkdir(parents=True)
    card.write_text("# aevb-mnist-z3: reproduced\n")
    try:
        assert "Data and pipelines are up to date" in run(["dvc", "repro"], repo).stdout
        run(["dvc", "repro", "--force", "--single-item", "report"], repo)  # the stage runs again
        assert (repo / "reports" / "report.md").is_file()
        assert card.read_text() == "# aevb-mnist-z3: reproduced\n"
    finally:
        shutil.rmtree(repo / "reports" / "reproductions", ignore_errors=True)


def test_dvc_exp_run_composes_overrides(repo):
    run(["vaerepro", "fetch"], repo)
    run(["dvc", "exp", "run", "-S", "likelihood=continuous_bernoulli", "-S", "model.latent_dim=5"], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["likelihood"]["name"] == "continuous_bernoulli" and params["model"]["latent_dim"] == 5
    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert (ev["likelihood"], ev["data_space"], ev["latent_dim"], ev["improper"]) == (
        "continuous_bernoulli",
        "continuous",
        5,
        False,
    )
    # dequantised 8-bit data: bits/dim include the log 256 per dimension
    assert ev["bits_per_dim"] == pytest.approx((-ev["log_px"] / 784 + math.log(256)) / math.log(2))
    diff = run(["dvc", "params", "diff", "--json"], repo).stdout
    assert "continuous_bernoulli" in diff

    # both runs are in the project's MLflow store, and the report keeps their spaces apart
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vaerepro")
    runs = client.search_runs([exp.experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names == ["bernoulli-z4-s0", "continuous_bernoulli-z5-s0"], names
    assert all(r.info.status == "FINISHED" for r in runs)
    # each run's log p(x) under its own data space, never on a shared axis
    assert sorted(k for r in runs for k in r.data.metrics if k.endswith("/test/log_px")) == [
        "binary/test/log_px",
        "continuous/test/log_px",
    ]
    md = (repo / "reports/report.md").read_text()
    assert "binary pixels" in md and "continuous pixels" in md


def test_queued_dvc_experiments_log_to_the_repository_store(repo):
    # queued experiments run in temporary copies under .dvc/tmp/exps/; their runs belong in the repo's store
    import time

    from mlflow import MlflowClient

    run(["vaerepro", "fetch"], repo)
    run(["dvc", "exp", "run", "--queue", "-S", "model.latent_dim=3"], repo)
    run(["dvc", "queue", "start", "--jobs", "1"], repo)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(1)
    assert status.count("Success") == 1, status
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vaerepro").experiment_id])
    names = [r.info.run_name for r in runs]
    assert "bernoulli-z3-s0" in names, names
    assert not list((repo / ".dvc").rglob("mlflow.db"))  # no store left behind in a temporary copy


def test_dvc_remote_push_and_pull_restore_the_outputs(repo, tmp_path):
    # a local directory stands in for S3/GCS/SSH: `dvc remote add -d` is the only difference
    import hashlib

    def digest(p):
        return hashlib.md5((repo / p).read_bytes()).hexdigest()

    run(["vaerepro", "fetch"], repo)
    run(["dvc", "repro"], repo)
    before = {p: digest(p) for p in ("models/best.ckpt", "data/mnist5k/images.npy", "prepared/x_test.npy")}
    run(["dvc", "remote", "add", "-f", "-d", "store", str(tmp_path / "remote")], repo)
    run(["dvc", "push"], repo)
    for p in ("models", "prepared", ".dvc/cache"):
        shutil.rmtree(repo / p)
    run(["dvc", "pull"], repo)
    assert {p: digest(p) for p in before} == before
    assert "Data and pipelines are up to date" in run(["dvc", "repro"], repo).stdout


def _stage_process(cwd: Path, stage: str) -> int | None:
    """The pid of `vaerepro STAGE` running in `cwd` (not the shell DVC may start it through), or None."""
    for p in Path("/proc").iterdir():
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
            if (
                p.name.isdigit()
                and Path(os.readlink(p / "cwd")) == cwd
                and argv[1:2] != [b"-c"]
                and any(a.endswith(b"vaerepro") for a in argv)
                and stage.encode() in argv
            ):
                return int(p.name)
        except OSError:
            continue
    return None


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def _running(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, ended but not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_a_stage_stops_when_its_dvc_process_is_killed(repo, tmp_path, shell):
    """`kill` (or `timeout`) of `dvc repro` alone: DVC dies and passes no signal on, and its train stage
    trained on, orphaned, writing outputs DVC would never record. The stage now stops as a SIGTERM stops
    it: at its epoch end, with models/last.ckpt, its MLflow run KILLED, exit 143. DVC runs a stage through
    $SHELL -c: bash execs the stage, so dvc is its parent; dash keeps itself between them."""
    import signal
    import subprocess
    import time

    from mlflow import MlflowClient

    from conftest import BIN

    run(["vaerepro", "fetch"], repo)
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy, symlinks=True)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["train"].update(max_epochs=100_000, checkpoint_every_s=0)  # trains until stopped
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    curve = copy / "plots" / "elbo.csv"
    curve.unlink(missing_ok=True)  # an earlier test's `dvc repro` (DVC deletes it before training anyway)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "SHELL": shell}
    with open(tmp_path / "dvc.err", "w") as err:
        dvc = subprocess.Popen(
            ["dvc", "repro"], cwd=copy, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
    stage = None
    try:
        deadline = time.monotonic() + 300
        # until the train stage runs and has trained two epochs
        while (stage := _stage_process(copy, "train")) is None or len(_lines(curve)) < 3:
            assert dvc.poll() is None and time.monotonic() < deadline, (tmp_path / "dvc.err").read_text()
            time.sleep(0.2)
        dvc.send_signal(signal.SIGTERM)  # dvc alone, as `kill PID` sends it
        dvc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while _running(stage) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(stage), "the train stage goes on training without dvc"
    finally:
        if stage is not None and _running(stage):
            os.kill(stage, signal.SIGKILL)
        if dvc.poll() is None:
            dvc.kill()
    text = (tmp_path / "dvc.err").read_text()
    assert "vaerepro train: stopped by SIGTERM" in text and "Traceback" not in text, text
    assert (copy / "models" / "last.ckpt").is_file()
    run_id = json.loads((copy / "models" / "mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(f"sqlite:///{copy / 'mlflow.db'}").get_run(run_id).info.status == "KILLED"
