"""The version of rded-fast: a leaf module, so any module (and setup.py) can read it without importing the package face.

Its minor number changes whenever the same inputs give other output bytes (CHANGELOG.md); distill records it in every
manifest and journal run record.
"""

__version__ = "0.3.1"
