"""recipes — one YAML per recipe and the stage runner behind `nmt recipe` (recipes/runner.py).

Recipes sit at the top of the stack: they call `data`, `nmt` and `serving` functions and are imported by nothing
but the command line.
"""
