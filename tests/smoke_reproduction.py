"""`vaerepro reproduce NAME --smoke` end to end, for tests/test_reproduce_smoke_*.py (every preset, split
over two files so that pytest's two workers run them side by side; each seed is a `vaerepro run` process
of ~15 s on 2 cores): the files, the verdict "not comparable" with its reasons, and the MLflow parent run
with one child run per seed."""

from __future__ import annotations

import json
import math
import types

from conftest import BIN, ROOT, run
from vaerepro.reproductions import judge as R
from vaerepro.reproductions import presets as P
from vaerepro.reproductions import reproduce

# aevb-frey-z2 runs 2 seeds (the interval across seeds, two child runs); cb-mnist-cb runs through the real
# command line, as a user types it, and iwae-mnist-iwae-k5-l2 calls presets.main in this process with its
# seed's `vaerepro run` started as reproduce starts it (subprocess.Popen of `python -m vaerepro.cli run`).
# The others call presets.main in this process, each seed's process forked from one that has imported what
# a seed imports (forked_cli.py, in place of reproduce's subprocess.Popen), ~10 s less a seed.
SEEDS = {"aevb-frey-z2": 2}
VIA_CLI = {"cb-mnist-cb"}
OWN_PROCESS = {"iwae-mnist-iwae-k5-l2"}


def check_smoke(name: str, store: str, raw_dir, tmp_path, monkeypatch, capsys, forked) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    seeds, out = SEEDS.get(name, 1), tmp_path / "out"
    argv = [name, "--smoke", "--seeds", str(seeds), "--out", str(out), f"data.raw_dir={raw_dir}"]
    if name in VIA_CLI:
        proc = run([str(BIN / "vaerepro"), "reproduce", *argv], cwd=ROOT, env={"MLFLOW_TRACKING_URI": store})
        stdout = proc.stdout
    else:
        if name not in OWN_PROCESS:
            monkeypatch.setattr(reproduce, "subprocess", types.SimpleNamespace(Popen=forked.popen_module))
        assert P.main(argv) == 0, forked.logs[-1].read_text()[-3000:] if forked.logs else ""
        stdout = capsys.readouterr().out
    assert stdout.startswith(f"{name}: not comparable\n")

    card = out / "reports" / "reproductions" / "smoke"
    md, html = (card / f"{name}.{ext}" for ext in ("md", "html"))
    assert md.is_file() and html.is_file() and (card / f"{name}_figures" / "training_curves.png").is_file()
    preset = P.PRESETS[name]
    unconverged = []  # the seeds whose log p(x) estimate has not converged
    for s in range(seeds):
        seed_dir = out / "runs/reproductions/smoke" / name / f"seed_{s}"
        ev = json.loads((seed_dir / "metrics/eval.json").read_text())
        assert ev["num_samples"] == 10 and ev["source"] == "mnist5k" and math.isfinite(ev["elbo"])
        assert math.isfinite(ev["log_px"]) and ev["log_px"] >= ev["elbo"] - 1e-6  # L_10 >= the ELBO
        unconverged += [s] if ev["converged"] is False else []
        train = json.loads((seed_dir / "metrics/train.json").read_text())
        assert train["epochs"] == 2 and math.isfinite(train["train_elbo"])
        # the seed trained the preset's model: its latent size, its likelihood, its decoder's data space
        assert ev["latent_dim"] == preset.settings["model.latent_dim"], ev
        assert ev["likelihood"] == preset.settings["likelihood"], ev
        # active units in each stochastic layer (two for IWAE's two-layer rows), none above the layer's size
        sizes = [ev["latent_dim"], preset.settings.get("model.latent_dim_2")]
        layers = preset.settings.get("model.stochastic_layers", 1)
        assert (
            len(ev["active_units_by_layer"]) == layers
            and sum(ev["active_units_by_layer"]) == ev["active_units"]
        )
        assert all(0 <= a <= z for a, z in zip(ev["active_units_by_layer"], sizes, strict=False)), ev
    text = md.read_text()
    assert "not comparable: the run departs from the paper's protocol" in text
    # the environment names the devices and the software as the seeds' records do
    environment = text.split("## Environment", 1)[1].split("\n## ", 1)[0]
    for package, version in ev["versions"].items():
        assert f"| {package} | {version} |" in environment, (package, environment)
    assert f"| training device | {train['device']} |" in environment, environment
    assert f"| git commit | {train['commit']} |" in environment, environment  # the seeds' own, as recorded
    assert f"| evaluation device | {ev['device']} |" in environment, environment
    reasons = [R.OTHER_DATA, R.SHORTENED, R.FEWER_SEEDS]
    # a setting the config cannot express (the CB code's dropout, ...); the IWAE rows have none left
    reasons += [R.NOT_IMPLEMENTED] if any(m.blocking for m in preset.missing) else []
    reasons += [R.DIFFERENT_K] if not name.startswith("aevb-") else []  # AEVB compares bounds: K is moot
    for reason in reasons:
        assert f"| {reason} | " in text and f"    - {reason}: " in stdout, reason
    if all(p.value is None for p in preset.published):
        assert "no published number" in text
    if seeds > 1:
        assert f"(95 % t, {seeds} seeds)" in text
    # the seeds whose L_10 has not converged are noted (it is the same bound as a paper's L_K), never a reason
    judged = any(p.measured == "eval.json:log_px" for p in preset.published)
    notes = [
        line.removeprefix("  note: ")
        for line in stdout.splitlines()
        if line.startswith(f"  note: {R.NOT_CONVERGED}: ")
    ]
    assert len(notes) == (1 if unconverged and judged else 0), (unconverged, stdout)
    assert all(f"seed {s}, K = 10 (" in notes[0] for s in unconverged if judged), (unconverged, notes)
    assert all(f"Note: {n}." in text for n in notes), (notes, text)
    assert f"- {R.NOT_CONVERGED}" not in stdout and text.count(f"Note: {R.NOT_CONVERGED}") == len(notes)

    client = MlflowClient(store)
    assert client.get_experiment_by_name("vaerepro") is None  # smoke runs never join the compared runs
    exp = client.get_experiment_by_name("vaerepro-smoke")
    (parent,) = client.search_runs(
        [exp.experiment_id], f"tags.`vaerepro.preset` = '{name}' and tags.`vaerepro.role` = 'reproduction'"
    )
    tags = parent.data.tags
    assert parent.info.status == "FINISHED" and tags["vaerepro.verdict"] == "not comparable"
    assert tags["vaerepro.smoke"] == "true" and R.SHORTENED in tags["vaerepro.reasons"]
    assert all(f"Note: {n}" in tags["mlflow.note.content"] for n in notes)
    assert R.NOT_CONVERGED not in tags["vaerepro.reasons"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "card")} >= {
        f"card/{name}.md", f"card/{name}.html", f"card/{name}_figures",
    }  # fmt: skip
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["vaerepro.seed"] for c in children) == [str(s) for s in range(seeds)]
    assert all(c.info.status == "FINISHED" and c.data.tags["vaerepro.preset"] == name for c in children)
    if any(p.value is not None for p in preset.published):
        assert any(k.endswith("_difference") for k in parent.data.metrics)
