"""UniversalSeg inference library."""
__version__ = "0.1.0"
