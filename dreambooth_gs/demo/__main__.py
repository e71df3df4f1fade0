"""``python -m dreambooth_gs.demo``: see :mod:`dreambooth_gs.demo.program`."""

from dreambooth_gs.cli import run_cli
from dreambooth_gs.demo.program import main, parse_args

if __name__ == "__main__":
    run_cli(main, parse_args(), "python -m dreambooth_gs.demo")
