"""The ``gptoss-mlx`` command's entry point. Importing the commands loads MLX, the model and
Textual (a second or two): a Ctrl-C then ends the program as it does later, without a
traceback of the imports."""

import sys


def main() -> int:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return run()


if __name__ == "__main__":
    sys.exit(main())
