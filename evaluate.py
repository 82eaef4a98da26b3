"""Evaluate a LLaVA model on a question file. See `python evaluate.py --help`."""

from mlx_llava.cli.evaluate import main

if __name__ == "__main__":
    main()
