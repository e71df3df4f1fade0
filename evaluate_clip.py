"""The ``dreambooth-gs-eval`` command as a script: a thin wrapper of ``dreambooth_gs.commands.evaluate``."""

from dreambooth_gs.commands.evaluate import main, parse_args, run

__all__ = ["main", "parse_args", "run"]

if __name__ == "__main__":
    run()
