"""Convert a LLaVA checkpoint to MLX. See `python convert.py --help`."""

from mlx_llava.cli.convert import main

if __name__ == "__main__":
    main()
