"""The papers' reproductions: `vaerepro reproduce --list | NAME`.

- presets.py    the papers' presets, cited: settings as overrides of conf/, published numbers, what the
                schema lacks; `--list` and the command line (`main`)
- judge.py      what a preset and a published number are, and how a run is judged against one: the
                aggregate across seeds, the verdict, the departures from the protocol, the time estimate
- reproduce.py  a reproduction run: the plan, a `vaerepro run` process per seed, the MLflow parent run
- results.py    the plain types passed from running to writing up: Plan, SeedResult, Result
- card.py       the reproduction card (Markdown and HTML) and the summary the command prints
- resumption.py what a reproduction records on disk, so that --resume goes on where it stopped

presets.py and judge.py are torch-free, so `--list` starts quickly. Nothing is imported here: importing
judge (as tracking/reproduction.py does) does not import the runner.
"""
