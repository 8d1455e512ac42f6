#!/usr/bin/env python3
"""Two-client XMPP interop check: STARTTLS + SCRAM + bind + a chat round trip.

Two slixmpp clients connect straight to HOST:PORT (no DNS/SRV), upgrade with
STARTTLS, log in with SCRAM-SHA-256 or SCRAM-SHA-1 (never PLAIN), bind a
resource and send initial presence.  Client 1 then sends a chat message with a
unique body to client 2's full JID, and client 2 answers to client 1's full
JID.  Each side checks the body and that `from` is the other's full JID.

Exit status is 0 on success and 1 on any failure or timeout; the last line on
stdout is a one-line JSON summary either way.

    python tests/interop/chat_pair.py --host 127.0.0.1 --port 5222 \\
        --domain localhost --user1 alice --pass1 pw1 --user2 bob --pass2 pw2 \\
        [--register] [--timeout 30] [--cafile cert.pem | --insecure] [--debug]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

# Shared with the other interop scripts; this directory is on sys.path when the
# script is run as a file.
from common import (add_pair_args, Client, add_connection_args, add_run_args, await_work,
                    close_all, expect_message, report, setup_logging)

async def exchange(args: argparse.Namespace, c1: Client, c2: Client, summary: dict) -> None:
    # Connect straight to the given address: connect(host, port) disables the
    # SRV/DNS lookup of the JID's domain.  (This slixmpp API takes host and
    # port separately; older ones took address=(host, port).)
    for c, port in ((c1, args.port), (c2, args.port2 or args.port)):
        c.connect(args.host, port)
    await asyncio.gather(c1.ready, c2.ready)

    tag = uuid.uuid4().hex
    ping, pong = f"chat_pair ping {tag}", f"chat_pair pong {tag}"

    c1.send_message(mto=c2.boundjid.full, mbody=ping, mtype="chat")
    await expect_message(c2, c1, ping)
    summary["messages"] += 1

    c2.send_message(mto=c1.boundjid.full, mbody=pong, mtype="chat")
    await expect_message(c1, c2, pong)
    summary["messages"] += 1


async def run(args: argparse.Namespace) -> int:
    c1 = Client("client1", f"{args.user1}@{args.domain}/chat_pair-1-{uuid.uuid4().hex[:6]}",
                args.pass1, args)
    c2 = Client("client2", f"{args.user2}@{args.domain}/chat_pair-2-{uuid.uuid4().hex[:6]}",
                args.pass2, args)
    summary = {"ok": False, "messages": 0, "clients": []}
    work = asyncio.ensure_future(exchange(args, c1, c2, summary))
    # Whichever comes first: the exchange finishing, or either client failing.
    error = await await_work(work, (c1, c2), args.timeout, lambda: (
        "the exchange" if c1.ready.done() and c2.ready.done() else "session start"))
    summary["ok"] = error is None
    summary["clients"] = [c1.summary(), c2.summary()]
    await close_all((c1, c2))
    return report(summary, error)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_connection_args(p, "XMPP domain of both accounts")
    add_pair_args(p)
    p.add_argument("--port2", type=int,
                   help="port for the second client (another node of a cluster); default --port")
    p.add_argument("--register", action="store_true",
                   help="create both accounts first with XEP-0077 (existing ones are fine)")
    add_run_args(p, timeout=30.0)
    return p.parse_args()


if __name__ == "__main__":
    cli_args = parse_args()
    setup_logging(cli_args)
    sys.exit(asyncio.run(run(cli_args)))
