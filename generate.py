"""Ask a LLaVA model about a picture. See `python generate.py --help`."""

from mlx_llava.cli.generate import main

if __name__ == "__main__":
    main()
