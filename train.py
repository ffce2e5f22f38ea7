"""Train a GPT: ``python train.py --config configs/shakespeare_char.yaml [--section.key value ...]``.

The command (LightningCLI over GPTModule and TextDataModule, the run folder, loggers and checkpoints)
lives in ``minigpt/cli.py``; ``python train.py --help`` lists its options.
"""

from minigpt.cli import main

if __name__ == "__main__":
    main()
