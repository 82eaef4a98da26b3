"""Caption every picture of a folder into JSONL. See `python caption.py --help`."""

from mlx_llava.cli.caption import main

if __name__ == "__main__":
    main()
