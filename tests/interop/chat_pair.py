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
import json
import logging
import ssl
import sys
import uuid

from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.stanza import StreamFeatures

# The only SASL mechanisms we accept.  The PLUS variants are left out on
# purpose: Python's ssl module cannot produce tls-exporter bindings, so they
# would only add a version-dependent fallback path to the test.
ALLOWED_MECHS = ("SCRAM-SHA-256", "SCRAM-SHA-1")


class CheckFailed(Exception):
    """A failure with a message meant for the person reading the CI log."""


class Client(ClientXMPP):
    """One side of the pair; reports progress and failure through futures."""

    def __init__(self, name: str, jid: str, password: str, args: argparse.Namespace):
        super().__init__(
            jid,
            password,
            # use_mechs is a hard allow-list: slixmpp picks the strongest
            # offered mechanism from it and never falls back to anything else.
            plugin_config={"feature_mechanisms": {"use_mechs": list(ALLOWED_MECHS)}},
        )
        self.name = name
        self.mechanism: str | None = None

        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.failed: asyncio.Future[str] = loop.create_future()
        self.inbox: asyncio.Queue = asyncio.Queue()

        # Only STARTTLS on the given port: direct TLS would be tried first by
        # default (and fail against a STARTTLS port), plaintext must never be.
        self.enable_direct_tls = False
        self.enable_starttls = True
        self.enable_plaintext = False
        self.whitespace_keepalive = False
        self.ssl_context = make_ssl_context(args)

        if args.register:
            self.register_plugin("xep_0077")
            self.add_event_handler("register", self._on_register)
            # slixmpp's own force_registration never fires under asyncio TLS
            # (it checks for ssl.SSLSocket), so add the feature ourselves:
            # a server may allow XEP-0077 without advertising the stream feature.
            self.add_filter("in", self._force_register_feature)

        self.add_event_handler("session_start", self._on_session_start)
        self.add_event_handler("auth_success", self._on_auth_success)
        self.add_event_handler("failed_auth", self._on_failed_auth)
        self.add_event_handler("failed_all_auth", self._on_no_mechanism)
        self.add_event_handler("connection_failed", self._on_connection_failed)
        self.add_event_handler("ssl_invalid_chain", self._on_bad_cert)
        self.add_event_handler("stream_error", self._on_stream_error)
        self.add_event_handler("disconnected", self._on_disconnected)
        self.add_event_handler("message", self._on_message)
        self.add_event_handler("message_error", self._on_message_error)

    # -- helpers -----------------------------------------------------------

    def fail(self, msg: str) -> None:
        if not self.failed.done():
            self.failed.set_result(f"{self.name} ({self.requested_jid.bare}): {msg}")

    def encrypted(self) -> bool:
        transport = self.transport
        return transport is not None and transport.get_extra_info("ssl_object") is not None

    def summary(self) -> dict:
        ssl_obj = self.transport.get_extra_info("ssl_object") if self.transport else None
        return {
            "jid": self.boundjid.full if self.ready.done() else self.requested_jid.full,
            "mechanism": self.mechanism,
            "offered": sorted(self.plugin["feature_mechanisms"].mech_list),
            "tls": ssl_obj is not None,
            "tls_version": ssl_obj.version() if ssl_obj else None,
        }

    # -- stream negotiation ------------------------------------------------

    def _force_register_feature(self, stanza):
        if (isinstance(stanza, StreamFeatures) and self.encrypted()
                and "mechanisms" not in self.features):
            stanza.enable("register")
            self.del_filter("in", self._force_register_feature)
        return stanza

    async def _on_register(self, _form) -> None:
        # The password goes over the wire in clear inside the IQ, so refuse
        # to send it before STARTTLS has completed.
        if not self.encrypted():
            self.fail("server offered registration before TLS; refusing to send the password")
            self.abort()
            return
        iq = self.Iq()
        iq["type"] = "set"
        iq["register"]["username"] = self.requested_jid.user
        iq["register"]["password"] = self.password
        try:
            await iq.send(timeout=10)
            logging.info("%s: registered %s", self.name, self.requested_jid.bare)
        except IqError as exc:
            # conflict = the account exists already, which is what a re-run sees.
            if exc.condition != "conflict":
                self.fail(f"in-band registration failed: {exc.condition} {exc.text}".rstrip())
                self.abort()
        except IqTimeout:
            self.fail("in-band registration timed out")
            self.abort()

    def _on_auth_success(self, _stanza) -> None:
        self.mechanism = self.plugin["feature_mechanisms"].mech.name
        logging.info("%s: SASL %s succeeded", self.name, self.mechanism)

    def _on_failed_auth(self, stanza) -> None:
        # Fail on the first refusal: retrying with SCRAM-SHA-1 after a wrong
        # password only hides the real answer behind a vaguer one.
        mech = self.plugin["feature_mechanisms"].mech
        text = stanza["text"] if "text" in stanza.keys() else ""
        self.fail(f"SASL {mech.name if mech else '?'} authentication refused: "
                  f"{stanza['condition']}{' (' + text + ')' if text else ''}")
        self.abort()

    def _on_no_mechanism(self, _event) -> None:
        offered = ", ".join(sorted(self.plugin["feature_mechanisms"].mech_list)) or "none"
        self.fail(f"no acceptable SASL mechanism: server offered [{offered}], "
                  f"we allow [{', '.join(ALLOWED_MECHS)}] and only over TLS "
                  f"(stream encrypted: {'yes' if self.encrypted() else 'NO'})")

    def _on_connection_failed(self, err) -> None:
        self.fail(f"cannot connect to {self.custom_address}: {err}")
        self.cancel_connection_attempt()

    def _on_bad_cert(self, err) -> None:
        self.fail(f"TLS certificate not accepted ({err}); pass --cafile PEM or --insecure")
        self.abort()

    def _on_stream_error(self, err) -> None:
        self.fail(f"stream error from server: {err['condition']} {err['text']}".rstrip())

    def _on_disconnected(self, reason) -> None:
        if self.ready.done():
            return
        # A failed STARTTLS handshake surfaces here (the transport dies before
        # slixmpp's ssl_invalid_chain event), so name the likely fix.
        if isinstance(reason, ssl.SSLCertVerificationError):
            self._on_bad_cert(reason)
        else:
            self.fail(f"disconnected before the session started ({reason or 'no reason given'})")

    async def _on_session_start(self, _event) -> None:
        if not self.encrypted():
            self.fail("session started on an unencrypted stream (STARTTLS not negotiated)")
            self.abort()
            return
        if self.mechanism not in ALLOWED_MECHS:
            self.fail(f"session started without SCRAM (mechanism: {self.mechanism})")
            self.abort()
            return
        self.send_presence()
        logging.info("%s: bound %s", self.name, self.boundjid.full)
        if not self.ready.done():
            self.ready.set_result(None)

    # -- messages ----------------------------------------------------------

    def _on_message(self, msg) -> None:
        if msg["type"] == "error":
            return  # reported by _on_message_error
        if msg["body"]:
            self.inbox.put_nowait(msg)

    def _on_message_error(self, msg) -> None:
        err = msg["error"]
        self.fail(f"message bounced from {msg['from']}: {err['condition']} {err['text']}".rstrip())


