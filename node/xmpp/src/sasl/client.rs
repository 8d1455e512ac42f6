//! The client side of SCRAM and PLAIN, for the load tester and tests.
//!
//! Like the server side it only transforms bytes: the caller picks the nonce, sends the
//! messages and base64-encodes element text. It must never accept a server that cannot
//! prove it knows the stored keys: [`ScramClient::verify_success`] is the client's half
//! of mutual authentication and skipping it defeats SCRAM's point.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::ScramHash;
use super::credentials::constant_time_eq;
use super::scram::{escape_saslname, is_extension, is_valid_nonce};

/// Why the client refuses to continue a SCRAM exchange. Every variant is the server's
/// fault (or an attacker's), except [`ScramClientError::OutOfOrder`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramClientError {
    #[error("server-first message is malformed")]
    MalformedServerFirst,
    #[error("server nonce does not extend the client nonce")]
    NonceMismatch,
    #[error("server asked for {0} iterations, outside 1..={max}", max = ScramClient::MAX_ITERATIONS)]
    BadIterations(u32),
    #[error("server-final message is malformed")]
    MalformedServerFinal,
    #[error("server reported error: {0}")]
    ServerError(String),
    #[error("server signature does not verify: the server does not know the credentials")]
    ServerSignatureMismatch,
    #[error("SCRAM client called out of order")]
    OutOfOrder,
}

/// One SCRAM exchange on the client side (no channel binding: GS2 header `n,,`).
pub struct ScramClient {
    hash: ScramHash,
    password: String,
    client_nonce: String,
    /// `n=user,r=nonce`, part of the AuthMessage.
    client_first_bare: String,
    /// The ServerSignature expected in server-final, once client-final has been built.
    expected_server_signature: Option<Vec<u8>>,
}

// The password is a secret: keep it out of debug output.
impl std::fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramClient")
            .field("hash", &self.hash)
            .field("client_first_bare", &self.client_first_bare)
            .finish_non_exhaustive()
    }
}

/// GS2 header for "no channel binding, no authzid", and its base64 for `c=`.
const GS2_HEADER: &str = "n,,";
const GS2_HEADER_B64: &str = "biws";

impl ScramClient {
    /// The most PBKDF2 iterations a server may demand; more would let a hostile server
    /// burn the client's CPU.
    pub const MAX_ITERATIONS: u32 = 1_000_000;

    /// Username and password are SASLprep'ed (RFC 4013) when they can be; a string
    /// SASLprep rejects is used as given, and the server will then refuse it.
    /// `client_nonce` must be printable ASCII without `,` and should be random.
    pub fn new(hash: ScramHash, username: &str, password: &str, client_nonce: String) -> Self {
        debug_assert!(
            is_valid_nonce(&client_nonce),
            "the client nonce must be non-empty printable ASCII without ','"
        );
        let username = prep_or_raw(username);
        let client_first_bare = format!("n={},r={client_nonce}", escape_saslname(&username));
        Self {
            hash,
            password: prep_or_raw(password),
            client_nonce,
            client_first_bare,
            expected_server_signature: None,
        }
    }

    /// client-first-message: `n,,n=user,r=nonce`.
    pub fn client_first(&self) -> Vec<u8> {
        format!("{GS2_HEADER}{}", self.client_first_bare).into_bytes()
    }

