"""The link vaerepro prints opens the MLflow UI's runs table with the comparison columns, in a real browser.

A temporary sqlite store gets an experiment with `mlflow_ui.experiment_tags()` and four runs; `mlflow ui`
serves it; headless Chromium (driven over the DevTools protocol on --remote-debugging-pipe: stdlib only)
opens `mlflow_ui.runs_url(...)` and the test polls the live DOM until the grid is drawn, then reads it.
Each test leaves <name>.html and a screenshot <name>.png in its tmp_path for a person to look at (`-s`
prints where). Skipped where Chromium is not installed (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import wait_for_health
from vaerepro.tracking import ui as mlflow_ui
from vaerepro.tracking.evaluations import stale_reason

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
# ag-grid renders only the columns in view: a window wide enough for all of them, MLflow's assistant panel
# (open on a browser's first visit to a local server) included.
WINDOW = "3700,1000"

# What each run's log p(x) measured, as the evaluation tags it (tracking.runs), and that measurement as
# compare.measurement gives it (data source, test set, K).
MEASURED = {
    "source": "mnist5k",
    "vaerepro.eval.num_samples": "1000",
    "vaerepro.test_set": "3f2a9c1b0d4e",
    "vaerepro.converged": "true",
}
MEASUREMENT = ("mnist5k", "3f2a9c1b0d4e", "1000")
AT_K5000 = ("mnist5k", "3f2a9c1b0d4e", "5000")
# name, tags, test metrics, space of its per-epoch curves, final status. Created in this order, so the
# UI's default sort (newest first) would list them backwards; sorted by test/knn_accuracy they read in order.
RUNS = [
    (
        "bern-z8",
        {
            "likelihood": "bernoulli",
            "latent_dim": "8",
            "data_space": "binary",
            "improper": "false",
            **MEASURED,
        },
        {
            "binary/test/log_px": -91.234,
            "binary/test/log_px_se": 0.0517,
            "binary/test/elbo": -95.5,
            "test/knn_accuracy": 0.934,
        },
        "binary",
        "FINISHED",
    ),
    (
        "cb-z16",
        {
            "likelihood": "continuous_bernoulli",  # the longest name, which must show whole
            "latent_dim": "16",
            "data_space": "continuous",
            "improper": "false",
            **MEASURED,
            # numbers of weights its training replaced since (label_stale_numbers): said in its row
            "vaerepro.stale": stale_reason("3f2a9c1b0d4e", "0d4e3f2a9c1b"),
        },
        {
            "continuous/test/log_px": 812.345,
            "continuous/test/log_px_se": 1.234,
            "continuous/test/elbo": 800.1,
            "test/knn_accuracy": 0.912,
        },
        "continuous",
        "FINISHED",
    ),
    (
        "bern-z4-k5000",  # another measurement: K = 5000
        {
            "likelihood": "bernoulli",
            "latent_dim": "4",
            "data_space": "binary",
            "improper": "false",
            **MEASURED,
            "vaerepro.eval.num_samples": "5000",
        },
        {
            "binary/test/log_px": -93.5,
            "binary/test/log_px_se": 0.0612,
            "binary/test/elbo": -97.25,
            "test/knn_accuracy": 0.701,
        },
        "binary",
        "FINISHED",
    ),
    (
        "bern-z2-crashed",
        {
            "likelihood": "bernoulli",
            "latent_dim": "2",
            "data_space": "binary",
            "improper": "false",
            **MEASURED,
        },
        {
            "binary/test/log_px": -120.5,
            "binary/test/log_px_se": 0.25,
            "binary/test/elbo": -125.75,
            "test/knn_accuracy": 0.523,
        },
        "binary",
        "FAILED",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_store(tmp: Path) -> tuple[str, str]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    uri = f"sqlite:///{(tmp / 'mlflow.db').resolve()}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(
        "vaerepro-ui",
        artifact_location=(tmp / "artifacts").resolve().as_uri(),
        tags=mlflow_ui.experiment_tags(measurements=[MEASUREMENT, AT_K5000]),
    )
    for i, (name, tags, metrics, space, status) in enumerate(RUNS):
        run = client.create_run(exp_id, run_name=name, tags=tags, start_time=1_700_000_000_000 + 60_000 * i)
        now = int(time.time() * 1000)
        curves = [
            Metric(
                f"{space}/{split}/elbo", -100.0 - 10 * i + epoch - (3 if split == "val" else 0), now, epoch
            )
            for epoch in range(4)
            for split in ("train", "val")
        ]
        params = [Param("model.latent_dim", tags["latent_dim"]), Param("likelihood.name", tags["likelihood"])]
        client.log_batch(
            run.info.run_id,
            metrics=[*(Metric(k, v, now, 0) for k, v in metrics.items()), *curves],
            params=params,
        )
        client.set_terminated(run.info.run_id, status=status)
    return uri, exp_id


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("needs Chromium on PATH (Debian: apt-get install chromium) to render the MLflow UI")
    tmp_path = tmp_path_factory.mktemp("mlflow-ui")
    uri, exp_id = _make_store(tmp_path)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path,  # its default artifact root, ./mlartifacts, stays in the temporary directory
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: uvicorn and the job runner end with it
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, "mlflow ui")
        yield base, exp_id
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            # what is left of its group (the job runner's huey consumers outlive a SIGTERM by seconds)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


class _Grid(HTMLParser):
    """The ag-grid of a dumped page: header texts and, per row index, each cell's text and markup."""

    VOID = {
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "source",
        "track",
        "wbr",
    }

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.headers: dict[str, str] = {}  # col-id -> header text
        self.position: dict[str, int] = {}  # col-id -> aria-colindex of its header: the column's place
        self.cells: dict[int, dict[str, str]] = {}  # row-index -> col-id -> text
        self.markup: dict[int, dict[str, str]] = {}  # row-index -> col-id -> the cell's tags, flattened
        self.title = ""
        self.text: list[str] = []
        self._stack: list[tuple[str, dict]] = []
        self._row: list[int | None] = []
        self._open: list[tuple[int, str, str | None, int | None]] = []  # (depth, kind, col-id, row)
        self._buf: dict[int, list[str]] = {}
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for _, _, col, row in self._open:
            if row is not None:
                self.markup.setdefault(row, {}).setdefault(col, "")
                self.markup[row][col] += f"<{tag} {' '.join(f'{k}={v}' for k, v in attrs)}>"
        if tag in self.VOID:
            return
        depth = len(self._stack)
        self._stack.append((tag, a))
        row = self._row[-1] if self._row else None
        if a.get("role") == "row" and "row-index" in a:
            row = int(a["row-index"])
        self._row.append(row)
        if a.get("role") in ("gridcell", "columnheader") and a.get("col-id"):
            kind = "cell" if a["role"] == "gridcell" else "header"
            self._open.append((depth, kind, a["col-id"], row if kind == "cell" else None))
            if kind == "header" and a.get("aria-colindex", "").isdigit():
                self.position[a["col-id"]] = int(a["aria-colindex"])
            self._buf[depth] = []
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        if tag in self.VOID or not self._stack:
            return
        self._stack.pop()
        self._row.pop()
        depth = len(self._stack)
        if self._open and self._open[-1][0] == depth:
            _, kind, col, row = self._open.pop()
            text = " ".join("".join(self._buf.pop(depth)).split())
            if kind == "header":
                self.headers[col] = text
            elif row is not None:
                self.cells.setdefault(row, {})[col] = text
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        self.text.append(data)
        for depth in self._buf:
            self._buf[depth].append(data)