def make_ssl_context(args: argparse.Namespace) -> ssl.SSLContext:
    if args.insecure:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    # With --cafile, trust only that PEM (not the system store), so the test
    # proves the server presents exactly the certificate we expect.  The
    # hostname is still checked against --domain.
    ctx = ssl.create_default_context(cafile=args.cafile)
    if args.cafile is None:
        ctx.load_default_certs()
    return ctx


async def expect_message(rcpt: Client, sender: Client, body: str) -> None:
    msg = await rcpt.inbox.get()
    if msg["body"] != body:
        raise CheckFailed(f"{rcpt.name} got body {msg['body']!r}, expected {body!r}")
    if msg["from"].full != sender.boundjid.full:
        raise CheckFailed(f"{rcpt.name} got message from {msg['from'].full!r}, "
                          f"expected {sender.boundjid.full!r}")
    if msg["to"].full != rcpt.boundjid.full:
        raise CheckFailed(f"{rcpt.name} got message addressed to {msg['to'].full!r}, "
                          f"expected {rcpt.boundjid.full!r}")


async def exchange(args: argparse.Namespace, c1: Client, c2: Client, summary: dict) -> None:
    # Connect straight to the given address: connect(host, port) disables the
    # SRV/DNS lookup of the JID's domain.  (This slixmpp API takes host and
    # port separately; older ones took address=(host, port).)
    for c in (c1, c2):
        c.connect(args.host, args.port)
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
    error: str | None = None

    work = asyncio.ensure_future(exchange(args, c1, c2, summary))
    # Whichever comes first: the exchange finishing, or either client failing.
    waiters = {work, c1.failed, c2.failed}
    try:
        done, _ = await asyncio.wait(waiters, timeout=args.timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done:
            stage = "the exchange" if c1.ready.done() and c2.ready.done() else "session start"
            error = f"timed out after {args.timeout}s waiting for {stage}"
        elif c1.failed in done or c2.failed in done:
            error = (c1.failed if c1.failed.done() else c2.failed).result()
        else:
            work.result()  # raises CheckFailed if a check did not hold
            summary["ok"] = True
    except CheckFailed as exc:
        error = str(exc)
    finally:
        work.cancel()

    summary["clients"] = [c1.summary(), c2.summary()]
    for c in (c1, c2):
        if c.transport is not None:
            c.disconnect(wait=1)
    await asyncio.sleep(0.2)  # let the closing stream tags go out
    for c in (c1, c2):
        c.abort()  # also stops any reconnect attempt still scheduled

    if error:
        summary["error"] = error
        print(f"FAIL: {error}", file=sys.stderr)
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["ok"] else 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5222)
    p.add_argument("--domain", required=True, help="XMPP domain of both accounts")
    p.add_argument("--user1", required=True)
    p.add_argument("--pass1", required=True)
    p.add_argument("--user2", required=True)
    p.add_argument("--pass2", required=True)
    p.add_argument("--register", action="store_true",
                   help="create both accounts first with XEP-0077 (existing ones are fine)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for the whole run")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--cafile", help="trust only this PEM certificate/CA for the server")
    tls.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    p.add_argument("--debug", action="store_true", help="log the XML stream")
    return p.parse_args()


if __name__ == "__main__":
    cli_args = parse_args()
    logging.basicConfig(level=logging.DEBUG if cli_args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(run(cli_args)))
