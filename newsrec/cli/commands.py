"""Imports every command module so each attaches its commands to the ``main`` group."""
from newsrec.cli import train  # noqa: F401
from newsrec.cli import serve  # noqa: F401
from newsrec.cli import synth  # noqa: F401
from newsrec.cli import data  # noqa: F401
from newsrec.cli import evaluate  # noqa: F401
from newsrec.cli import pipeline  # noqa: F401
