"""align-distill: turn an aligned large teacher into an aligned small student, on top of TRL."""

__version__ = "0.1.0"
