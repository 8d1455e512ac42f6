#!/usr/bin/env python3
"""Federation interop: a user of Shoal and a user of another XMPP server (a real
Prosody in the tests) befriend each other and chat across the two servers.

Two slixmpp clients, one per server, each creating its account in-band (XEP-0077)
over STARTTLS and logging in with SCRAM:

1. the user on the `--first` server ("alice") asks the other ("bob") for a presence
   subscription, so alice's server opens the first server-to-server stream; bob
   approves and asks back, alice approves (roster pushes checked on both sides);
2. each sees the other's available presence, and they chat both ways;
3. the user on Shoal sends a message to `--missing-domain`, a domain DNS does not
   know, and gets it back as an error with `<remote-server-not-found/>` from that
   address, with the message's id.

Exit status is 0 on success and 1 on any failure or timeout (with the stage it was
stuck in); the last line on stdout is a one-line JSON summary either way.

    python tests/interop/s2s_flow.py --host 127.0.0.1 --port 5222 --domain shoal.test \\
        --cafile shoal.pem --peer-port 25222 --peer-domain prosody.test \\
        --peer-cafile prosody.pem --first shoal|peer [--missing-domain nowhere.test] \\
        [--timeout 60] [--debug]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

# Shared with the other interop scripts; this directory is on sys.path when the
# script is run as a file.
from common import (CheckFailed, add_connection_args, add_run_args, await_work, close_all,
                    report, setup_logging)
from im_flow import ImClient, Progress, befriend_and_chat

async def scenario(args: argparse.Namespace, alice: ImClient, bob: ImClient, shoal: ImClient,
                   summary: dict, step: Progress) -> None:
    step("connecting, registering and logging in both users")
    for c, port in ((alice, alice.port), (bob, bob.port)):
        c.connect(args.host, port)
    await asyncio.gather(alice.ready, bob.ready)
    summary["users"] = {"alice": alice.boundjid.full, "bob": bob.boundjid.full}

    await befriend_and_chat(alice, bob, summary, step, f"s2s_flow {uuid.uuid4().hex[:8]}")

    step(f"a message to {args.missing_domain} bounces with <remote-server-not-found/>")
    to = f"nobody@{args.missing_domain}"
    msg_id = f"bounce-{uuid.uuid4().hex[:8]}"
    bounce = shoal.expect_bounce(msg_id)
    msg = shoal.make_message(mto=to, mbody="is anybody there?", mtype="chat")
    msg["id"] = msg_id
    msg.send()
    err = await bounce
    got = (err["from"].full, err["error"]["condition"], err["error"]["type"])
    if got != (to, "remote-server-not-found", "cancel"):
        raise CheckFailed(f"the message to {to} came back as {got}, expected "
                          f"({to!r}, 'remote-server-not-found', 'cancel'): {err}")
    summary["bounce"] = got[1]


async def run(args: argparse.Namespace) -> int:
    shoal_side = argparse.Namespace(**vars(args))
    peer_side = argparse.Namespace(**{**vars(args), "cafile": args.peer_cafile,
                                      "domain": args.peer_domain, "port": args.peer_port})

    def user(name: str, side: argparse.Namespace) -> ImClient:
        tag = uuid.uuid4().hex[:8]
        c = ImClient(name, f"{name}-{tag}@{side.domain}/s2s_flow-{tag}", f"{name}'s pw {tag}",
                     side, register=True)
        c.port = side.port
        return c

    first, second = (shoal_side, peer_side) if args.first == "shoal" else (peer_side, shoal_side)
    alice, bob = user("alice", first), user("bob", second)
    shoal = alice if args.first == "shoal" else bob
    clients = (alice, bob)
    summary: dict = {"ok": False, "first": args.first, "subscriptions": None,
                     "presence_seen": [], "messages": 0, "bounce": None}
    step = Progress()
    work = asyncio.ensure_future(scenario(args, alice, bob, shoal, summary, step))
    error = await await_work(work, clients, args.timeout, lambda: step.stage)
    if error:
        error = f"{error} (stage: {step.stage})"
    summary["ok"] = error is None
    summary["clients"] = [c.summary() for c in clients]
    await close_all(clients)
    return report(summary, error)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_connection_args(p, "Shoal's XMPP domain")
    p.add_argument("--peer-port", type=int, required=True, help="the other server's c2s port")
    p.add_argument("--peer-domain", required=True, help="the other server's XMPP domain")
    p.add_argument("--peer-cafile", required=True, help="the other server's certificate")
    p.add_argument("--first", choices=("shoal", "peer"), required=True,
                   help="whose user makes the first move (whose server opens the first stream)")
    p.add_argument("--missing-domain", default="nowhere.test",
                   help="a domain that does not resolve")
    add_run_args(p, timeout=60.0)
    return p.parse_args()


if __name__ == "__main__":
    cli_args = parse_args()
    setup_logging(cli_args)
    sys.exit(asyncio.run(run(cli_args)))
