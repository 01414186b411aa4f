"""cm: an email campaign manager that lives in a terminal."""

__version__ = "0.1.0"
