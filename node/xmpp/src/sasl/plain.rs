//! PLAIN (RFC 4616) on the server side: `authzid NUL authcid NUL passwd`.
//!
//! The password arrives in the clear and is checked by redoing the SCRAM key derivation
//! against the stored keys; it is dropped as soon as the check is done. Whether PLAIN may
//! be offered at all (only over TLS) is the driver's decision, never this module's.

use super::server::{SaslFailure, SaslStep, saslprep_name};
use super::{ScramCredentials, ScramHash, StoredCredentials};

/// Server state for one PLAIN exchange.
#[derive(Debug)]
pub(super) struct PlainServer {
    state: State,
}

enum State {
    Initial,
    /// `<auth/>` carried no initial response; the message comes in a `<response/>`.
    AwaitMessage,
    /// Message parsed; waiting for the credential lookup.
    AwaitCredentials {
        username: String,
        password: String,
    },
    Done,
}

// The pending password must never reach a log line.
impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Initial => f.write_str("Initial"),
            Self::AwaitMessage => f.write_str("AwaitMessage"),
            Self::AwaitCredentials { username, .. } => f
                .debug_struct("AwaitCredentials")
                .field("username", username)
                .finish_non_exhaustive(),
            Self::Done => f.write_str("Done"),
        }
    }
}

impl PlainServer {
    pub(super) fn new() -> Self {
        Self {
            state: State::Initial,
        }
    }

    pub(super) fn start(&mut self, initial_response: &[u8]) -> SaslStep {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Initial if initial_response.is_empty() => {
                self.state = State::AwaitMessage;
                SaslStep::Challenge(Vec::new())
            }
            State::Initial => self.message(initial_response),
            _ => SaslStep::Failure(SaslFailure::MalformedRequest),
        }
    }

    pub(super) fn respond(&mut self, data: &[u8]) -> SaslStep {
        match std::mem::replace(&mut self.state, State::Done) {
            State::AwaitMessage => self.message(data),
            _ => SaslStep::Failure(SaslFailure::MalformedRequest),
        }
    }

    pub(super) fn credentials(&mut self, creds: Option<&StoredCredentials>) -> SaslStep {
        let State::AwaitCredentials { username, password } =
            std::mem::replace(&mut self.state, State::Done)
        else {
            return SaslStep::Failure(SaslFailure::MalformedRequest);
        };
        let ok = match creds {
            Some(c) => c.verify_password(&password),
            None => {
                // Spend the same PBKDF2 work as a real check so response time does not
                // tell an attacker which usernames exist.
                let dummy = ScramCredentials::derive(
                    ScramHash::Sha256,
                    "",
                    username.as_bytes(),
                    StoredCredentials::DEFAULT_ITERATIONS,
                );
                let _ = dummy.verify_password(ScramHash::Sha256, &password);
                false
            }
        };
        if ok {
            SaslStep::Success {
                username,
                additional_data: None,
            }
        } else {
            SaslStep::Failure(SaslFailure::NotAuthorized)
        }
    }

    fn message(&mut self, data: &[u8]) -> SaslStep {
        match parse_message(data) {
            Ok((username, password)) => {
                let step = SaslStep::NeedCredentials {
                    username: username.clone(),
                };
                self.state = State::AwaitCredentials { username, password };
                step
            }
            Err(f) => SaslStep::Failure(f),
        }
    }
}

/// Splits and prepares a PLAIN message, returning the SASLprep'ed authcid and password.
fn parse_message(data: &[u8]) -> Result<(String, String), SaslFailure> {
    use SaslFailure::{InvalidAuthzid, MalformedRequest, NotAuthorized};

    let msg = std::str::from_utf8(data).map_err(|_| MalformedRequest)?;
    let mut parts = msg.split('\0');
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(MalformedRequest);
    };
    if authcid.is_empty() || password.is_empty() {
        return Err(MalformedRequest);
    }
    let username = saslprep_name(authcid).ok_or(MalformedRequest)?;
    // Clients commonly send their own bare JID as authzid; anything naming another user
    // would be acting on their behalf, which we do not support. The domain is not checked
    // here: the stream's `to` already fixed it.
    if !authzid.is_empty() {
        let same_user = authzid
            .split_once('@')
            .and_then(|(local, _)| saslprep_name(local))
            .is_some_and(|local| local == username);
        if !same_user {
            return Err(InvalidAuthzid);
        }
    }
    // Stored keys were derived from the prepared password; one that cannot be prepared
    // cannot be the right one.
    let password = saslprep_name(password).ok_or(NotAuthorized)?;
    Ok((username, password))
}

#[cfg(test)]
mod tests {
    use crate::sasl::{Mechanism, SaslFailure, SaslServer, SaslStep, StoredCredentials};

