"""Ports for servers that bind late or take ``port_start + i``: consecutive, free, and out of
the range the kernel hands to outgoing connections."""

from __future__ import annotations

import socket

from kvplane.children import consecutive_free_ports


def test_consecutive_free_ports_are_bindable_and_below_the_ephemeral_range() -> None:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    for n in (1, 2, 4):
        first = consecutive_free_ports(n)
        assert first + n <= ephemeral_low
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", first + i))
        finally:
            for s in socks:
                s.close()
