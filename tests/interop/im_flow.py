#!/usr/bin/env python3
"""Two-client instant-messaging flow: registration, subscriptions, presence, chat,
offline messages.

Two slixmpp clients (alice and bob) with no accounts yet on the server:

1. both create their account in-band (XEP-0077) over STARTTLS, log in with
   SCRAM, fetch their (empty) roster and send initial presence;
2. alice asks bob for a presence subscription, bob approves it and asks back,
   alice approves: the roster pushes must leave both with subscription 'both'
   and no pending request;
3. each sees the other's available presence from the other's full JID;
4. they chat both ways (body and `from` checked);
5. bob disconnects, alice sees him go unavailable and sends 3 messages to his
   bare JID;
6. bob logs in again (new session, same account): his roster still says 'both',
   he gets the 3 messages in order, each with a XEP-0203 delay stamp in the
   past, sees alice's presence again, and alice sees him come back.

Exit status is 0 on success and 1 on any failure or timeout (with the stage it
was stuck in); the last line on stdout is a one-line JSON summary either way.

    python tests/interop/im_flow.py --host 127.0.0.1 --port 5222 \\
        --domain localhost [--alice alice --alice-pass pw1 --bob bob --bob-pass pw2] \\
        [--timeout 60] [--cafile cert.pem | --insecure] [--debug]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import traceback
import uuid
from datetime import datetime, timedelta, timezone

from slixmpp.exceptions import IqError, IqTimeout

# Shared with the other interop scripts; this directory is on sys.path when the
# script is run as a file.
from common import (CheckFailed, Client, add_connection_args, add_run_args, close_all,
                    expect_message, setup_logging)

OFFLINE_COUNT = 3


class ImClient(Client):
    """A client that handles subscriptions by hand and records what it sees."""

    def __init__(self, name: str, jid: str, password: str, args: argparse.Namespace,
                 register: bool):
        super().__init__(name, jid, password, args, register=register)
        self.register_plugin("xep_0199")  # ping, used as an ordering barrier
        self.register_plugin("xep_0203")  # delayed delivery stamps
        # Every subscription step below is sent explicitly by the scenario, so
        # slixmpp must neither approve nor subscribe back on its own.
        self.auto_authorize = None
        self.auto_subscribe = False
        self.leaving = False  # a disconnect the scenario asked for
        self.snapshot: dict | None = None  # summary() taken once the session started

        self.initial_roster: dict[str, str] = {}
        self.pushes: list[dict] = []              # roster pushes, in order
        self.subscribe_from: list[str] = []       # inbound 'subscribe' (bare JIDs)
        self.subscribed_from: list[str] = []      # inbound 'subscribed'
        self.presence: dict[str, str] = {}        # full JID -> last presence type
        self._wake = asyncio.Event()

        self.add_event_handler("roster_update", self._on_roster_update)
        self.add_event_handler("presence_subscribe", self._on_subscribe)
        self.add_event_handler("presence_subscribed", self._on_subscribed)
        self.add_event_handler("presence_available", self._on_presence)
        self.add_event_handler("presence_unavailable", self._on_presence)
        self.add_event_handler("disconnected", self._on_dropped)

    # -- session -----------------------------------------------------------

    async def start_session(self) -> None:
        # RFC 6121 §2.2: get the roster before initial presence, so the roster
        # pushes that follow are for this session too.
        try:
            result = await self.get_roster(timeout=10)
        except IqError as exc:
            raise CheckFailed(f"roster get refused: {exc.condition} {exc.text}".rstrip())
        except IqTimeout:
            raise CheckFailed("roster get timed out")
        items = result["roster"]["items"] if result is not None else {}
        self.initial_roster = {str(jid): item["subscription"] for jid, item in items.items()}
        self.send_presence()

    def _on_dropped(self, reason) -> None:
        if self.ready.done() and not self.leaving:
            self.fail(f"connection lost during the scenario ({reason or 'no reason given'})")

    # -- what the client sees ------------------------------------------------

    def _poke(self) -> None:
        self._wake.set()

    def _on_roster_update(self, iq) -> None:
        if iq["type"] == "set":
            for jid, item in iq["roster"]["items"].items():
                self.pushes.append({"jid": str(jid), "subscription": item["subscription"],
                                    "ask": item["ask"] or None})
        self._poke()

    def _on_subscribe(self, pres) -> None:
        self.subscribe_from.append(pres["from"].full)
        self._poke()

    def _on_subscribed(self, pres) -> None:
        self.subscribed_from.append(pres["from"].full)
        self._poke()

    def _on_presence(self, pres) -> None:
        self.presence[pres["from"].full] = pres["type"]
        self._poke()

    def _on_message(self, msg) -> None:
        super()._on_message(msg)
        self._poke()

    async def until(self, predicate) -> None:
        """Returns once `predicate()` holds; re-checked after every event."""
        while not predicate():
            self._wake.clear()
            await self._wake.wait()

    def sub(self, contact: str) -> tuple[str, bool] | None:
        """(subscription, ask=subscribe) of a roster item, as the pushes left it."""
        if not self.client_roster.has_jid(contact):
            return None
        item = self.client_roster[contact]
        return item["subscription"], bool(item["pending_out"])

    def available(self, full: str) -> bool:
        return self.presence.get(full) == "available"


class Progress:
    """The stage the scenario is in, for timeout messages and the summary."""

    def __init__(self) -> None:
        self.stage = "start"

    def __call__(self, stage: str) -> None:
        self.stage = stage
        logging.info("stage: %s", stage)


async def befriend_and_chat(alice: ImClient, bob: ImClient, summary: dict,
                            step: Progress, tag: str) -> None:
    """Steps 2-4: alice and bob, both bound with empty rosters, subscribe to each
    other (roster pushes checked on both sides), see each other's available presence
    and chat both ways. The bodies carry `tag`."""
    for c in (alice, bob):
        if c.initial_roster:
            raise CheckFailed(f"{c.name}'s roster is not empty at the start "
                              f"({c.initial_roster}); the scenario needs fresh accounts")
    a, b = alice.boundjid.bare, bob.boundjid.bare
    a_full, b_full = alice.boundjid.full, bob.boundjid.full

    # -- 2. subscriptions ------------------------------------------------------
    step("alice subscribes to bob: waiting for alice's roster push (none, ask=subscribe)")
    alice.send_presence(pto=b, ptype="subscribe")
    await alice.until(lambda: alice.sub(b) == ("none", True))

    step("waiting for bob to receive alice's subscription request")
    await bob.until(lambda: bool(bob.subscribe_from))
    if bob.subscribe_from[0] != a:
        raise CheckFailed(f"bob got the subscription request from {bob.subscribe_from[0]!r}, "
                          f"expected alice's bare JID {a!r}")

    step("bob approves: waiting for bob's roster push (from)")
    bob.send_presence(pto=a, ptype="subscribed")
    await bob.until(lambda: bob.sub(a) == ("from", False))
    step("bob approved: waiting for alice to get 'subscribed' and a roster push (to)")
    await alice.until(lambda: b in alice.subscribed_from and alice.sub(b) == ("to", False))

    step("bob subscribes back: waiting for bob's roster push (from, ask=subscribe)")
    bob.send_presence(pto=a, ptype="subscribe")
    await bob.until(lambda: bob.sub(a) == ("from", True))
    step("waiting for alice to receive bob's subscription request")
    await alice.until(lambda: b in alice.subscribe_from)

    step("alice approves: waiting for both roster items to reach 'both'")
    alice.send_presence(pto=b, ptype="subscribed")
    await alice.until(lambda: alice.sub(b) == ("both", False))
    await bob.until(lambda: a in bob.subscribed_from and bob.sub(a) == ("both", False))
    summary["subscriptions"] = {"alice": alice.sub(b)[0], "bob": bob.sub(a)[0]}

    # -- 3. presence -----------------------------------------------------------
    step("waiting for alice and bob to see each other's available presence")
    await alice.until(lambda: alice.available(b_full))
    await bob.until(lambda: bob.available(a_full))
    summary["presence_seen"].append("alice sees bob")
    summary["presence_seen"].append("bob sees alice")

    # -- 4. chat -----------------------------------------------------------------
    step("alice -> bob chat message")
    body = f"{tag} hello bob"
    alice.send_message(mto=b_full, mbody=body, mtype="chat")
    await expect_message(bob, alice, body)
    summary["messages"] += 1
    step("bob -> alice chat message")
    body = f"{tag} hello alice"
    bob.send_message(mto=a_full, mbody=body, mtype="chat")
    await expect_message(alice, bob, body)
    summary["messages"] += 1


async def scenario(args: argparse.Namespace, alice: ImClient, bob: ImClient,
                   make_bob_again, summary: dict, step: Progress) -> None:
    step("connecting, registering and logging in alice and bob")
    for c in (alice, bob):
        c.connect(args.host, args.port)
    await asyncio.gather(alice.ready, bob.ready)
    for c in (alice, bob):
        c.snapshot = c.summary()  # bob's connection is gone at the end
    a, b = alice.boundjid.bare, bob.boundjid.bare
    a_full, b_full = alice.boundjid.full, bob.boundjid.full
    tag = uuid.uuid4().hex[:8]
    await befriend_and_chat(alice, bob, summary, step, f"im_flow {tag}")

    # -- 5. bob goes offline --------------------------------------------------
    step("bob disconnects: waiting for alice to see bob's unavailable presence")
    bob.leaving = True
    await bob.disconnect(wait=2)
    await alice.until(lambda: alice.presence.get(b_full) == "unavailable")
    summary["presence_seen"].append("alice sees bob leave")

    step(f"alice sends {OFFLINE_COUNT} messages to bob's bare JID while he is offline")
    sent_at = datetime.now(timezone.utc)
    offline_bodies = [f"im_flow offline {i + 1}/{OFFLINE_COUNT} {tag}"
                      for i in range(OFFLINE_COUNT)]
    for body in offline_bodies:
        alice.send_message(mto=b, mbody=body, mtype="chat")
    # A ping to bob's bare JID travels the same path as the messages and is
    # answered by bob's account after it handled them, so bob cannot log in
    # again before the server has taken them (this only orders the test).
    try:
        await alice.plugin["xep_0199"].send_ping(b, timeout=10)
    except (IqError, IqTimeout) as exc:
        raise CheckFailed(f"ping to bob's bare JID after the offline messages failed: {exc}")

    # -- 6. bob comes back ----------------------------------------------------
    step("bob logs in again (new session)")
    bob2: ImClient = make_bob_again()
    bob2.connect(args.host, args.port)
    await bob2.ready
    bob2.snapshot = bob2.summary()
    b2_full = bob2.boundjid.full
    if bob2.initial_roster.get(a) != "both":
        raise CheckFailed(f"bob's new session fetched roster {bob2.initial_roster}, "
                          f"expected alice ({a}) with subscription 'both'")

    for i, body in enumerate(offline_bodies):
        step(f"waiting for offline message {i + 1}/{OFFLINE_COUNT} on bob's new session")
        msg = await bob2.inbox.get()
        received_at = datetime.now(timezone.utc)
        if msg["body"] != body:
            raise CheckFailed(f"bob's offline message {i + 1} has body {msg['body']!r}, "
                              f"expected {body!r} (missing, duplicated or out of order)")
        if msg["from"].full != a_full:
            raise CheckFailed(f"offline message {i + 1} is from {msg['from'].full!r}, "
                              f"expected alice's full JID {a_full!r}")
        if msg["to"].bare != b:
            raise CheckFailed(f"offline message {i + 1} is addressed to {msg['to'].full!r}, "
                              f"expected bob ({b})")
        delay = msg.get_plugin("delay", check=True)
        stamp = delay["stamp"] if delay is not None else None
        if stamp is None:
            raise CheckFailed(f"offline message {i + 1} has no XEP-0203 delay stamp: {msg}")
        if stamp.tzinfo is None:
            raise CheckFailed(f"offline message {i + 1} delay stamp {stamp} has no time zone")
        # Stamps have millisecond precision; allow that much before sending.
        if not sent_at - timedelta(seconds=1) <= stamp <= received_at:
            raise CheckFailed(f"offline message {i + 1} delay stamp {stamp.isoformat()} is not "
                              f"between sending ({sent_at.isoformat()}) and receipt "
                              f"({received_at.isoformat()})")
        summary["offline"].append({"body": body, "stamp": stamp.isoformat(),
                                   "delay_from": delay["from"].full or None})

    step("waiting for alice to see bob's new session available")
    await alice.until(lambda: alice.available(b2_full))
    summary["presence_seen"].append("alice sees bob back")
    step("waiting for bob's new session to see alice's presence (probe answered)")
    await bob2.until(lambda: bob2.available(a_full))
    summary["presence_seen"].append("bob (again) sees alice")

    step("checking that no further message reaches bob's new session")
    await asyncio.sleep(0.5)
    if not bob2.inbox.empty():
        extra = bob2.inbox.get_nowait()
        raise CheckFailed(f"bob's new session got an unexpected extra message: "
                          f"{extra['body']!r} from {extra['from']}")


async def run(args: argparse.Namespace) -> int:
    def res() -> str:
        return uuid.uuid4().hex[:6]

    alice = ImClient("alice", f"{args.alice}@{args.domain}/im_flow-a-{res()}",
                     args.alice_pass, args, register=True)
    bob = ImClient("bob", f"{args.bob}@{args.domain}/im_flow-b-{res()}",
                   args.bob_pass, args, register=True)
    clients = [alice, bob]

    loop = asyncio.get_running_loop()
    failed: asyncio.Future[str] = loop.create_future()

    def track(c: ImClient) -> None:
        c.failed.add_done_callback(
            lambda f: failed.done() or failed.set_result(f.result()))

    def make_bob_again() -> ImClient:
        c = ImClient("bob (again)", f"{args.bob}@{args.domain}/im_flow-b2-{res()}",
                     args.bob_pass, args, register=False)
        clients.append(c)
        track(c)
        return c

    for c in clients:
        track(c)

    summary: dict = {"ok": False, "subscriptions": None, "presence_seen": [], "messages": 0,
                     "offline": [], "offline_messages": 0, "offline_stamped": 0}
    step = Progress()
    error: str | None = None

    work = asyncio.ensure_future(scenario(args, alice, bob, make_bob_again, summary, step))
    try:
        done, _ = await asyncio.wait({work, failed}, timeout=args.timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done:
            error = f"timed out after {args.timeout}s at stage: {step.stage}"
        elif failed in done:
            error = f"{failed.result()} (stage: {step.stage})"
        else:
            work.result()  # raises CheckFailed if a check did not hold
            summary["ok"] = True
    except CheckFailed as exc:
        error = f"{exc} (stage: {step.stage})"
    except Exception as exc:  # a bug in this script: still report it as a failure
        traceback.print_exc()
        error = f"unexpected error in the script: {exc!r} (stage: {step.stage})"
    finally:
        work.cancel()

    summary["offline_messages"] = len(summary["offline"])
    summary["offline_stamped"] = sum(1 for m in summary["offline"] if m["stamp"])
    summary["roster_pushes"] = {c.name: c.pushes for c in clients}
    summary["clients"] = [c.snapshot or c.summary() for c in clients]
    if not summary["ok"]:
        summary["stage"] = step.stage
    await close_all(clients)

    if error:
        summary["error"] = error
        print(f"FAIL: {error}", file=sys.stderr)
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["ok"] else 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_connection_args(p, "XMPP domain of both accounts")
    # Fresh names by default, so a re-run against the same server starts over.
    p.add_argument("--alice", default=f"alice-{uuid.uuid4().hex[:8]}",
                   help="user name of the first account (created in-band)")
    p.add_argument("--alice-pass", default="alice's secret 1")
    p.add_argument("--bob", default=f"bob-{uuid.uuid4().hex[:8]}",
                   help="user name of the second account (created in-band)")
    p.add_argument("--bob-pass", default="b0b's s3cret!")
    add_run_args(p, timeout=60.0)
    return p.parse_args()


if __name__ == "__main__":
    cli_args = parse_args()
    setup_logging(cli_args)
    sys.exit(asyncio.run(run(cli_args)))
