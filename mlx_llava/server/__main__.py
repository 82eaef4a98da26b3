"""`python -m mlx_llava.server`: see `python -m mlx_llava.server --help`."""

from ..cli.server import main

if __name__ == "__main__":
    main(prog="python -m mlx_llava.server")
