"""The ``dreambooth-gs-train`` command as a script: a thin wrapper of ``dreambooth_gs.commands.train``."""

from dreambooth_gs.commands.train import main, parse_args, run

__all__ = ["main", "parse_args", "run"]

if __name__ == "__main__":
    run()
