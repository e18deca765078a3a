"""What the flows of every source share: the compiled message rule."""

from __future__ import annotations

from typing import get_args

from bridge.config import MessageRule
from bridge.connectors.ghl.models import InboundType
from bridge.errors import ConfigError

_INBOUND_TYPES = frozenset(get_args(InboundType))


class Message:
    """A compiled message rule: the GHL type checked, a custom provider's id required."""

    def __init__(self, rule: MessageRule, *, path: str) -> None:
        if rule.type not in _INBOUND_TYPES:
            known = ", ".join(sorted(_INBOUND_TYPES))
            raise ConfigError(f"{path}.type", f"unknown GHL inbound type {rule.type!r} ({known})")
        if rule.type == "Custom" and not rule.conversation_provider_id:
            raise ConfigError(
                f"{path}.conversation_provider_id",
                'type "Custom" needs the custom provider\'s id, or GHL stores nothing',
            )
        self.rule = rule
        self.type: InboundType = rule.type  # type: ignore[assignment]  # checked just above
