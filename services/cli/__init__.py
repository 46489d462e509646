"""The ``flashcrowd`` command line: one module per subcommand, registered in ``services.cli.main``."""
