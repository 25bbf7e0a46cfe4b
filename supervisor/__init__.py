"""failover-supervisor: keeps LLM inference engines serving through failures."""

__version__ = "0.1.0"
