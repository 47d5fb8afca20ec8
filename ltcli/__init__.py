"""ltcli: long-tailed recognition by decoupling representation and classifier."""

__version__ = "0.1.0"
