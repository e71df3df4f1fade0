"""The ``dreambooth-gs-export`` command as a script: a thin wrapper of ``dreambooth_gs.commands.export``."""

from dreambooth_gs.commands.export import main, parse_args, run

__all__ = ["main", "parse_args", "run"]

if __name__ == "__main__":
    run()