class _Chromium:
    """Headless Chromium driven over the DevTools protocol on --remote-debugging-pipe (fds 3 and 4, JSON
    messages ended by NUL), so the stdlib suffices: no websocket client, no Playwright."""

    def __init__(self, url: str, profile: Path, window: str = WINDOW):
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
        args += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
        args += ["--remote-debugging-pipe", f"--user-data-dir={profile}", f"--window-size={window}", url]
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            self.pid = os.posix_spawn(
                CHROMIUM,
                args,
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, cmd_r, 3),
                    (os.POSIX_SPAWN_DUP2, res_w, 4),
                    (os.POSIX_SPAWN_DUP2, null, 1),
                    (os.POSIX_SPAWN_DUP2, null, 2),
                ],
                setsid=True,  # its own process group: the renderer and zygote processes end with it
            )
        finally:
            for fd in (cmd_r, res_w, null):
                os.close(fd)
        self._buf = b""
        self._id = 0
        self._session = None

    def call(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if self._session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self._session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:  # anything else is an event
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._res_r], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer {method}")
            chunk = os.read(self._res_r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buf += chunk

    def attach(self) -> None:
        (page,) = [t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"]
        self._session = self.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})[
            "sessionId"
        ]

    def html(self) -> str:
        expr = {"expression": "document.documentElement.outerHTML", "returnByValue": True}
        return self.call("Runtime.evaluate", expr)["result"].get("value", "")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        for _ in range(50):
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        try:
            os.killpg(self.pid, signal.SIGKILL)  # what is left of its group
        except ProcessLookupError:
            pass
        os.close(self._cmd_w)
        os.close(self._res_r)


