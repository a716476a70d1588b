"""EGM reproduction: the library every pipeline rule calls.

Importable without Snakemake; each stage has a `python -m egm <command>` entry (egm.cli).
"""

__version__ = "0.1.0"
