"""`vaerepro` command line.

vaerepro params [OVERRIDES]     compose conf/ (+ Hydra overrides) into params.yaml
vaerepro fetch                  put the configured data source's raw files under data/
vaerepro prepare|train|evaluate|report [--params params.yaml] [--out .]
                                the DVC stages; each reads the resolved config
vaerepro run [OVERRIDES]        one configuration through every stage, outside DVC (a Hydra app:
                                --multirun, --cfg job, hydra.run.dir=... all work)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vaerepro import config as config_mod
from vaerepro.config import Config, ConfigError

log = logging.getLogger("vaerepro")


def _raw_dir(cfg: Config, root: Path) -> Path:
    p = Path(cfg.data.raw_dir)
    return p if p.is_absolute() else root / p


def _data_path(cfg: Config) -> Path | None:
    return Path(cfg.data.path).expanduser().resolve() if cfg.data.path else None


def stage_fetch(cfg: Config, root: Path) -> Path:
    from vaerepro import data

    return data.fetch(cfg.data.source, _raw_dir(cfg, root), url=cfg.data.url, path=_data_path(cfg))


def stage_prepare(cfg: Config, out_dir: Path, root: Path) -> dict:
    from vaerepro import data

    d = cfg.data
    return data.prepare(
        d.source,
        _raw_dir(cfg, root),
        out_dir / "prepared",
        path=_data_path(cfg),
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=d.split_seed,
        max_examples=d.max_examples,
    )


def stage_train(cfg: Config, out_dir: Path, root: Path, progress: bool = True) -> dict:
    from vaerepro.train import train

    return train(cfg, out_dir, root=root, enable_progress_bar=progress)


def stage_evaluate(cfg: Config, out_dir: Path, root: Path, progress: bool = True) -> dict:
    from vaerepro.evaluate import evaluate

    return evaluate(cfg, out_dir, progress=progress)


def stage_report(cfg: Config, out_dir: Path, root: Path) -> dict:
    from vaerepro import tracking
    from vaerepro.report import write_report

    runs = tracking.experiment_runs(cfg, root) if cfg.tracking.enabled else []
    paths = write_report(out_dir, cfg.to_dict(), runs)
    run_id, uri = tracking.read_run_id(out_dir / "models")
    if cfg.tracking.enabled and run_id:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        client.log_artifacts(run_id, str(Path(paths["html"]).parent), "report")
        client.set_terminated(run_id, "FINISHED")
    return paths


def run_pipeline(cfg: Config, out_dir: Path, root: Path, progress: bool = True) -> dict:
    """prepare → train → evaluate → report for one configuration in out_dir; returns eval metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.yaml").write_text(config_mod.dump(cfg.to_dict()))
    stage_fetch(cfg, root)
    stage_prepare(cfg, out_dir, root)
    stage_train(cfg, out_dir, root, progress)
    metrics = stage_evaluate(cfg, out_dir, root, progress)
    stage_report(cfg, out_dir, root)
    return metrics


STAGES = {"prepare": stage_prepare, "train": stage_train, "evaluate": stage_evaluate, "report": stage_report}


def _hydra_run(argv: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    root = config_mod.find_project_root()

    @hydra.main(config_path=str(root / "conf"), config_name="config", version_base="1.3")
    def app(dcfg) -> float:
        cfg = config_mod.validate(OmegaConf.to_container(dcfg, resolve=True))
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        metrics = run_pipeline(cfg, out_dir, root)
        log.info(
            "log p(x) = %.3f ± %.3f nats (%s, %s space); results in %s",
            metrics["log_px"],
            metrics["log_px_se"],
            cfg.likelihood.name,
            cfg.data_space,
            out_dir,
        )
        return metrics["log_px"]

    sys.argv = ["vaerepro run", *argv]
    app()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "run":
        try:
            _hydra_run(argv[1:])
        except ConfigError as err:
            print(f"vaerepro: {err}", file=sys.stderr)
            return 2
        return 0

    parser = argparse.ArgumentParser(
        prog="vaerepro", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="compose conf/ with Hydra overrides into params.yaml")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--output", default="params.yaml")
    for name in ("fetch", *STAGES):
        p = sub.add_parser(name, help=f"the {name} stage" if name in STAGES else "put raw data in place")
        p.add_argument("--params", default="params.yaml", help="resolved config (default: params.yaml)")
        p.add_argument("--out", default=".", help="directory the stage reads and writes (default: .)")
        p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from vaerepro.data import DataError

    try:
        if args.command == "params":
            raw = config_mod.compose(args.overrides)
            config_mod.validate(raw)
            Path(args.output).write_text(config_mod.dump(raw))
            print(f"wrote {args.output}")
            return 0
        cfg = config_mod.load(args.params)
        root = config_mod.find_project_root(Path(args.params).resolve().parent)
        out_dir = Path(args.out).resolve()
        if args.command == "fetch":
            print(stage_fetch(cfg, root))
        elif args.command in ("train", "evaluate"):
            STAGES[args.command](cfg, out_dir, root, not args.no_progress)
        else:
            STAGES[args.command](cfg, out_dir, root)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"vaerepro {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
