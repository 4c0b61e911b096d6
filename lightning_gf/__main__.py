"""``python -m lightning_gf``: the ``lightning-gf`` console script."""

from lightning_gf.app.cli import main

if __name__ == "__main__":
    main()
