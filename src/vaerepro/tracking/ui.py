"""Links into the MLflow UI that open the project's runs table, already set up for comparing runs.

MLflow 3's UI opens an experiment on its GenAI pages (Overview / Traces) unless the link says otherwise, and
it shows only `Run Name`, `Created`, `Dataset`, `Duration` (plus `Source`/`Models`) until a user picks
columns by hand. Everything here uses behaviour the UI itself reads from a link or from the experiment
(URL query parameters and experiment tags); nothing is patched. Checked against the UI bundle shipped in the
mlflow 3.17.2 wheel (`mlflow/server/js/build/static/js/*.js`) and in a real browser by
`tests/test_mlflow_ui.py`; after an MLflow upgrade, re-run that test and re-check the strings cited below:

    cd .venv/lib/python3.*/site-packages/mlflow/server/js/build/static/js
    grep -o '.\\{200\\}viewStateShareKey.\\{200\\}' *.js      # and the other quoted strings

How a link becomes a configured runs table
------------------------------------------
* Route. The UI uses a hash router; the runs tab of experiment `<id>` is `#/experiments/<id>/runs`
  (main.*.js: `experimentPageTabbed` = "/experiments/:experimentId/:tabName", tab enum `e.Runs="runs"`).
  The bare experiment route `#/experiments/<id>` is redirected by the page (5439.*.chunk.js, the hook that
  calls `getExperimentPageTabRoute(t,l)` with `l=Runs` unless the kind is `GENAI_DEVELOPMENT`, then
  Traces/Overview), so a link to the bare route lands on GenAI's Overview in a fresh browser.
* `workflowType=machine_learning`. In 3.17.2 the experiment's kind (GenAI vs. machine learning) comes from
  the *workflow type*, not from the experiment: main.*.js reads `e.get("workflowType")` (values "genai" /
  "machine_learning"), else the browser's localStorage key "mlflow.workflowType", else "genai"; the hook
  that would read the `mlflow.experimentKind` experiment tag is bypassed because its feature flag (`Z0`)
  is compiled to `()=>!0`. So the experiment tag `mlflow.experimentKind` changes nothing in 3.17.2
  (verified in a browser), and the link must carry `workflowType=machine_learning` to get the
  "Model training" navigation (Runs / Models / Traces) instead of the GenAI one.
* `compareRunsMode=TABLE|CHART`. The runs tab's view (2809.*.chunk.js: `const o="compareRunsMode"`,
  `e.get(o)||"TABLE"`): the table, or the chart view.
* `viewStateShareKey=<key>` + experiment tag `mlflow.sharedViewState.<key>`. This is the UI's own
  "Views" / "Save view" / shared-link feature (main.*.js: `U="viewStateShareKey"`,
  `$="mlflow.sharedViewState."`; 3878.*.chunk.js: the hook that finds the tag `${o6}${key}` among the
  experiment's tags). The tag's value is the saved-view envelope
  `{"name", "createdAt", "updatedAt", "state"}` with `state` a JSON string (3448.*.chunk.js: "Invalid
  saved-view envelope: expected an object with a string `name`, number `createdAt`, and string `state`";
  a bare JSON state is accepted too). From `state` the UI takes
    - the search facets `searchFilter, orderByKey, orderByAsc, startTime, lifecycleFilter,
      modelVersionFilter, datasetsFilter` (3793.*.chunk.js: `const a=["searchFilter","orderByKey",...]`),
    - the table/chart state `selectedColumns, columnOrder, columnWidths, ..., compareRunCharts,
      compareRunSections, ..., isAccordionReordered, ..., hideEmptyCharts, ...` (main.*.js:
      `const a=["selectedColumns","columnOrder","columnWidths",...]`).
  The table, its sort and the charts can therefore be preset only through this tag; there is no URL
  parameter for columns. The UI writes such tags itself when a user clicks "Save view"; the link it then
  offers is exactly `#/experiments/<id>/runs?viewStateShareKey=<key>` (5439.*.chunk.js, `ue=(e,t,n)=>`).
* Caveat: the shared view is ignored when the link also carries any of the search-facet parameters
  (3878.*.chunk.js: `if($e.sO.some(e=>a.has(e)))return`), so the sort goes into the tag, never into the
  link (`orderByKey=`/`orderByAsc=` in the link would drop the columns). If the tag is missing, the UI
  shows "share key ... does not exist" and falls back to the bare experiment route (GenAI Overview in a
  fresh browser): set `experiment_tags()` on the experiment before printing `runs_url()`.
* Column keys are the UI's canonical keys, `<type>.` + backquoted name (main.*.js:
  `I=(e,t)=>e+".`"+t+"`"`, types "attributes" / "params" / "metrics" / "tags"), e.g.
  "metrics.`binary/test/log_px`", "tags.`likelihood`"; `orderByKey` uses the same spelling (it is also the
  search API's order_by). `Run Name` and `Created` are always shown (pinned); the run's status is the icon
  in the `Created` cell (there is no separate status column in 3.17.2).
* Charts: a `LINE` chart in `compareRunCharts` takes several metrics in `selectedMetricKeys` (main.*.js:
  class with `this.type=c.LINE,...,this.selectedMetricKeys=void 0`), so train and validation ELBO can share
  one chart; the UI still adds its own one-metric charts for metrics no chart names in `metricKey`
  (`updateChartAndSectionConfigs`). Open it with `runs_url(..., mode="CHART")`.
* Filter. A saved view's `searchFilter` is the runs search's filter string (MLflow's search syntax: `IS
  NULL` on a tag included), shown in the UI's search box and applied to the table and every chart of the
  view. The parallel coordinates have views of their own (`runs_url(..., mode="PARALLEL", measurement=m)`),
  one per measurement (data source, test set, K): each filtered to the comparable runs of that measurement
  (measurement_filter), since charts have no filter of their own and one log p(x) axis would otherwise
  hold a K = 100 estimate beside a K = 5000 one.
"""

