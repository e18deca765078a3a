"""The ``Secret`` type, which never shows its value, and how config strings resolve to one."""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final, final

_ENV_REF: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_FILE_PREFIX: Final = "file:"
_MASK: Final = "Secret('***')"


@final
class Secret:
    """A credential that never shows its value in ``repr``, ``str``, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the value; call this only where it goes on the wire."""
        return self._value

    def __repr__(self) -> str:
        return _MASK

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        # Constant time, so comparing a presented token with a stored one leaks no prefix.
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)


def resolve_secret(raw: str, *, env: Mapping[str, str], base_dir: Path) -> Secret:
    """Turn a config string (``${VAR}``, ``file:NAME`` or a literal) into a ``Secret``.

    Raises ``ValueError`` whose message names the variable or file but never a value.
    """
    if raw.startswith("${"):
        match = _ENV_REF.fullmatch(raw)
        if match is None:
            # Quoting the reference is safe: it is a name, and a typo here is common.
            raise ValueError(f'malformed environment reference "{raw}" (expected "${{NAME}}")')
        value = env.get(match[1], "")
        if not value:
            raise ValueError(f"environment variable {match[1]} is not set")
        return Secret(value)
    if raw.startswith(_FILE_PREFIX):
        return Secret(_read_secret_file(raw[len(_FILE_PREFIX) :], env=env, base_dir=base_dir))
    # An inline literal: allowed for tests and demos, discouraged because the config file
    # then has to be guarded like a key store.
    return Secret(raw)


def _read_secret_file(name: str, *, env: Mapping[str, str], base_dir: Path) -> str:
    if not name:
        raise ValueError('empty file name after "file:"')
    path = Path(name)
    if not path.is_absolute():
        # systemd LoadCredential= puts credentials here, readable only by this service.
        credentials_dir = env.get("CREDENTIALS_DIRECTORY")
        path = Path(credentials_dir) / path if credentials_dir else base_dir / path
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(
            f"cannot read secret file {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"secret file {path} is not valid UTF-8") from None
    # Editors and `echo` add one newline; anything more is treated as part of the value.
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ValueError(f"secret file {path} is empty")
    return text