def _render(
    url: str, tmp: Path, name: str, ready, timeout: float = 45, window: str = WINDOW, probe: str = "null"
) -> tuple[_Grid, Path]:
    """Open `url` in a fresh headless Chromium profile and read its DOM until `ready(grid)` (or `timeout`
    seconds); the parsed DOM, saved as <name>.html, and a screenshot of the page, <name>.png. `probe`, a
    JavaScript expression evaluated on the drawn page (for what the DOM's text does not say, such as
    layout), gives `grid.probe`."""
    shot = tmp / f"{name}.png"
    browser = _Chromium(url, tmp / f"profile-{name}", window)
    try:
        browser.attach()
        deadline = time.monotonic() + timeout
        while True:
            try:
                html = browser.html()
            except RuntimeError:  # between documents while the page loads
                html = ""
            grid = _Grid()
            grid.feed(html)
            if ready(grid) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        time.sleep(0.5)  # let the last paint land before the screenshot
        expr = {"expression": probe, "returnByValue": True}
        grid.probe = browser.call("Runtime.evaluate", expr)["result"].get("value")
        browser.screenshot(shot)
        (tmp / f"{name}.html").write_text(html)
    finally:
        browser.close()
    return grid, shot


# The grid's cells whose text the UI cuts with an ellipsis (wider than the column): [col-id, text] each.
CUT_CELLS = """[...document.querySelectorAll('.ag-cell')]
    .filter(c => { const v = c.querySelector('.ag-cell-value'); return v && v.scrollWidth > v.clientWidth; })
    .map(c => [c.getAttribute('col-id'), c.textContent])"""


def _charts_a_row(html: str, title: str) -> int:
    """How many charts a row the UI lays out in the section holding the chart titled `title`: its cards'
    grid (`data-testid="draggable-chart-cards-grid"`, `grid-template-columns: repeat(N, 1fr)`)."""
    grids = re.findall(
        r'data-testid="draggable-chart-cards-grid"[^>]*grid-template-columns: repeat\((\d+), 1fr\)',
        html[: html.index(title)],
    )
    assert grids, f"no chart grid before {title!r}"
    return int(grids[-1])


