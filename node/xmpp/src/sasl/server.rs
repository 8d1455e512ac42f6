//! The server side of one SASL exchange: mechanism names, RFC 6120 failure conditions and
//! the [`SaslServer`] state machine that dispatches to SCRAM or PLAIN.
//!
//! It owns the rules of each exchange and nothing around it: which mechanisms to offer
//! (PLAIN only over TLS), base64 of element text, account lookup, retry limits and
//! nonce generation all belong to the driver. It must never block or look anything up:
//! when it needs stored credentials it returns [`SaslStep::NeedCredentials`] and waits.

use super::StoredCredentials;
use super::plain::PlainServer;
use super::scram::ScramServer;

/// A SASL mechanism this server implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    ScramSha256,
    ScramSha1,
    Plain,
}

impl Mechanism {
    /// Every mechanism, strongest first: the order to advertise them in.
    pub const ALL: [Self; 3] = [Self::ScramSha256, Self::ScramSha1, Self::Plain];

    /// The IANA-registered name, as it appears in `<mechanism/>` and `<auth mechanism=…>`.
    pub fn name(self) -> &'static str {
        match self {
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha1 => "SCRAM-SHA-1",
            Self::Plain => "PLAIN",
        }
    }

    /// Parses a mechanism name. SASL names are case-sensitive upper case (RFC 4422 §3.1),
    /// so `scram-sha-1` is not recognised.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// RFC 6120 §6.5 SASL failure conditions, sent as the child of `<failure/>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SaslFailure {
    Aborted,
    AccountDisabled,
    CredentialsExpired,
    EncryptionRequired,
    IncorrectEncoding,
    InvalidAuthzid,
    InvalidMechanism,
    MalformedRequest,
    MechanismTooWeak,
    NotAuthorized,
    TemporaryAuthFailure,
}

impl SaslFailure {
    /// The element name of the condition inside `<failure/>`.
    pub fn element_name(self) -> &'static str {
        match self {
            Self::Aborted => "aborted",
            Self::AccountDisabled => "account-disabled",
            Self::CredentialsExpired => "credentials-expired",
            Self::EncryptionRequired => "encryption-required",
            Self::IncorrectEncoding => "incorrect-encoding",
            Self::InvalidAuthzid => "invalid-authzid",
            Self::InvalidMechanism => "invalid-mechanism",
            Self::MalformedRequest => "malformed-request",
            Self::MechanismTooWeak => "mechanism-too-weak",
            Self::NotAuthorized => "not-authorized",
            Self::TemporaryAuthFailure => "temporary-auth-failure",
        }
    }
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslStep {
    /// The mechanism needs the stored credentials of this (SASLprep'ed) username, the
    /// would-be localpart; the driver looks them up and calls [`SaslServer::credentials`].
    NeedCredentials { username: String },
    /// Send this as a `<challenge/>` (raw bytes; the caller base64-encodes).
    Challenge(Vec<u8>),
    /// Authentication succeeded; `additional_data` goes in `<success/>` (SCRAM's
    /// server-final `v=…`).
    Success {
        username: String,
        additional_data: Option<Vec<u8>>,
    },
    /// Authentication failed; the exchange is over and every later call fails with
    /// `malformed-request`.
    Failure(SaslFailure),
}

/// One SASL exchange on the server side.
///
/// Calls must follow the steps the exchange returned: `start` once, `credentials` only
/// after [`SaslStep::NeedCredentials`], `respond` only after [`SaslStep::Challenge`].
/// Anything else is answered with `malformed-request` and ends the exchange, so a
/// misbehaving client can never skip a verification step.
#[derive(Debug)]
pub struct SaslServer {
    mechanism: Mechanism,
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Scram(ScramServer),
    Plain(PlainServer),
}

impl SaslServer {
    /// `nonce` is a fresh random printable string (no `,`) the driver generated; SCRAM
    /// uses it as the server part of the nonce and PLAIN ignores it.
    pub fn new(mechanism: Mechanism, nonce: String) -> Self {
        let inner = match mechanism {
            Mechanism::ScramSha256 => {
                Inner::Scram(ScramServer::new(super::ScramHash::Sha256, nonce))
            }
            Mechanism::ScramSha1 => Inner::Scram(ScramServer::new(super::ScramHash::Sha1, nonce)),
            Mechanism::Plain => Inner::Plain(PlainServer::new()),
        };
        Self { mechanism, inner }
    }

