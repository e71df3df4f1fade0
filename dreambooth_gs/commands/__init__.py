"""The command-line programs: ``parse_args(argv)`` + ``main(args)`` + ``run()`` each (the console scripts
``dreambooth-gs-train`` / ``-eval`` / ``-export``; the top-level ``*.py`` scripts are one-line wrappers of them).

The top floor: they may import any room below (train, evaluate, export and what those stand on) and
:mod:`dreambooth_gs.cli`, the one builder of their flags; nothing imports them.
"""
