"""LightningCLI entry point for the digits example: ``python examples/cli.py fit --config examples/config.yaml``."""

from lightning.pytorch.cli import LightningCLI

from lightning_interp.data import DigitsDataModule
from lightning_interp.models import DigitsCNN


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(DigitsCNN, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