from __future__ import annotations

import hashlib
import json
import re
from urllib.parse import urlencode

from vaerepro.compare import UNRECORDED, Measurement, measurement_text
from vaerepro.likelihoods import DATA_SPACES, REGISTRY
from vaerepro.tracking.names import CONVERGED_TAG, K_TAG, SPACES, STALE_TAG, TEST_SET_TAG

# Prefix of the experiment tag that holds a saved/shared view (main.*.js: `$="mlflow.sharedViewState."`).
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
# URL parameter naming that tag's suffix (main.*.js: `U="viewStateShareKey"`).
SHARE_KEY_PARAM = "viewStateShareKey"
# The saved views, by the name each has on the runs tab's "Views" button and in its menu of saved views:
# "runs", the table and the ELBO charts; "parallel", the parallel coordinates of one measurement's comparable
# runs, its name followed by the measurement's (view_name).
VIEW_NAMES = {"runs": "vaerepro: compare runs", "parallel": "vaerepro: latent size × likelihood"}
# The runs a parallel-coordinates view may draw (measurement_filter keeps those of its measurement): those
# whose numbers the report's comparison sets side by side (report_comparison.not_a_result): runs with numbers
# of their own (a data_space tag; a sweep's parent run has none), FINISHED, and of the weights the run holds
# now (no STALE_TAG). A chart takes each run's latest value of a metric, and MLflow cannot delete one, so a
# resumed training's earlier test numbers stay there until it is evaluated again. The filter is this view's
# own, shown in the UI's search box: in the "runs" view it would hide a resumed training's curve from the ELBO
# charts while it trains.
COMPARABLE_FILTER = (
    f"attributes.status = 'FINISHED' AND tags.`{STALE_TAG}` IS NULL AND tags.`data_space` IS NOT NULL"
)
# The tags of a run that say what its log p(x) measured (compare.measurement): data source, test set, K.
MEASUREMENT_FILTER_TAGS = ("source", TEST_SET_TAG, K_TAG)
_FILTER_VALUE = re.compile(r"^[A-Za-z0-9_.-]+$")


