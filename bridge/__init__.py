"""bridge: keeps HighLevel Conversations in step with Action Network and ActiveDEMAND."""

__version__ = "0.1.0"