def test_runs_url_opens_the_runs_table_with_the_comparison_columns(ui_server, tmp_path):
    base, exp_id = ui_server
    url = mlflow_ui.runs_url(base, exp_id, mlflow_ui.DEFAULT_COLUMNS, mlflow_ui.DEFAULT_ORDER_BY, False)

    def ready(g: _Grid) -> bool:  # all rows, and the saved view's columns in their places
        places = [g.position.get(key, 0) for key in mlflow_ui.DEFAULT_COLUMNS]
        return len(g.cells) >= len(RUNS) and all(places) and places == sorted(places)

    grid, shot = _render(url, tmp_path, "runs", ready, probe=CUT_CELLS)
    print(f"\n{url}\nscreenshot: {shot}")

    # the runs table of the experiment, in the "Model training" navigation, not GenAI's Overview/Traces
    assert grid.title.startswith("Runs - "), grid.title
    page = " ".join(" ".join(grid.text).split())
    assert "Sort: test/knn_accuracy" in page
    assert "Overview" not in page and "Evaluation runs" not in page

    # every comparison column is shown, under the metric's or tag's own name
    assert grid.headers.get("attributes.`Run Name`") == "Run Name"
    assert grid.headers.get("runDateAndNestInfo") == "Created"
    for key in mlflow_ui.DEFAULT_COLUMNS:
        assert grid.headers.get(key) == key.split("`")[1], (key, grid.headers)
    # in the order given, left to right: the tags (how a run was set up), then its numbers
    places = [grid.position[key] for key in mlflow_ui.DEFAULT_COLUMNS]
    assert places == sorted(places), dict(zip(mlflow_ui.DEFAULT_COLUMNS, places, strict=True))

    # one row per run, best test/knn_accuracy first: sorted descending, not the default newest-first
    rows = [grid.cells[i] for i in sorted(grid.cells)]
    # (a run name cell starts with the hidden text of its colour picker, e.g. "#0e538b")
    names = [re.sub(r"^#[0-9a-f]{6}", "", r["attributes.`Run Name`"]) for r in rows]
    assert names == [name for name, *_ in RUNS]
    for row, (name, tags, metrics, _, _) in zip(rows, RUNS, strict=True):
        for tag, value in tags.items():
            if tag != "source":  # not a column: the test set's digest tells sources apart
                assert row[mlflow_ui.tag_column(tag)] == value, (name, tag, row)
        for key in mlflow_ui.DEFAULT_COLUMNS:
            if key.startswith("metrics."):
                metric = key.split("`")[1]
                shown = row[key]
                if metric in metrics:
                    assert float(shown) == pytest.approx(metrics[metric]), (name, metric, shown)
                else:  # the other data space's numbers: no value, never a number on a shared axis
                    assert shown == "-", (name, metric, shown)

    # the run's status is the icon in the Created cell: the crashed run's differs from the finished ones'
    created = [grid.markup[i]["runDateAndNestInfo"] for i in sorted(grid.markup)]
    assert all("<svg" in cell for cell in created), created
    icons = [cell[cell.index("<svg") :] for cell in created]
    assert icons[0] == icons[1] == icons[2] != icons[3]

    # each cell of a comparison column shows its whole text ("continuous_bernoulli", not "continuous_…"),
    # but the stale column's, of which the width shows the start (and which shows that the probe sees a cut)
    cut = [(col, text) for col, text in grid.probe if col in mlflow_ui.DEFAULT_COLUMNS]
    assert cut == [(mlflow_ui.tag_column("vaerepro.stale"), stale_reason("3f2a9c1b0d4e", "0d4e3f2a9c1b"))]