def filterable(measurement: Measurement) -> bool:
    """Whether a view can select `measurement`'s runs: all three recorded, as the evaluation tags them
    (plain names, hex digits and a whole K) that need no quoting in a search filter."""
    return all(v != UNRECORDED and _FILTER_VALUE.match(v) for v in measurement) and measurement[2].isdigit()


def measurement_filter(measurement: Measurement) -> str:
    """The runs one parallel-coordinates view draws: the comparable ones (COMPARABLE_FILTER) whose log p(x)
    is this measurement (compare.measurement: data source, test set, K), e.g. `... AND tags.`source` =
    'mnist5k' AND tags.`vaerepro.test_set` = '3f2a9c1b0d4e' AND tags.`vaerepro.eval.num_samples` = '1000'`.
    An estimate with fewer importance samples is lower in expectation, and another test set is other
    images: neither shares a log p(x) axis with this one. Runs that did not record all three (evaluated
    before the tags existed) are in no such view; the runs table shows them."""
    if not filterable(measurement):
        raise ValueError(f"a measurement view needs recorded plain values, not {measurement!r}")
    where = " AND ".join(
        f"tags.`{tag}` = '{value}'" for tag, value in zip(MEASUREMENT_FILTER_TAGS, measurement, strict=True)
    )
    return f"{COMPARABLE_FILTER} AND {where}"


def view_name(view: str, measurement: Measurement | None = None) -> str:
    """The name of saved view `view` in the UI's Views menu, e.g. 'vaerepro: latent size × likelihood
    (data mnist5k, test set 3f2a9c1b0d4e, K = 1000)'."""
    name = VIEW_NAMES[view]
    return name if measurement is None else f"{name} ({measurement_text(measurement)})"


# runs_url's modes: (the UI's compareRunsMode, the view it opens)
MODES = {"TABLE": ("TABLE", "runs"), "CHART": ("CHART", "runs"), "PARALLEL": ("CHART", "parallel")}
# MLflow's limit on an experiment tag's value (mlflow/utils/validation.py MAX_EXPERIMENT_TAG_VAL_LENGTH),
# and the UI's on a saved view's envelope (5439.*.chunk.js: `if(o.length>2e4)` "This view is too large").
MAX_TAG_VALUE = 20000


_COLUMN_TYPES = ("attributes", "params", "metrics", "tags")
_CANONICAL = re.compile(r"^(attributes|params|metrics|tags)\.`([^`]+)`$")


def column(kind: str, name: str) -> str:
    """The UI's canonical key of a column: kind.`name` (main.*.js `I=(e,t)=>e+".`"+t+"`"`)."""
    if kind not in _COLUMN_TYPES:
        raise ValueError(f"column kind must be one of {_COLUMN_TYPES}, not {kind!r}")
    if not name or "`" in name:
        raise ValueError(f"a column name must be non-empty and free of backquotes: {name!r}")
    return f"{kind}.`{name}`"


def metric_column(name: str) -> str:
    """'binary/test/log_px' -> 'metrics.`binary/test/log_px`'."""
    return column("metrics", name)


def tag_column(name: str) -> str:
    """'likelihood' -> 'tags.`likelihood`'."""
    return column("tags", name)


# What a run's log p(x) measured (compare.measurement) and whether it converged: the tags the evaluation sets.
# One log_px column holds every run of a space, a K=1000 estimate beside its K=5000 re-evaluation or an
# unconverged one; without these a sort by it ranks them.
MEASUREMENT_TAGS = (K_TAG, TEST_SET_TAG, CONVERGED_TAG)

