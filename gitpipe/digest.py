"""sha1 and sha256 for small inputs without OpenSSL, and hashlib loaded on first use.

`import hashlib` loads OpenSSL's libcrypto (~3.4 MB resident in the daemon) for its
constructors. What the daemon hashes on every run is small (a slot's index, a pushed loose
object, the home's path), and CPython's own implementations, which hashlib falls back to
when OpenSSL is missing, do that as well. Big data (artifacts, cache entries) keeps
OpenSSL's speed through `hashlib` below, which imports the real module when first used.
"""

from __future__ import annotations

from typing import Any

try:  # CPython's builtin implementations: _sha256 up to 3.11, _sha2 from 3.12
    from _sha1 import sha1
except ImportError:  # pragma: no cover - another interpreter
    from hashlib import sha1  # type: ignore[assignment]
try:
    from _sha256 import sha256  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - Python 3.12+
    try:
        from _sha2 import sha256  # type: ignore[import-not-found,no-redef,unused-ignore]
    except ImportError:
        from hashlib import sha256  # type: ignore[assignment,no-redef,unused-ignore]

__all__ = ["hashlib", "sha1", "sha256"]


class _Hashlib:
    """`hashlib`, imported on the first attribute read."""

    def __getattr__(self, name: str) -> Any:
        import hashlib as real

        return getattr(real, name)


hashlib: Any = _Hashlib()
