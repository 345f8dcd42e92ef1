"""Imports every command module so each attaches its commands to the ``main`` group."""
from newsrec.cli import serve  # noqa: F401
