"""Matplotlib figures used by the notebooks, one submodule per topic."""
