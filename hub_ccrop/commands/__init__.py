"""argparse for the ``hub-ccrop`` subcommands (library code never imports this package)."""
