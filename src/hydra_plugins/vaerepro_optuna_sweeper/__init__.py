"""Hydra sweeper `vaerepro_optuna`: Optuna (>= 4) studies whose trials are `vaerepro run` processes.

`hydra_plugins` is a namespace package (no __init__.py): Hydra imports every public module under it at
start-up to find plugins, so these modules stay light; the work is in `vaerepro.sweep`, imported when a
sweep starts.
"""
