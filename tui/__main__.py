"""python -m gptoss_mlx.tui [--model M] ... (the same as gptoss-mlx tui)."""

import sys

from gptoss_mlx.cli import main

sys.exit(main(["tui", *sys.argv[1:]]))
