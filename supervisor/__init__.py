"""failover-supervisor: keeps LLM inference engines serving through failures."""

# First: whether the relay's compiled modules (a mypyc build) or their sources are
# imported is decided before any of them is.
from supervisor import native as native

__version__ = "0.1.0"
