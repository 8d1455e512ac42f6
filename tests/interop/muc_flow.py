#!/usr/bin/env python3
"""Multi-user chat with slixmpp's XEP-0045 plugin: create and configure, join,
membership, message, nick change, kick.

Two slixmpp clients log in with SCRAM over STARTTLS, then:

1. the first joins (and so creates) the room, waiting for its self-presence and
   the subject as slixmpp's join_muc_wait does;
2. the first fetches the room's configuration form (XEP-0004), names the room in it
   and submits it, which unlocks the new room (XEP-0045 §10.1.3); the room's
   disco#info then carries the name;
3. the second joins, and the plugin must list the first among the occupants; the
   first makes the second a member and the member list names it;
3. the first sends a groupchat message; the second gets it from the first's
   room JID;
4. the second changes its nick; the first sees the occupant under the new nick;
5. the first (the room's owner and a moderator) kicks the second through the
   plugin's set_role; the second gets its own unavailable presence with status
   codes 307 (kicked) and 110 (self).

Exit status is 0 on success and 1 on any failure or timeout; the last line on
stdout is a one-line JSON summary either way.

    python tests/interop/muc_flow.py --host 127.0.0.1 --port 5222 --domain localhost \\
        --user1 juliet --pass1 pw --user2 romeo --pass2 pw [--room coven@conference.localhost] \\
        [--timeout 30] [--cafile cert.pem | --insecure] [--debug]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

from common import (add_pair_args, CheckFailed, Client, add_connection_args, add_run_args, await_work,
                    close_all, report, setup_logging)


def muc_client(name: str, jid: str, password: str, args: argparse.Namespace) -> Client:
    c = Client(name, f"{jid}/muc_flow-{uuid.uuid4().hex[:6]}", password, args, register=False)
    c.register_plugin("xep_0045")
    return c


async def wait_event(c: Client, event: str, check, timeout: float):
    """The next `event` on `c` for which `check` holds."""
    fut = asyncio.get_running_loop().create_future()

    def handler(stanza):
        if not fut.done() and check(stanza):
            fut.set_result(stanza)

    c.add_event_handler(event, handler)
    try:
        return await asyncio.wait_for(fut, timeout)
    finally:
        c.del_event_handler(event, handler)


async def flow(args: argparse.Namespace, c1: Client, c2: Client, summary: dict) -> None:
    for c in (c1, c2):
        c.connect(args.host, args.port)
    await asyncio.gather(c1.ready, c2.ready)
    room = args.room
    muc1, muc2 = c1.plugin["xep_0045"], c2.plugin["xep_0045"]
    step = args.timeout / 4

    await muc1.join_muc_wait(room, "first", maxstanzas=0, timeout=step)
    summary["steps"].append("created")
    form = await muc1.get_room_config(room, timeout=step)
    if "muc#roomconfig_roomname" not in form.get_fields():
        raise CheckFailed(f"configuration form lacks the room name: {sorted(form.get_fields())}")
    form.set_values({"muc#roomconfig_roomname": "Interop room"})
    await muc1.set_room_config(room, form, timeout=step)
    info = await c2.plugin["xep_0030"].get_info(jid=room, timeout=step)
    names = [identity[3] for identity in info["disco_info"]["identities"]]
    if names != ["Interop room"]:
        raise CheckFailed(f"the configured room is named {names}")
    summary["steps"].append("configured")
    _, _, occupants, _ = await muc2.join_muc_wait(room, "second", maxstanzas=0, timeout=step)
    nicks = sorted(p["from"].resource for p in occupants)
    if "first" not in nicks:
        raise CheckFailed(f"the second client's occupant list lacks 'first': {nicks}")
    summary["steps"].append("joined")
    member = c2.boundjid.bare
    await muc1.set_affiliation(room, "member", jid=member, timeout=step)
    members = [str(j) for j in await muc1.get_affiliation_list(room, "member", timeout=step)]
    if members != [member]:
        raise CheckFailed(f"member list is {members}, expected [{member!r}]")
    summary["steps"].append("member")

    body = f"hello room {uuid.uuid4().hex[:8]}"
    got = asyncio.ensure_future(wait_event(
        c2, f"muc::{room}::message", lambda m: m["body"] == body, step))
    c1.send_message(mto=room, mbody=body, mtype="groupchat")
    msg = await got
    if msg["from"].full != f"{room}/first":
        raise CheckFailed(f"groupchat message came from {msg['from'].full!r}")
    summary["steps"].append("message")

    seen = asyncio.ensure_future(wait_event(
        c1, f"muc::{room}::got_online", lambda p: p["from"].resource == "montague", step))
    c2.send_presence(pto=f"{room}/montague")
    await seen
    summary["steps"].append("nick")

    kicked = asyncio.ensure_future(wait_event(
        c2, f"muc::{room}::presence",
        lambda p: p["type"] == "unavailable" and p["from"].resource == "montague", step))
    await muc1.set_role(room, "montague", "none", reason="enough")
    pres = await kicked
    codes = sorted(pres["muc"]["status_codes"])
    if codes != [110, 307]:
        raise CheckFailed(f"kicked occupant got status codes {codes}, expected [110, 307]")
    summary["steps"].append("kicked")


async def run(args: argparse.Namespace) -> int:
    c1 = muc_client("client1", f"{args.user1}@{args.domain}", args.pass1, args)
    c2 = muc_client("client2", f"{args.user2}@{args.domain}", args.pass2, args)
    summary = {"ok": False, "steps": []}
    work = asyncio.ensure_future(flow(args, c1, c2, summary))
    error = await await_work(work, (c1, c2), args.timeout,
                             lambda: f"the next step after {summary['steps']}")
    summary["ok"] = error is None
    await close_all((c1, c2))
    return report(summary, error)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_connection_args(p, "XMPP domain of both accounts")
    add_pair_args(p)
    p.add_argument("--room", default="coven@conference.localhost")
    add_run_args(p, timeout=30.0)
    return p.parse_args()


if __name__ == "__main__":
    cli_args = parse_args()
    setup_logging(cli_args)
    sys.exit(asyncio.run(run(cli_args)))
