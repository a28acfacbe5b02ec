"""ntkselect.cli.main: the command line."""
