"""Train a LLaVA model (pretrain or finetune stage). See `python train.py --help`."""

from mlx_llava.cli.train import main

if __name__ == "__main__":
    main()