    /// Makes the fake salt SCRAM shows for unknown users stable across attempts:
    /// `salt = HMAC(secret, username)`. Without it the fake salt is derived from the
    /// username and this exchange's nonce, so it changes on every attempt while a real
    /// account's salt does not, which an attacker probing twice could notice. The secret
    /// should be a per-deployment random value that outlives restarts.
    pub fn with_fake_salt_secret(mut self, secret: &[u8]) -> Self {
        if let Inner::Scram(scram) = &mut self.inner {
            scram.set_fake_salt_secret(secret);
        }
        self
    }

    /// The mechanism this exchange runs.
    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// The client's initial response (from `<auth/>`; an empty slice when absent or `=`).
    pub fn start(&mut self, initial_response: &[u8]) -> SaslStep {
        match &mut self.inner {
            Inner::Scram(s) => s.start(initial_response),
            Inner::Plain(p) => p.start(initial_response),
        }
    }

    /// The answer to [`SaslStep::NeedCredentials`]; `None` means there is no such account.
    pub fn credentials(&mut self, creds: Option<&StoredCredentials>) -> SaslStep {
        match &mut self.inner {
            Inner::Scram(s) => s.credentials(creds),
            Inner::Plain(p) => p.credentials(creds),
        }
    }

    /// A client `<response/>` (raw bytes, already base64-decoded).
    pub fn respond(&mut self, data: &[u8]) -> SaslStep {
        match &mut self.inner {
            Inner::Scram(s) => s.respond(data),
            Inner::Plain(p) => p.respond(data),
        }
    }
}

/// SASLprep (RFC 4013) as the server applies it to a received name or password (during
/// SASL, and to credentials chosen by in-band registration, so both sides derive keys from
/// the same string), `None` when the string is prohibited or prepares to nothing.
pub(crate) fn saslprep_name(s: &str) -> Option<String> {
    match stringprep::saslprep(s) {
        Ok(p) if !p.is_empty() => Some(p.into_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mechanism_names_round_trip() {
        for m in Mechanism::ALL {
            assert_eq!(Mechanism::from_name(m.name()), Some(m));
        }
        assert_eq!(Mechanism::ScramSha256.name(), "SCRAM-SHA-256");
        assert_eq!(Mechanism::ScramSha1.name(), "SCRAM-SHA-1");
        assert_eq!(Mechanism::Plain.name(), "PLAIN");
        assert_eq!(Mechanism::from_name("scram-sha-1"), None);
        assert_eq!(Mechanism::from_name("SCRAM-SHA-256-PLUS"), None);
        assert_eq!(Mechanism::from_name("DIGEST-MD5"), None);
    }

    #[test]
    fn failure_element_names() {
        let all = [
            (SaslFailure::Aborted, "aborted"),
            (SaslFailure::AccountDisabled, "account-disabled"),
            (SaslFailure::CredentialsExpired, "credentials-expired"),
            (SaslFailure::EncryptionRequired, "encryption-required"),
            (SaslFailure::IncorrectEncoding, "incorrect-encoding"),
            (SaslFailure::InvalidAuthzid, "invalid-authzid"),
            (SaslFailure::InvalidMechanism, "invalid-mechanism"),
            (SaslFailure::MalformedRequest, "malformed-request"),
            (SaslFailure::MechanismTooWeak, "mechanism-too-weak"),
            (SaslFailure::NotAuthorized, "not-authorized"),
            (SaslFailure::TemporaryAuthFailure, "temporary-auth-failure"),
        ];
        for (f, name) in all {
            assert_eq!(f.element_name(), name);
        }
    }

    #[test]
    fn saslprep_name_rules() {
        assert_eq!(saslprep_name("user").as_deref(), Some("user"));
        // U+00AD SOFT HYPHEN is mapped to nothing, U+00A0 to a plain space.
        assert_eq!(saslprep_name("us\u{AD}er").as_deref(), Some("user"));
        assert_eq!(saslprep_name("a\u{A0}b").as_deref(), Some("a b"));
        // Prohibited: ASCII control characters; empty after mapping.
        assert_eq!(saslprep_name("us\u{7}er"), None);
        assert_eq!(saslprep_name("\u{AD}"), None);
        assert_eq!(saslprep_name(""), None);
    }
}
