"""The allocator settings the `nmt` command makes first (nmt.allocator)."""

from __future__ import annotations

import platform

import pytest

from nmt.allocator import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_glibc_keeps_freed_memory_unless_told_to_use_its_defaults(monkeypatch):
    assert keep_freed_memory() is True
    monkeypatch.setenv("NMT_MALLOC", "system")
    assert keep_freed_memory() is False
