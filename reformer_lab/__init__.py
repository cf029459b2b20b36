"""reformer_lab: the Reformer's efficient attention, built to be read and measured."""

__version__ = "0.1.0"
