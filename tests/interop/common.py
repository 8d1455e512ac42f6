"""Shared slixmpp client setup for the interop scripts (tests/interop/*.py).

A `Client` connects straight to HOST:PORT (no DNS/SRV), upgrades with STARTTLS
(never plaintext, never direct TLS), optionally creates its account with
XEP-0077 first, logs in with SCRAM-SHA-256 or SCRAM-SHA-1 only, binds and then
runs `start_session()` (by default: send initial presence).  Failures are
reported through the `failed` future with a message meant for a CI log.

The scripts import this as a plain module: they are run as
`python tests/interop/<script>.py`, which puts this directory on sys.path.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
import sys

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

    def __init__(self, name: str, jid: str, password: str, args: argparse.Namespace,
                 register: bool | None = None):
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
        # Message ids whose error reply the scenario waits for (see expect_bounce).
        self.bounces: dict[str, asyncio.Future] = {}

        # Only STARTTLS on the given port: direct TLS would be tried first by
        # default (and fail against a STARTTLS port), plaintext must never be.
        self.enable_direct_tls = False
        self.enable_starttls = True
        self.enable_plaintext = False
        self.whitespace_keepalive = False
        self.ssl_context = make_ssl_context(args)

        if args.register if register is None else register:
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
        logging.info("%s: bound %s", self.name, self.boundjid.full)
        try:
            await self.start_session()
        except CheckFailed as exc:
            self.fail(str(exc))
            return
        if not self.ready.done():
            self.ready.set_result(None)

    async def start_session(self) -> None:
        """What the client does once bound, before it counts as ready."""
        self.send_presence()

    # -- messages ----------------------------------------------------------

    def _on_message(self, msg) -> None:
        if msg["type"] == "error":
            return  # reported by _on_message_error
        if msg["body"]:
            self.inbox.put_nowait(msg)

    def expect_bounce(self, msg_id: str) -> asyncio.Future:
        """The error reply to the message with `msg_id`, which the scenario expects
        (any other error fails the client)."""
        waiter = asyncio.get_running_loop().create_future()
        self.bounces[msg_id] = waiter
        return waiter

    def _on_message_error(self, msg) -> None:
        waiter = self.bounces.pop(msg["id"], None)
        if waiter is not None:
            waiter.set_result(msg)
            return
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


def add_connection_args(p: argparse.ArgumentParser, domain_help: str) -> None:
    """Where to connect (the first options of every interop script)."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5222)
    p.add_argument("--domain", required=True, help=domain_help)


def add_pair_args(p: argparse.ArgumentParser) -> None:
    """The two accounts of a two-client script."""
    p.add_argument("--user1", required=True)
    p.add_argument("--pass1", required=True)
    p.add_argument("--user2", required=True)
    p.add_argument("--pass2", required=True)


def add_run_args(p: argparse.ArgumentParser, timeout: float) -> None:
    """How long to run, how to trust the server, how much to log (the last options)."""
    p.add_argument("--timeout", type=float, default=timeout, help="seconds for the whole run")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--cafile", help="trust only this PEM certificate/CA for the server")
    tls.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    p.add_argument("--debug", action="store_true", help="log the XML stream")


def setup_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def await_work(work: asyncio.Future, clients, timeout: float, stuck) -> str | None:
    """Waits for `work` or the first failing client, within `timeout` seconds; returns
    the error (None on success). `stuck()` says what the run waited for on timeout."""
    try:
        done, _ = await asyncio.wait({work, *(c.failed for c in clients)}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done:
            return f"timed out after {timeout}s waiting for {stuck()}"
        for c in clients:
            if c.failed in done:
                return c.failed.result()
        work.result()  # raises CheckFailed (or a plugin error) if a check did not hold
        return None
    except Exception as exc:  # CheckFailed, or IqError / PresenceError from a plugin
        return f"{type(exc).__name__}: {exc}" if not isinstance(exc, CheckFailed) else str(exc)
    finally:
        work.cancel()


def report(summary: dict, error: str | None) -> int:
    """Prints the failure (stderr) and the one-line JSON summary; the exit status."""
    if error:
        summary["error"] = error
        print(f"FAIL: {error}", file=sys.stderr)
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["ok"] else 1


async def close_all(clients) -> None:
    """Ends every stream politely, then makes sure nothing reconnects."""
    for c in clients:
        if c.transport is not None:
            c.disconnect(wait=1)
    await asyncio.sleep(0.2)  # let the closing stream tags go out
    for c in clients:
        c.abort()  # also stops any reconnect attempt still scheduled