# The columns a user comparing VAEs wants without picking any: how each run was set up, then its results.
# An improper run (a Bernoulli on grey levels) has data_space `continuous`: its `improper` tag beside it says
# that it is no density (its numbers are improper/..., in no column of a data space). A run whose numbers are
# of weights its training has since replaced says so in its STALE_TAG column, empty for every other run.
DEFAULT_COLUMNS: list[str] = [
    tag_column("likelihood"),
    tag_column("latent_dim"),
    tag_column("data_space"),
    tag_column("improper"),
    *(tag_column(t) for t in MEASUREMENT_TAGS),
    tag_column(STALE_TAG),
    *(metric_column(f"{space}/test/{m}") for space in DATA_SPACES for m in ("log_px", "log_px_se", "elbo")),
    metric_column("test/knn_accuracy"),
]
DEFAULT_ORDER_BY: str = metric_column("test/knn_accuracy")


def _check_columns(columns: list[str], order_by: str | None) -> None:
    for key in [*columns, *([order_by] if order_by is not None else [])]:
        if not _CANONICAL.match(key):
            raise ValueError(
                f"{key!r} is not a UI column key; write e.g. metric_column('binary/test/log_px') "
                '-> "metrics.`binary/test/log_px`"'
            )


def _width(key: str) -> int:
    """A column width (px) that shows the whole header, e.g. 'continuous/test/log_px_se', and the whole of
    each likelihood's name, e.g. 'continuous_bernoulli' (the stale column: the start of its text, "numbers
    of replaced weights: ...", evaluations.stale_reason). 6.5 px a character of the UI's 13 px font, 36 px
    of padding and sort icon."""
    text = len(_CANONICAL.match(key).group(2))
    if key == tag_column("likelihood"):
        text = max(text, *(len(name) for name in REGISTRY))
    return max(90, round(6.5 * text) + 36, 200 if key == tag_column(STALE_TAG) else 0)


def elbo_charts(spaces: tuple[str, ...] = SPACES) -> tuple[list[dict], list[dict]]:
    """`compareRunCharts` and `compareRunSections` with one line chart per space: `{space}/train/elbo` and
    `{space}/val/elbo` against step (= epoch), titled by the UI "binary/train/elbo vs binary/val/elbo"
    (9867.*.chunk.js: a multi-metric chart's title is `selectedMetricKeys.join(" vs ")`, `displayName` is
    not shown). The fields are those of the UI's LINE card config (main.*.js, the class setting
    `this.type=c.LINE`). Charts of spaces no run has are hidden (`hideEmptyCharts`).

    The UI adds a one-metric chart for every metric that no chart names in `metricKey`
    (main.*.js `updateChartAndSectionConfigs`), deleted ones included; a deleted placeholder per
    `{space}/val/elbo` keeps it from drawing the validation curve a second time on its own."""
    section = "vaerepro-elbo"

    def line(uuid: str, metric_key: str, keys: list[str], deleted: bool) -> dict:
        return {
            "uuid": uuid,
            "type": "LINE",
            "metricSectionId": section,
            "metricKey": metric_key,
            "selectedMetricKeys": keys,
            "xAxisKey": "step",
            "selectedXAxisMetricKey": "",
            "xAxisScaleType": "linear",
            "scaleType": "linear",
            "yAxisKey": "metric",
            "yAxisExpressions": [],
            "range": {},
            "lineSmoothness": 0,
            "ignoreOutliers": False,
            "useGlobalXaxisKey": True,
            "useGlobalLineSmoothing": True,
            "runsCountToCompare": 10,
            "deleted": deleted,
            "isGenerated": False,
        }

    charts = []
    for space in spaces:
        train, val = f"{space}/train/elbo", f"{space}/val/elbo"
        charts.append(line(f"vaerepro-elbo-{space}", train, [train, val], deleted=False))
        charts.append(line(f"vaerepro-elbo-{space}-val", val, [val], deleted=True))
    sections = [
        {
            "uuid": section,
            "name": "ELBO per epoch (train vs val)",
            "display": True,
            "columns": 2,  # one chart per data space present: two a row, each wider than at three
            "isReordered": False,
            "deleted": False,
            "isGenerated": False,
        }
    ]
    return charts, sections


# The axes of the parallel-coordinates charts: what a sweep varies (params), then what it is judged by.
PARALLEL_PARAMS = ["model.latent_dim", "likelihood.name"]


