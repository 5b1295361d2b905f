"""The command line: `aevb-dist` and its commands, and the quickstart."""
