"""`python -m licd`: the same as the `licd` command."""

from licd.cli.main import main

main()
