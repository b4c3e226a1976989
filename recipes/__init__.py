"""recipes — one YAML per recipe and the stage runner behind `nmt recipe` (runner.py; the recipe file in recipe.py,
the run folder and its state in run.py, the stages in stages.py, the report in summary.py).

Recipes sit at the top of the stack: they call `data`, `nmt` and `serving` functions and are imported by nothing
but the command line.
"""
