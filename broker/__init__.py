"""tasklease: a just-in-time credential broker for AI-agent and machine workflows."""

__version__ = "0.1.0"
