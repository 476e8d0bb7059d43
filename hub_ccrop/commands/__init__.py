"""The ``hub-ccrop`` subcommands: argument parsing and the glue from arguments to the library."""