def test_chart_view_draws_train_and_val_elbo_in_one_chart(ui_server, tmp_path):
    base, exp_id = ui_server
    cols, order = mlflow_ui.DEFAULT_COLUMNS, mlflow_ui.DEFAULT_ORDER_BY
    url = mlflow_ui.runs_url(base, exp_id, cols, order, False, mode="CHART")
    titles = [f"{space}/train/elbo vs {space}/val/elbo" for space in ("binary", "continuous")]
    legend = [
        f"{name} (binary/{split}/elbo)"
        for name in ("bern-z8", "bern-z2-crashed")
        for split in ("train", "val")
    ]
    legend_continuous = [f"cb-z16 (continuous/{split}/elbo)" for split in ("train", "val")]

    def ready(g: _Grid) -> bool:
        text = " ".join(g.text)
        return all(t in text for t in titles + legend + legend_continuous)

    # the charts fetch each run's metric history and draw after the table: wait for the plots' legends
    grid, shot = _render(url, tmp_path, "charts", ready)
    print(f"\n{url}\nscreenshot: {shot}")
    page = " ".join(" ".join(grid.text).split())
    # the preset section first, holding the binary and the continuous chart (no run has improper numbers:
    # that one is hidden), and no chart of a validation or training curve alone; the parallel coordinates
    # are the third link's (a resumed training, stale, still shows its curve here)
    section = "ELBO per epoch (train vs val)"
    assert f"{section} (2)" in page, page
    assert "parallel coordinates" not in page
    assert page.index(section) < page.index(titles[0]) < page.index(titles[1]) < page.index("binary/test (3)")
    assert not any(f"{s}/{split} (" in page for s in mlflow_ui.SPACES for split in ("train", "val"))
    # one chart, both curves: its legend names the training and the validation curve of the binary runs
    binary_chart = page[page.index(titles[0]) : page.index(titles[1])]
    for entry in legend:
        assert entry in binary_chart, binary_chart
    continuous_chart = page[page.index(titles[1]) : page.index("binary/test (3)")]
    for entry in legend_continuous:
        assert entry in continuous_chart, continuous_chart
    # two a row, so the two spaces' charts are side by side and half the section wide (the UI's own is three)
    assert _charts_a_row((tmp_path / "charts.html").read_text(), titles[0]) == 2


def test_parallel_coordinates_compare_latent_size_and_likelihood_of_the_comparable_runs_only(
    ui_server, tmp_path
):
    """The third link, for the measurement K = 1000 on test set 3f2a9c1b0d4e: latent size × likelihood
    against log p(x) and kNN accuracy, one chart per data space, drawing only the runs of that measurement
    the report's comparison would set side by side. Here that is bern-z8: bern-z4-k5000's log p(x) is of
    K = 5000 (the other view's), cb-z16's numbers are of weights its training has since replaced
    (vaerepro.stale) and bern-z2-crashed FAILED; the continuous chart, left with no run, is hidden. The
    filter is in the UI's search box, for users to see."""
    base, exp_id = ui_server
    url = mlflow_ui.runs_url(base, exp_id, mode="PARALLEL", measurement=MEASUREMENT)
    section = "Latent size × likelihood (parallel coordinates, one data space each)"

    def ready(g: _Grid) -> bool:
        text = " ".join(g.text)
        return section in text and "model.latent_dim" in text and "bern-z8" in text  # the chart drawn

    grid, shot = _render(url, tmp_path, "parallel", ready, window="2800,2600")
    print(f"\n{url}\nscreenshot: {shot}")
    page = " ".join(" ".join(grid.text).split())
    assert section in page, page
    after = page[page.index(section) :]
    # the axes: what the sweep varies, then log p(x) of the chart's own space and kNN accuracy
    for axis in ("model.latent_dim", "likelihood.name", "binary/test/log_px", "test/knn_accuracy"):
        assert axis in after, (axis, after[:3000])
    assert "continuous/test/log_px" not in page  # no comparable run of that space: its chart is hidden
    assert "bern-z8" in page, page
    for left_out in ("bern-z4-k5000", "cb-z16", "bern-z2-crashed"):
        assert left_out not in page, (left_out, page)
    html = (tmp_path / "parallel.html").read_text()
    assert mlflow_ui.measurement_filter(MEASUREMENT) in unescape(html), "the filter is not in the search box"
    # each chart the section's width: its four axes' labels need it (three a row, they overlap)
    assert _charts_a_row(html, "Parallel Coordinates") == 1


