"""The names of vaerepro's numbers in MLflow: a number whose unit depends on the data space carries the space.

A number whose unit is its data space's (nats of a pmf on {0,1}^D, or of a density on [0,1]^D) is named in
MLflow under that space: `binary/test/log_px`, `continuous/val/elbo`, `improper/test/log_px` (a Bernoulli
on grey levels, not a normalised density). So no MLflow chart, table column or parallel-coordinates axis
ever holds numbers of two spaces, while runs of every space (a sweep over likelihoods) share one
experiment. The numbers in SPACE_FREE have no such unit and keep one name for every run; any other number is
space-qualified, so a new one is never put on a shared axis by mistake.
"""

from __future__ import annotations

from collections.abc import Mapping

from vaerepro.likelihoods import DATA_SPACES, get_likelihood
from vaerepro.likelihoods import space_name as space_name  # the prefix of space-dependent metric names

# Numbers without a data-space unit: one name in every run.
SPACE_FREE = frozenset(
    {
        "kl",
        "ess",
        "ess_fraction",
        "ess_hmean",
        "active_units",
        "active_units_z1",  # a two-layer model's, per stochastic layer (eval.json active_units_by_layer)
        "active_units_z2",
        "knn_accuracy",
        "converged",
        "train_time_s",
        "epochs",
        "best_epoch",
        "resumed_after_epochs",  # a resumed training's checkpoint held this many (train.json)
    }
)
# Tags of an evaluated run: what its test numbers measured (compare.measurement: K and the test split) and
# whether its log p(x) estimate converged. A later evaluation of the run with the same K updates them.
K_TAG = "vaerepro.eval.num_samples"  # K of the run's log p(x) estimate
TEST_SET_TAG = "vaerepro.test_set"  # the test split's sha256 (its first 12 hex digits)
CONVERGED_TAG = "vaerepro.converged"  # "true" or "false"
# Where and with what the training and the latest evaluation ran, as train.json and eval.json record it:
# vaerepro.<train|eval>.device ("cpu (x86_64, 2 cores)"), .versions ("python 3.11.7, vaerepro 0.1.0, ...") and
# .commit (the project's git commit, "-dirty" when its code differed from it)
ENVIRONMENT_KEYS = ("device", "versions", "commit")
# Which weights: the first 12 hex digits of the sha256 of models/best.ckpt that a training run last wrote,
# and that an evaluated run's numbers are of (a training resumed after its evaluation replaces best.ckpt)
BEST_CKPT_TAG = "vaerepro.best_checkpoint"
EVALUATED_CKPT_TAG = "vaerepro.evaluated_checkpoint"
# On a run whose test numbers are of a best.ckpt its training has since replaced
# (evaluations.label_stale_numbers): why they are not the run's model's. A column of the UI's saved view
# (ui.DEFAULT_COLUMNS), so that the table says of such a run what the report's comparison says when it
# leaves the run out; a search for runs to compare filters them out with "tags.`vaerepro.stale` IS NULL".
STALE_TAG = "vaerepro.stale"
# Facts about a run, not results: MLflow params, tags or the logged dataset hold them, not metric charts.
BOOKKEEPING = frozenset({"epoch", "num_samples", "num_examples", "data_dim", "latent_dim"})
# The prefixes of space-dependent names: the data spaces, and a Bernoulli on grey levels (not a density).
SPACES = (*DATA_SPACES, "improper")


def metric_name(key: str, space: str) -> str | None:
    """The MLflow name of one of vaerepro's numbers (`test/log_px`, `val/elbo`, `final/epochs`, ...) in a run
    of `space` (see space_name); None for bookkeeping that is not logged as a metric."""
    leaf = key.rsplit("/", 1)[-1]
    if leaf in BOOKKEEPING:
        return None
    return key if leaf in SPACE_FREE else f"{space}/{key}"


def likelihood_label(name: str | None, params: Mapping[str, str]) -> str | None:
    """The likelihood of a run as the report's comparison names it (likelihoods.Likelihood.label), from its
    `likelihood` tag and its `likelihood.*` params (text: 'None', '0.1', 'softplus'): 'gaussian (sigma=0.1)'
    beside 'gaussian', never two Gaussians of one name. The name alone when the params do not rebuild it (a
    run logged without them)."""
    if not name:
        return name
    options = {}
    for key, text in params.items():
        option = key.removeprefix("likelihood.")
        if option == key or option in ("name", "allow_improper"):
            continue
        if text == "None":
            options[option] = None
            continue
        try:
            options[option] = float(text)
        except ValueError:
            options[option] = text
    try:
        return get_likelihood(name, **options).label
    except (TypeError, ValueError):
        return name