def parallel_charts(spaces: tuple[str, ...] = SPACES) -> tuple[list[dict], list[dict]]:
    """Parallel coordinates of latent size × likelihood against log p(x) and kNN accuracy, one chart per data
    space: log p(x) is `{space}/test/log_px`, so a chart only draws the runs of its own space (runs without
    one of a chart's metrics are left out by the UI) and never puts a pmf and a density on one axis. The
    fields are those of the UI's PARALLEL card config (main.*.js, the class setting `this.type=c.PARALLEL,
    this.selectedParams=[],this.selectedMetrics=[],this.showAllRuns=!1`); string params such as the
    likelihood's name are drawn as categorical axes. A section's `columns` is the number of its charts a row
    (4751.*.chunk.js: `t.columns ?? 3`, what the UI stores when a user changes a section's layout)."""
    section = "vaerepro-parallel"
    charts = [
        {
            "uuid": f"vaerepro-parallel-{space}",
            "type": "PARALLEL",
            "metricSectionId": section,
            "selectedParams": list(PARALLEL_PARAMS),
            "selectedMetrics": [f"{space}/test/log_px", "test/knn_accuracy"],
            "showAllRuns": False,
            "runsCountToCompare": 100,
            "deleted": False,
            "isGenerated": False,
        }
        for space in spaces
    ]
    sections = [
        {
            "uuid": section,
            "name": "Latent size × likelihood (parallel coordinates, one data space each)",
            "display": True,
            # a chart the section's width: its four axes and their labels need it (at the UI's default of
            # three a row, a chart beside the assistant panel is ~170 px wide and the labels overlap)
            "columns": 1,
            "isReordered": False,
            "deleted": False,
            "isGenerated": False,
        }
    ]
    return charts, sections


def view_state(
    columns: list[str],
    order_by: str | None,
    ascending: bool,
    view: str = "runs",
    measurement: Measurement | None = None,
) -> dict:
    """The saved view `view` (VIEW_NAMES): sort and filter (search facets) and table/chart state, as the
    UI's saved views hold them. Its charts: "runs", the ELBO per epoch; "parallel", the parallel
    coordinates, drawing only the runs of `measurement` that can be compared (measurement_filter)."""
    _check_columns(columns, order_by)
    if view not in VIEW_NAMES:
        raise ValueError(f"view must be one of {sorted(VIEW_NAMES)}, not {view!r}")
    if (view == "parallel") != (measurement is not None):
        raise ValueError("the parallel view, and only it, is of one measurement")
    charts, sections = elbo_charts() if view == "runs" else parallel_charts()
    state: dict = {
        # search facets (3793.*.chunk.js `["searchFilter","orderByKey","orderByAsc",...]`)
        **({"orderByKey": order_by, "orderByAsc": bool(ascending)} if order_by is not None else {}),
        **({"searchFilter": measurement_filter(measurement)} if measurement is not None else {}),
        # UI state (main.*.js `["selectedColumns","columnOrder","columnWidths",...]`)
        "selectedColumns": list(columns),
        # the order given, tags before metrics (the grid's default puts the Metrics group first)
        "columnOrder": list(columns),
        "columnWidths": {key: _width(key) for key in columns},
        "compareRunCharts": charts,
        "compareRunSections": sections,
        "isAccordionReordered": True,  # keep the view's section first instead of sorting sections by name
        "hideEmptyCharts": True,
    }
    return state