    /// Takes server-first (the first `<challenge/>`) and returns client-final.
    pub fn handle_challenge(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramClientError> {
        use ScramClientError::{BadIterations, MalformedServerFirst, NonceMismatch, OutOfOrder};

        if self.expected_server_signature.is_some() {
            return Err(OutOfOrder);
        }
        let msg = std::str::from_utf8(server_first).map_err(|_| MalformedServerFirst)?;
        let mut attrs = msg.split(',');
        // A leading `m=` (mandatory extension) is not understood, so it fails here too.
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .filter(|n| is_valid_nonce(n))
            .ok_or(MalformedServerFirst)?;
        let salt = attrs
            .next()
            .and_then(|a| a.strip_prefix("s="))
            .and_then(|s| BASE64.decode(s).ok())
            .ok_or(MalformedServerFirst)?;
        let iterations: u32 = attrs
            .next()
            .and_then(|a| a.strip_prefix("i="))
            .and_then(|i| i.parse().ok())
            .ok_or(MalformedServerFirst)?;
        if !attrs.all(is_extension) {
            return Err(MalformedServerFirst);
        }
        // The server must add its own part, or a replayed exchange would verify.
        if nonce.len() <= self.client_nonce.len() || !nonce.starts_with(&self.client_nonce) {
            return Err(NonceMismatch);
        }
        if !(1..=Self::MAX_ITERATIONS).contains(&iterations) {
            return Err(BadIterations(iterations));
        }

        let salted = self
            .hash
            .salted_password(self.password.as_bytes(), &salt, iterations);
        let client_key = self.hash.hmac(&salted, b"Client Key");
        let stored_key = self.hash.hash(&client_key);
        let server_key = self.hash.hmac(&salted, b"Server Key");
        let without_proof = format!("c={GS2_HEADER_B64},r={nonce}");
        let auth_message = format!("{},{msg},{without_proof}", self.client_first_bare);
        let client_signature = self.hash.hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&client_signature)
            .map(|(k, s)| k ^ s)
            .collect();
        self.expected_server_signature = Some(self.hash.hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)).into_bytes())
    }

    /// Checks server-final (the `<success/>` additional data, `v=…`).
    pub fn verify_success(&self, additional_data: &[u8]) -> Result<(), ScramClientError> {
        use ScramClientError::{MalformedServerFinal, OutOfOrder, ServerError};

        let expected = self
            .expected_server_signature
            .as_deref()
            .ok_or(OutOfOrder)?;
        let msg = std::str::from_utf8(additional_data).map_err(|_| MalformedServerFinal)?;
        let first = msg.split(',').next().unwrap_or_default();
        if let Some(e) = first.strip_prefix("e=") {
            return Err(ServerError(e.to_owned()));
        }
        let signature = first
            .strip_prefix("v=")
            .and_then(|v| BASE64.decode(v).ok())
            .ok_or(MalformedServerFinal)?;
        if constant_time_eq(&signature, expected) {
            Ok(())
        } else {
            Err(ScramClientError::ServerSignatureMismatch)
        }
    }
}

/// A PLAIN message with an empty authzid: `\0username\0password`. No SASLprep is applied;
/// the server prepares both strings itself.
pub fn plain_initial_response(username: &str, password: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(username.len() + password.len() + 2);
    out.push(0);
    out.extend_from_slice(username.as_bytes());
    out.push(0);
    out.extend_from_slice(password.as_bytes());
    out
}

