"""`python -m ltcli` (and `torchrun -m ltcli`) run the command line."""

from .cli import main

if __name__ == "__main__":
    main()
