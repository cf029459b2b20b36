"""ipywidgets explorers, one submodule per topic.

Each widget is a thin layer over a plain function that notebooks and tests
also call directly with fixed arguments.
"""
