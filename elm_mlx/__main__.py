"""python -m elm_mlx COMMAND ...: the same as the elm-mlx console command."""

from .commands import run

run()