fn prep_or_raw(s: &str) -> String {
    stringprep::saslprep(s)
        .map(|p| p.into_owned())
        .unwrap_or_else(|_| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sasl::{Mechanism, SaslFailure, SaslServer, SaslStep, StoredCredentials};

    #[test]
    fn rfc5802_sha1_client() {
        let mut c = ScramClient::new(
            ScramHash::Sha1,
            "user",
            "pencil",
            "fyko+d2lbbFgONRv9qkxdawL".into(),
        );
        assert_eq!(c.client_first(), b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL");
        assert_eq!(
            c.verify_success(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="),
            Err(ScramClientError::OutOfOrder)
        );
        let fin = c
            .handle_challenge(
                b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
            )
            .unwrap();
        assert_eq!(
            String::from_utf8(fin).unwrap(),
            "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
        );
        assert_eq!(c.verify_success(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="), Ok(()));
        assert_eq!(
            c.verify_success(b"v=AAF9pqV8S7suAoZWja4dJRkFsKQ="),
            Err(ScramClientError::ServerSignatureMismatch)
        );
        assert_eq!(
            c.handle_challenge(b"r=fyko+d2lbbFgONRv9qkxdawLx,s=QSXCR+Q6sek8bf92,i=4096"),
            Err(ScramClientError::OutOfOrder)
        );
    }

    #[test]
    fn rfc7677_sha256_client() {
        let mut c = ScramClient::new(
            ScramHash::Sha256,
            "user",
            "pencil",
            "rOprNGfwEbeRWgbNEkqO".into(),
        );
        assert_eq!(c.client_first(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let fin = c
            .handle_challenge(
                b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            )
            .unwrap();
        assert_eq!(
            String::from_utf8(fin).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert_eq!(
            c.verify_success(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Ok(())
        );
    }

    /// Runs a full client↔server exchange and returns the server's final step.
    fn round_trip(mech: Mechanism, hash: ScramHash, user: &str, password: &str) -> SaslStep {
        let stored = StoredCredentials::derive("correct horse", b"salt-1", b"salt-2", 4096);
        let mut client = ScramClient::new(hash, user, password, "clientNONCE".into());
        let mut server = SaslServer::new(mech, "serverNONCE".into());
        let SaslStep::NeedCredentials { username } = server.start(&client.client_first()) else {
            panic!("expected NeedCredentials");
        };
        let creds = (username == "alice").then_some(&stored);
        let SaslStep::Challenge(server_first) = server.credentials(creds) else {
            panic!("expected a challenge");
        };
        let client_final = client.handle_challenge(&server_first).unwrap();
        let step = server.respond(&client_final);
        if let SaslStep::Success {
            additional_data: Some(v),
            ..
        } = &step
        {
            assert_eq!(client.verify_success(v), Ok(()));
        }
        step
    }

    #[test]
    fn round_trips() {
        for (mech, hash) in [
            (Mechanism::ScramSha1, ScramHash::Sha1),
            (Mechanism::ScramSha256, ScramHash::Sha256),
        ] {
            let ok = round_trip(mech, hash, "alice", "correct horse");
            assert!(
                matches!(&ok, SaslStep::Success { username, additional_data: Some(_) } if username == "alice"),
                "{ok:?}"
            );
            assert_eq!(
                round_trip(mech, hash, "alice", "wrong horse"),
                SaslStep::Failure(SaslFailure::NotAuthorized)
            );
            assert_eq!(
                round_trip(mech, hash, "bob", "correct horse"),
                SaslStep::Failure(SaslFailure::NotAuthorized)
            );
            // SASLprep on the client: U+00A0 becomes the space the stored password has.
            assert!(matches!(
                round_trip(mech, hash, "al\u{AD}ice", "correct\u{A0}horse"),
                SaslStep::Success { .. }
            ));
        }
    }

    #[test]
    fn username_escaping() {
        let c = ScramClient::new(ScramHash::Sha256, "a,b=c", "pw", "n".into());
        assert_eq!(c.client_first(), b"n,,n=a=2Cb=3Dc,r=n");
        let mut s = SaslServer::new(Mechanism::ScramSha256, "srv".into());
        assert_eq!(
            s.start(&c.client_first()),
            SaslStep::NeedCredentials {
                username: "a,b=c".into()
            }
        );
    }

    #[test]
    fn bad_server_first() {
        let client = || ScramClient::new(ScramHash::Sha1, "user", "pencil", "abc".into());
        for (msg, err) in [
            (
                &b"r=abcdef,s=QSXCR+Q6sek8bf92"[..],
                ScramClientError::MalformedServerFirst,
            ),
            (
                b"s=QSXCR+Q6sek8bf92,r=abcdef,i=1",
                ScramClientError::MalformedServerFirst,
            ),
            (b"r=abcdef,s=!!,i=1", ScramClientError::MalformedServerFirst),
            (
                b"r=abcdef,s=QSXCR+Q6sek8bf92,i=x",
                ScramClientError::MalformedServerFirst,
            ),
            (
                b"m=x,r=abcdef,s=QSXCR+Q6sek8bf92,i=1",
                ScramClientError::MalformedServerFirst,
            ),
            (
                b"r=abc,s=QSXCR+Q6sek8bf92,i=1",
                ScramClientError::NonceMismatch,
            ),
            (
                b"r=xyzdef,s=QSXCR+Q6sek8bf92,i=1",
                ScramClientError::NonceMismatch,
            ),
            (
                b"r=abcdef,s=QSXCR+Q6sek8bf92,i=0",
                ScramClientError::BadIterations(0),
            ),
            (
                b"r=abcdef,s=QSXCR+Q6sek8bf92,i=4000000000",
                ScramClientError::BadIterations(4_000_000_000),
            ),
        ] {
            assert_eq!(client().handle_challenge(msg), Err(err), "{msg:?}");
        }
    }

    #[test]
    fn bad_server_final() {
        let mut c = ScramClient::new(ScramHash::Sha1, "user", "pencil", "abc".into());
        c.handle_challenge(b"r=abcdef,s=QSXCR+Q6sek8bf92,i=1")
            .unwrap();
        assert_eq!(
            c.verify_success(b"e=invalid-proof"),
            Err(ScramClientError::ServerError("invalid-proof".into()))
        );
        assert_eq!(
            c.verify_success(b"x=abc"),
            Err(ScramClientError::MalformedServerFinal)
        );
        assert_eq!(
            c.verify_success(b"v=!!"),
            Err(ScramClientError::MalformedServerFinal)
        );
    }

    #[test]
    fn plain_message() {
        assert_eq!(plain_initial_response("user", "pencil"), b"\0user\0pencil");
        let stored = StoredCredentials::derive("pencil", b"s1", b"s2", 4096);
        let mut s = SaslServer::new(Mechanism::Plain, "unused".into());
        assert_eq!(
            s.start(&plain_initial_response("user", "pencil")),
            SaslStep::NeedCredentials {
                username: "user".into()
            }
        );
        assert_eq!(
            s.credentials(Some(&stored)),
            SaslStep::Success {
                username: "user".into(),
                additional_data: None
            }
        );
    }
}
