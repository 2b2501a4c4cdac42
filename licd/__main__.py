"""`python -m licd`: the same as the `licd` command."""

from .cli import main

main()