    fn creds() -> StoredCredentials {
        StoredCredentials::derive("pencil", b"salt-sha1", b"salt-sha256", 4096)
    }

    fn need(username: &str) -> SaslStep {
        SaslStep::NeedCredentials {
            username: username.to_owned(),
        }
    }

    fn success(username: &str) -> SaslStep {
        SaslStep::Success {
            username: username.to_owned(),
            additional_data: None,
        }
    }

    fn fail(f: SaslFailure) -> SaslStep {
        SaslStep::Failure(f)
    }

    fn start(msg: &[u8]) -> (SaslServer, SaslStep) {
        let mut s = SaslServer::new(Mechanism::Plain, "unused".into());
        let step = s.start(msg);
        (s, step)
    }

    #[test]
    fn good_password() {
        let (mut s, step) = start(b"\0user\0pencil");
        assert_eq!(step, need("user"));
        assert_eq!(s.credentials(Some(&creds())), success("user"));
        assert_eq!(
            s.respond(b"\0user\0pencil"),
            fail(SaslFailure::MalformedRequest)
        );
    }

    #[test]
    fn wrong_password_and_unknown_user_are_not_authorized() {
        let (mut s, step) = start(b"\0user\0pencil2");
        assert_eq!(step, need("user"));
        assert_eq!(
            s.credentials(Some(&creds())),
            fail(SaslFailure::NotAuthorized)
        );

        let (mut s, step) = start(b"\0nobody\0pencil");
        assert_eq!(step, need("nobody"));
        assert_eq!(s.credentials(None), fail(SaslFailure::NotAuthorized));
    }

    #[test]
    fn empty_initial_response_takes_message_in_response() {
        let (mut s, step) = start(b"");
        assert_eq!(step, SaslStep::Challenge(Vec::new()));
        assert_eq!(s.respond(b"\0user\0pencil"), need("user"));
        assert_eq!(s.credentials(Some(&creds())), success("user"));
    }

    #[test]
    fn malformed_messages() {
        for bad in [
            &b"user\0pencil"[..],
            b"\0user\0pencil\0",
            b"\0\0pencil",
            b"\0user\0",
            b"\0\0",
            b"userpencil",
            b"\0us\xffer\0pencil",
            b"\0us\x07er\0pencil",
            b"\0\xc2\xad\0pencil",
        ] {
            assert_eq!(start(bad).1, fail(SaslFailure::MalformedRequest), "{bad:?}");
        }
        // An empty response in place of the message is malformed too.
        let (mut s, _) = start(b"");
        assert_eq!(s.respond(b""), fail(SaslFailure::MalformedRequest));
    }

    #[test]
    fn authzid_rules() {
        assert_eq!(start(b"user@example.org\0user\0pencil").1, need("user"));
        assert_eq!(start(b"user@example.org/res\0user\0pencil").1, need("user"));
        for bad in [
            &b"admin@example.org\0user\0pencil"[..],
            b"user\0user\0pencil",
            b"example.org\0user\0pencil",
            b"@example.org\0user\0pencil",
            b"User@example.org\0user\0pencil",
        ] {
            assert_eq!(start(bad).1, fail(SaslFailure::InvalidAuthzid), "{bad:?}");
        }
    }

    #[test]
    fn saslprep_applies_to_authcid_and_password() {
        // U+00AD SOFT HYPHEN maps to nothing in both; U+00A0 NO-BREAK SPACE to a space.
        let (mut s, step) = start("\0us\u{AD}er\0pen\u{AD}cil".as_bytes());
        assert_eq!(step, need("user"));
        assert_eq!(s.credentials(Some(&creds())), success("user"));

        let spaced = StoredCredentials::derive("a b", b"s1", b"s2", 4096);
        let (mut s, _) = start("\0user\0a\u{A0}b".as_bytes());
        assert_eq!(s.credentials(Some(&spaced)), success("user"));

        // A password SASLprep prohibits cannot match anything stored.
        assert_eq!(
            start(b"\0user\0pen\x07cil").1,
            fail(SaslFailure::NotAuthorized)
        );
    }

    #[test]
    fn out_of_order_calls_are_malformed() {
        let mut s = SaslServer::new(Mechanism::Plain, "unused".into());
        assert_eq!(
            s.credentials(Some(&creds())),
            fail(SaslFailure::MalformedRequest)
        );
        let mut s = SaslServer::new(Mechanism::Plain, "unused".into());
        assert_eq!(
            s.respond(b"\0user\0pencil"),
            fail(SaslFailure::MalformedRequest)
        );
        let (mut s, _) = start(b"\0user\0pencil");
        assert_eq!(
            s.start(b"\0user\0pencil"),
            fail(SaslFailure::MalformedRequest)
        );
        assert_eq!(
            s.credentials(Some(&creds())),
            fail(SaslFailure::MalformedRequest)
        );
    }
}
