"""evalsuite: how much inference quality a checkpoint loses at each numeric precision."""

__version__ = "0.1.0"
