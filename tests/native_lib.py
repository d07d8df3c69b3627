"""Whether the native gRPC client library is here: its tests skip without it, unless
MOE_REQUIRE_NATIVE=1 (CI builds it), where they fail instead."""

from __future__ import annotations

import os

import pytest

from router import native


def require_native() -> None:
    """Skips (or fails, under MOE_REQUIRE_NATIVE=1) the calling test where the library is not
    built or does not load."""
    try:
        native.load()
    except native.NativeUnavailableError as err:
        if os.environ.get("MOE_REQUIRE_NATIVE") == "1":
            pytest.fail(f"MOE_REQUIRE_NATIVE=1 but {err}")
        pytest.skip(str(err))
