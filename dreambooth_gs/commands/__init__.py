"""The command-line programs: ``parse_args(argv)`` + ``main(args)`` + ``run()`` each (the console scripts)."""