def test_links_and_tags_agree():
    cols, order = mlflow_ui.DEFAULT_COLUMNS, mlflow_ui.DEFAULT_ORDER_BY
    tags = mlflow_ui.experiment_tags(cols, order, False, measurements=[MEASUREMENT, AT_K5000])
    views = {json.loads(v)["name"]: k.removeprefix(mlflow_ui.SHARED_VIEW_TAG_PREFIX) for k, v in tags.items()}
    # the Views menu: the runs view, then one parallel view per measurement, named by it
    assert list(views) == [
        "vaerepro: compare runs",
        "vaerepro: latent size × likelihood (data mnist5k, test set 3f2a9c1b0d4e, K = 1000)",
        "vaerepro: latent size × likelihood (data mnist5k, test set 3f2a9c1b0d4e, K = 5000)",
    ]
    for mode, (compare, view) in mlflow_ui.MODES.items():
        for m in [MEASUREMENT, AT_K5000] if view == "parallel" else [None]:
            url = mlflow_ui.runs_url("http://h:5000/", "7", cols, order, False, mode=mode, measurement=m)
            assert url.startswith(
                f"http://h:5000/#/experiments/7/runs?workflowType=machine_learning&compareRunsMode={compare}&"
            )
            assert url.endswith("viewStateShareKey=" + views[mlflow_ui.view_name(view, m)])
            assert "orderByKey" not in url  # a facet in the link would make the UI ignore the shared view
    assert mlflow_ui.runs_url("http://h:5000", "7", cols, order, True) != mlflow_ui.runs_url(
        "http://h:5000", "7"
    )
    with pytest.raises(ValueError, match="not a UI column key"):
        mlflow_ui.runs_url("http://h", "1", ["binary/test/log_px"], None, False)
    # a parallel view is of one measurement, recorded whole, and only it is
    with pytest.raises(ValueError, match="one measurement"):
        mlflow_ui.runs_url("http://h", "1", mode="PARALLEL")
    with pytest.raises(ValueError, match="one measurement"):
        mlflow_ui.runs_url("http://h", "1", mode="TABLE", measurement=MEASUREMENT)
    with pytest.raises(ValueError, match="recorded plain values"):
        mlflow_ui.runs_url("http://h", "1", mode="PARALLEL", measurement=("mnist5k", "unrecorded", "1000"))
    with pytest.raises(ValueError, match="recorded plain values"):  # never a quote inside the filter
        mlflow_ui.measurement_filter(("mnist5k", "3f2a' OR '1'='1", "1000"))


def test_the_table_says_what_each_log_px_measured():
    # one log_px column holds a run's K = 1000 estimate beside its K = 5000 re-evaluation (a child run) and
    # an unconverged K = 10 one: the table shows each run's K, test set and convergence verdict beside them
    from vaerepro.tracking.names import K_TAG, TEST_SET_TAG

    cols = mlflow_ui.DEFAULT_COLUMNS
    for tag in (K_TAG, TEST_SET_TAG, "vaerepro.converged"):
        assert mlflow_ui.tag_column(tag) in cols, tag
        # before the numbers they qualify
        assert cols.index(mlflow_ui.tag_column(tag)) < cols.index(
            mlflow_ui.metric_column("binary/test/log_px")
        )
    for envelope in mlflow_ui.experiment_tags().values():  # the table of each saved view
        state = json.loads(json.loads(envelope)["state"])
        assert state["selectedColumns"] == state["columnOrder"] == cols


def test_the_table_says_which_runs_are_improper_beside_their_data_space():
    """A Bernoulli on grey levels is tagged data_space `continuous`: the table showed `continuous` beside it
    and no column saying that it is no density (its numbers, improper/test/..., in none of the columns)."""
    cols = mlflow_ui.DEFAULT_COLUMNS
    improper = mlflow_ui.tag_column("improper")
    assert cols.index(mlflow_ui.tag_column("data_space")) + 1 == cols.index(improper)
    assert not any("improper/" in key for key in cols)