def view_key(
    columns: list[str],
    order_by: str | None,
    ascending: bool,
    view: str = "runs",
    measurement: Measurement | None = None,
) -> str:
    """The share key: a digest of the view, so the same arguments give the same tag and link, and a changed
    view gets a new tag while links printed earlier keep opening the view they were printed with."""
    state = view_state(columns, order_by, ascending, view, measurement)
    blob = json.dumps(state, sort_keys=True, separators=(",", ":"))
    return "vaerepro-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def experiment_tags(
    columns: list[str] | None = None,
    order_by: str | None = DEFAULT_ORDER_BY,
    ascending: bool = False,
    measurements: tuple[Measurement, ...] | list[Measurement] = (),
) -> dict[str, str]:
    """The experiment tags `runs_url` needs: `{"mlflow.sharedViewState.<key>": <saved-view envelope>}`, one
    for the "runs" view and one "parallel" view per measurement in `measurements`.

    Set them on the experiment (e.g. `MlflowClient.set_experiment_tag`, idempotent: same arguments, same
    tag) before printing the link. The envelope is what the UI's "Save view" writes (3448.*.chunk.js:
    `JSON.stringify({name:e,createdAt:i,updatedAt:a,state:t})`); createdAt is fixed at 0 so that re-setting
    the tag never changes it. No other experiment tag is needed: `mlflow.experimentKind` is not read by the
    3.17.2 UI (see the module docstring)."""
    columns = DEFAULT_COLUMNS if columns is None else columns
    tags = {}
    for view, measurement in [("runs", None), *(("parallel", m) for m in measurements)]:
        state = json.dumps(
            view_state(columns, order_by, ascending, view, measurement), sort_keys=True, separators=(",", ":")
        )
        name = view_name(view, measurement)
        envelope = json.dumps({"name": name, "createdAt": 0, "updatedAt": 0, "state": state})
        if len(envelope) > MAX_TAG_VALUE:
            raise ValueError(f"the saved view is {len(envelope)} characters; MLflow allows {MAX_TAG_VALUE}")
        tags[SHARED_VIEW_TAG_PREFIX + view_key(columns, order_by, ascending, view, measurement)] = envelope
    return tags


def withdrawn(key: str, value: str) -> bool:
    """Whether experiment tag `key` is a saved view that vaerepro made and no longer offers: the parallel
    coordinates of every measurement at once (one log p(x) axis for K = 100 and K = 5000), which stores
    made before the views were per measurement hold under the bare name VIEW_NAMES["parallel"]. Views a
    user saved are kept: their keys are the UI's own, not `vaerepro-...`."""
    if not key.startswith(SHARED_VIEW_TAG_PREFIX + "vaerepro-"):
        return False
    try:
        name = json.loads(value).get("name")
    except (ValueError, AttributeError):
        return False
    return name == VIEW_NAMES["parallel"]


def runs_url(
    base_url: str,
    experiment_id: str,
    columns: list[str] | None = None,
    order_by: str | None = DEFAULT_ORDER_BY,
    ascending: bool = False,
    *,
    mode: str = "TABLE",
    measurement: Measurement | None = None,
) -> str:
    """The link that opens experiment `experiment_id`'s runs table (mode="TABLE"), its chart view of the ELBO
    per epoch ("CHART"), or the parallel coordinates of `measurement`'s comparable runs ("PARALLEL": the
    view "parallel", filtered by measurement_filter), with `columns` shown and sorted by `order_by`, e.g.

        http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning&compareRunsMode=TABLE
            &viewStateShareKey=vaerepro-0123456789abcdef

    `columns`/`order_by` are UI column keys (`metric_column(...)`, `tag_column(...)`); the same arguments must
    have been given to `experiment_tags()` (with `measurement` among its `measurements`) and its tags set
    on the experiment. `base_url` is the server's address as the browser reaches it (with any path prefix,
    without `#`)."""
    columns = DEFAULT_COLUMNS if columns is None else columns
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, not {mode!r}")
    compare_mode, view = MODES[mode]
    if not str(experiment_id).isdigit():
        raise ValueError(f"an MLflow experiment id is a number, not {experiment_id!r}")
    query = urlencode(
        {
            "workflowType": "machine_learning",  # main.*.js `e.get("workflowType")`: the ML navigation
            "compareRunsMode": compare_mode,  # `e.get("compareRunsMode")||"TABLE"`
            # columns, sort, filter, charts: from the tag
            SHARE_KEY_PARAM: view_key(columns, order_by, ascending, view, measurement),
        }
    )
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"
