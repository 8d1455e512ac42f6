//! SCRAM (RFC 5802, RFC 7677) on the server side, plus the message syntax helpers the
//! client in `client.rs` shares.
//!
//! The server never sees a password: it verifies the client's proof against the stored
//! keys. It must never reveal whether an account exists before the final step, so an
//! unknown user gets a plausible fake salt and fails only on the proof. Channel binding
//! (`-PLUS`) is not implemented, so a client asking for it is refused.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::credentials::constant_time_eq;
use super::server::{SaslFailure, SaslStep, saslprep_name};
use super::{ScramCredentials, ScramHash, StoredCredentials};

/// Length of the fake salt shown for unknown users. Real salts should have the same
/// length or the difference gives the game away.
const FAKE_SALT_LEN: usize = 16;

/// Server state for one SCRAM exchange.
#[derive(Debug)]
pub(super) struct ScramServer {
    hash: ScramHash,
    /// The driver's random half of the combined nonce.
    server_nonce: String,
    fake_salt_secret: Option<Vec<u8>>,
    state: State,
}

#[derive(Debug)]
enum State {
    /// `start` not yet called.
    Initial,
    /// `<auth/>` had no initial response; client-first comes in a `<response/>`.
    AwaitClientFirst,
    /// Client-first parsed; waiting for the driver's credential lookup.
    AwaitCredentials(ClientFirst),
    /// Server-first sent; waiting for client-final.
    AwaitClientFinal(Box<Pending>),
    /// Succeeded or failed; every further call is out of order.
    Done,
}

/// The parts of client-first the later steps need.
#[derive(Debug)]
struct ClientFirst {
    /// The raw GS2 header (`n,,`), which client-final must echo base64-encoded in `c=`.
    gs2_header: String,
    /// client-first-message-bare, verbatim, for the AuthMessage.
    bare: String,
    /// The SASLprep'ed, unescaped username.
    username: String,
    client_nonce: String,
}

#[derive(Debug)]
struct Pending {
    first: ClientFirst,
    server_first: String,
    /// client nonce + server nonce, which client-final must repeat.
    nonce: String,
    keys: ScramCredentials,
    /// False when `keys` are the fake ones made up for an unknown user.
    known: bool,
}

impl ScramServer {
    pub(super) fn new(hash: ScramHash, server_nonce: String) -> Self {
        // A bad nonce is a driver bug; in release it would only make clients fail.
        debug_assert!(
            is_valid_nonce(&server_nonce),
            "the server nonce must be non-empty printable ASCII without ','"
        );
        Self {
            hash,
            server_nonce,
            fake_salt_secret: None,
            state: State::Initial,
        }
    }

    pub(super) fn set_fake_salt_secret(&mut self, secret: &[u8]) {
        self.fake_salt_secret = Some(secret.to_vec());
    }

    pub(super) fn start(&mut self, initial_response: &[u8]) -> SaslStep {
        match std::mem::replace(&mut self.state, State::Done) {
            // RFC 6120 §6.4.2: without an initial response the server sends an empty
            // challenge and the client answers with client-first.
            State::Initial if initial_response.is_empty() => {
                self.state = State::AwaitClientFirst;
                SaslStep::Challenge(Vec::new())
            }
            State::Initial => self.client_first(initial_response),
            _ => SaslStep::Failure(SaslFailure::MalformedRequest),
        }
    }

    pub(super) fn respond(&mut self, data: &[u8]) -> SaslStep {
        match std::mem::replace(&mut self.state, State::Done) {
            State::AwaitClientFirst => self.client_first(data),
            State::AwaitClientFinal(pending) => self.client_final(*pending, data),
            _ => SaslStep::Failure(SaslFailure::MalformedRequest),
        }
    }

    pub(super) fn credentials(&mut self, creds: Option<&StoredCredentials>) -> SaslStep {
        let State::AwaitCredentials(first) = std::mem::replace(&mut self.state, State::Done) else {
            return SaslStep::Failure(SaslFailure::MalformedRequest);
        };
        let (keys, known) = match creds {
            Some(c) => (c.for_hash(self.hash).clone(), true),
            None => (self.fake_keys(&first.username), false),
        };
        let nonce = format!("{}{}", first.client_nonce, self.server_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(&keys.salt),
            keys.iterations
        );
        let challenge = server_first.clone().into_bytes();
        self.state = State::AwaitClientFinal(Box::new(Pending {
            first,
            server_first,
            nonce,
            keys,
            known,
        }));
        SaslStep::Challenge(challenge)
    }

    fn client_first(&mut self, data: &[u8]) -> SaslStep {
        match parse_client_first(data) {
            Ok(first) => {
                let username = first.username.clone();
                self.state = State::AwaitCredentials(first);
                SaslStep::NeedCredentials { username }
            }
            Err(f) => SaslStep::Failure(f),
        }
    }

    fn client_final(&mut self, pending: Pending, data: &[u8]) -> SaslStep {
        match verify_client_final(self.hash, &pending, data) {
            Ok(server_signature) => SaslStep::Success {
                username: pending.first.username,
                additional_data: Some(
                    format!("v={}", BASE64.encode(server_signature)).into_bytes(),
                ),
            },
            Err(f) => SaslStep::Failure(f),
        }
    }

    /// Keys for a user who does not exist. The salt must look like a real one and stay
    /// the same for the same username, so a probing client cannot tell the difference;
    /// the keys themselves never verify because `known` is false.
    fn fake_keys(&self, username: &str) -> ScramCredentials {
        let mut input = b"shoal-scram-fake-salt\0".to_vec();
        input.extend_from_slice(self.hash_label());
        input.push(0);
        input.extend_from_slice(username.as_bytes());
        let digest = match &self.fake_salt_secret {
            Some(secret) => ScramHash::Sha256.hmac(secret, &input),
            None => {
                input.push(0);
                input.extend_from_slice(self.server_nonce.as_bytes());
                ScramHash::Sha256.hash(&input)
            }
        };
        let salt = digest[..FAKE_SALT_LEN].to_vec();
        ScramCredentials {
            iterations: StoredCredentials::DEFAULT_ITERATIONS,
            stored_key: self.hash.hash(&digest),
            server_key: self.hash.hash(&salt),
            salt,
        }
    }

    fn hash_label(&self) -> &'static [u8] {
        match self.hash {
            ScramHash::Sha1 => b"SHA-1",
            ScramHash::Sha256 => b"SHA-256",
        }
    }
}

/// Parses `gs2-header client-first-message-bare` (RFC 5802 §7).
fn parse_client_first(data: &[u8]) -> Result<ClientFirst, SaslFailure> {
    use SaslFailure::{InvalidAuthzid, MalformedRequest, NotAuthorized};

    let msg = std::str::from_utf8(data).map_err(|_| MalformedRequest)?;
    let mut parts = msg.splitn(3, ',');
    let cbind_flag = parts.next().unwrap_or_default();
    let authzid = parts.next().ok_or(MalformedRequest)?;
    let bare = parts.next().ok_or(MalformedRequest)?;

    match cbind_flag {
        // `y` means the client could bind but believes we cannot; true, so carry on.
        "n" | "y" => {}
        // We never advertise -PLUS, so a client demanding binding is not one we accept.
        f if f.starts_with("p=") => return Err(NotAuthorized),
        _ => return Err(MalformedRequest),
    }
    match authzid {
        "" | "a=" => {}
        a => {
            let a = a.strip_prefix("a=").ok_or(MalformedRequest)?;
            unescape_saslname(a).ok_or(MalformedRequest)?;
            // Acting as someone else is not supported; the bound JID is the user's own.
            return Err(InvalidAuthzid);
        }
    }
    let gs2_header = msg[..cbind_flag.len() + authzid.len() + 2].to_owned();

    let mut attrs = bare.split(',');
    let first = attrs.next().unwrap_or_default();
    // `m=` is reserved for future mandatory extensions, none of which we know.
    let name = first.strip_prefix("n=").ok_or(MalformedRequest)?;
    let name = unescape_saslname(name).ok_or(MalformedRequest)?;
    let username = saslprep_name(&name).ok_or(MalformedRequest)?;
    let client_nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .filter(|n| is_valid_nonce(n))
        .ok_or(MalformedRequest)?;
    if !attrs.all(is_extension) {
        return Err(MalformedRequest);
    }
    Ok(ClientFirst {
        gs2_header,
        bare: bare.to_owned(),
        username,
        client_nonce: client_nonce.to_owned(),
    })
}

/// Checks client-final (`c=…,r=…[,ext],p=…`) and returns the ServerSignature.
fn verify_client_final(
    hash: ScramHash,
    pending: &Pending,
    data: &[u8],
) -> Result<Vec<u8>, SaslFailure> {
    use SaslFailure::{MalformedRequest, NotAuthorized};

    let msg = std::str::from_utf8(data).map_err(|_| MalformedRequest)?;
    // The proof is the last attribute and base64 has no ',', so the last ",p=" starts it.
    let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(MalformedRequest)?;
    let mut attrs = without_proof.split(',');
    let cbind = attrs
        .next()
        .and_then(|a| a.strip_prefix("c="))
        .ok_or(MalformedRequest)?;
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(MalformedRequest)?;
    if !attrs.all(is_extension) {
        return Err(MalformedRequest);
    }
    let cbind = BASE64.decode(cbind).map_err(|_| MalformedRequest)?;
    let proof = BASE64.decode(proof).map_err(|_| MalformedRequest)?;

    // A different header than the one sent in client-first could be a downgrade.
    if cbind != pending.first.gs2_header.as_bytes() || nonce != pending.nonce {
        return Err(NotAuthorized);
    }

    let auth_message = format!(
        "{},{},{}",
        pending.first.bare, pending.server_first, without_proof
    );
    let keys = &pending.keys;
    let client_signature = hash.hmac(&keys.stored_key, auth_message.as_bytes());
    if proof.len() != client_signature.len() {
        return Err(NotAuthorized);
    }
    let client_key: Vec<u8> = proof
        .iter()
        .zip(&client_signature)
        .map(|(p, s)| p ^ s)
        .collect();
    // Compare first, then look at `known`, so unknown users take the same path.
    let proof_ok = constant_time_eq(&hash.hash(&client_key), &keys.stored_key);
    if !(proof_ok && pending.known) {
        return Err(NotAuthorized);
    }
    Ok(hash.hmac(&keys.server_key, auth_message.as_bytes()))
}

/// Whether `s` is a valid SCRAM nonce: non-empty printable ASCII except ','.
pub(super) fn is_valid_nonce(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Whether `attr` is a well-formed optional extension attribute (`x=value`).
pub(super) fn is_extension(attr: &str) -> bool {
    let b = attr.as_bytes();
    b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b'='
}

/// Escapes a name for `n=`/`a=`: `,` and `=` would otherwise end or confuse the attribute.
pub(super) fn escape_saslname(name: &str) -> String {
    name.replace('=', "=3D").replace(',', "=2C")
}

/// Reverses [`escape_saslname`]; `None` for any `=` not starting `=2C` or `=3D`.
pub(super) fn unescape_saslname(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        let esc = rest.get(i..i + 3)?;
        out.push(match esc {
            "=2C" => ',',
            "=3D" => '=',
            _ => return None,
        });
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sasl::{Mechanism, SaslServer};

    const SHA1_CLIENT_FIRST: &str = "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL";
    const SHA1_SERVER_NONCE: &str = "3rfcNHYJY1ZVvWVs7j";
    const SHA1_SERVER_FIRST: &str =
        "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096";
    const SHA1_CLIENT_FINAL: &str =
        "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=";
    const SHA1_SERVER_FINAL: &str = "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=";

    const SHA256_CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SHA256_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const SHA256_SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const SHA256_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SHA256_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    /// "pencil" with the salts of both RFC examples.
    fn rfc_creds() -> StoredCredentials {
        StoredCredentials::derive(
            "pencil",
            &BASE64.decode("QSXCR+Q6sek8bf92").unwrap(),
            &BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap(),
            4096,
        )
    }

    fn need(username: &str) -> SaslStep {
        SaslStep::NeedCredentials {
            username: username.to_owned(),
        }
    }

    fn challenge(s: &str) -> SaslStep {
        SaslStep::Challenge(s.as_bytes().to_vec())
    }

    fn fail(f: SaslFailure) -> SaslStep {
        SaslStep::Failure(f)
    }

    /// A SHA-1 server at the point of waiting for client-final, RFC 5802 nonces.
    fn sha1_awaiting_final() -> SaslServer {
        let mut s = SaslServer::new(Mechanism::ScramSha1, SHA1_SERVER_NONCE.into());
        assert_eq!(s.start(SHA1_CLIENT_FIRST.as_bytes()), need("user"));
        assert_eq!(
            s.credentials(Some(&rfc_creds())),
            challenge(SHA1_SERVER_FIRST)
        );
        s
    }

    #[test]
    fn rfc5802_sha1_exchange() {
        let mut s = sha1_awaiting_final();
        assert_eq!(
            s.respond(SHA1_CLIENT_FINAL.as_bytes()),
            SaslStep::Success {
                username: "user".into(),
                additional_data: Some(SHA1_SERVER_FINAL.as_bytes().to_vec()),
            }
        );
        // Done: anything further is out of order.
        assert_eq!(
            s.respond(SHA1_CLIENT_FINAL.as_bytes()),
            fail(SaslFailure::MalformedRequest)
        );
    }

    #[test]
    fn rfc7677_sha256_exchange() {
        let mut s = SaslServer::new(Mechanism::ScramSha256, SHA256_SERVER_NONCE.into());
        assert_eq!(s.start(SHA256_CLIENT_FIRST.as_bytes()), need("user"));
        assert_eq!(
            s.credentials(Some(&rfc_creds())),
            challenge(SHA256_SERVER_FIRST)
        );
        assert_eq!(
            s.respond(SHA256_CLIENT_FINAL.as_bytes()),
            SaslStep::Success {
                username: "user".into(),
                additional_data: Some(SHA256_SERVER_FINAL.as_bytes().to_vec()),
            }
        );
    }

    #[test]
    fn empty_initial_response_takes_client_first_in_response() {
        let mut s = SaslServer::new(Mechanism::ScramSha1, SHA1_SERVER_NONCE.into());
        assert_eq!(s.start(b""), SaslStep::Challenge(Vec::new()));
        assert_eq!(s.respond(SHA1_CLIENT_FIRST.as_bytes()), need("user"));
        assert_eq!(
            s.credentials(Some(&rfc_creds())),
            challenge(SHA1_SERVER_FIRST)
        );
        assert!(matches!(
            s.respond(SHA1_CLIENT_FINAL.as_bytes()),
            SaslStep::Success { .. }
        ));
    }

    #[test]
    fn empty_response_instead_of_client_first_is_malformed() {
        let mut s = SaslServer::new(Mechanism::ScramSha1, SHA1_SERVER_NONCE.into());
        assert_eq!(s.start(b""), SaslStep::Challenge(Vec::new()));
        assert_eq!(s.respond(b""), fail(SaslFailure::MalformedRequest));
    }

    #[test]
    fn wrong_proof_is_not_authorized() {
        let mut s = sha1_awaiting_final();
        let bad =
            "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=AAX8v3Bz2T0CJGbJQyF0X+HI4Ts=";
        assert_eq!(s.respond(bad.as_bytes()), fail(SaslFailure::NotAuthorized));
        assert_eq!(
            s.respond(SHA1_CLIENT_FINAL.as_bytes()),
            fail(SaslFailure::MalformedRequest)
        );
    }

    #[test]
    fn proof_of_wrong_length_is_not_authorized() {
        let mut s = sha1_awaiting_final();
        let bad = "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=AAAA";
        assert_eq!(s.respond(bad.as_bytes()), fail(SaslFailure::NotAuthorized));
    }

    #[test]
    fn wrong_nonce_is_not_authorized() {
        let mut s = sha1_awaiting_final();
        let bad = "c=biws,r=fyko+d2lbbFgONRv9qkxdawL,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=";
        assert_eq!(s.respond(bad.as_bytes()), fail(SaslFailure::NotAuthorized));
    }

    #[test]
    fn channel_binding_mismatch_is_not_authorized() {
        // "eSws" is base64 of "y,,": not the "n,," header client-first carried.
        let mut s = sha1_awaiting_final();
        let bad =
            "c=eSws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=";
        assert_eq!(s.respond(bad.as_bytes()), fail(SaslFailure::NotAuthorized));
    }

    #[test]
    fn unparseable_client_final_is_malformed() {
        let cases: [&[u8]; 7] = [
            b"",
            b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j",
            b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,c=biws,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
            b"c=b!ws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
            b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=not base64",
            b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
            b"c=biws,r=\xff,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
        ];
        for case in cases {
            let mut s = sha1_awaiting_final();
            assert_eq!(
                s.respond(case),
                fail(SaslFailure::MalformedRequest),
                "{case:?}"
            );
        }
    }

    #[test]
    fn client_final_extensions_are_covered_by_the_proof() {
        // An extension the client did not sign changes the AuthMessage, so the RFC's
        // proof no longer verifies, but the message itself is well-formed.
        let mut s = sha1_awaiting_final();
        let ext = "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,x=1,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=";
        assert_eq!(s.respond(ext.as_bytes()), fail(SaslFailure::NotAuthorized));
    }

    #[test]
    fn unknown_user_is_indistinguishable_until_the_end() {
        let mut s = SaslServer::new(Mechanism::ScramSha1, SHA1_SERVER_NONCE.into());
        assert_eq!(
            s.start(b"n,,n=nobody,r=fyko+d2lbbFgONRv9qkxdawL"),
            need("nobody")
        );
        let SaslStep::Challenge(server_first) = s.credentials(None) else {
            panic!("unknown user must still get a challenge");
        };
        let server_first = String::from_utf8(server_first).unwrap();
        let salt = server_first
            .strip_prefix("r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=")
            .and_then(|r| r.strip_suffix(",i=4096"))
            .expect("same shape as a real server-first");
        assert_eq!(BASE64.decode(salt).unwrap().len(), FAKE_SALT_LEN);
        assert_eq!(
            s.respond(SHA1_CLIENT_FINAL.as_bytes()),
            fail(SaslFailure::NotAuthorized)
        );

        // Same username and nonce, same fake salt: the exchange is reproducible.
        let mut again = SaslServer::new(Mechanism::ScramSha1, SHA1_SERVER_NONCE.into());
        again.start(b"n,,n=nobody,r=fyko+d2lbbFgONRv9qkxdawL");
        assert_eq!(again.credentials(None), challenge(&server_first));
    }

    #[test]
    fn fake_salt_secret_makes_the_salt_stable_across_nonces() {
        let salt_with = |nonce: &str, secret: Option<&[u8]>| {
            let mut s = SaslServer::new(Mechanism::ScramSha256, nonce.into());
            if let Some(secret) = secret {
                s = s.with_fake_salt_secret(secret);
            }
            s.start(b"n,,n=nobody,r=abc");
            let SaslStep::Challenge(first) = s.credentials(None) else {
                panic!("expected a challenge");
            };
            let first = String::from_utf8(first).unwrap();
            first.split(',').nth(1).unwrap().to_owned()
        };
        assert_eq!(
            salt_with("n1", Some(b"secret")),
            salt_with("n2", Some(b"secret"))
        );
        assert_ne!(
            salt_with("n1", Some(b"secret")),
            salt_with("n1", Some(b"other"))
        );
        assert_ne!(salt_with("n1", None), salt_with("n2", None));
    }

    #[test]
    fn gs2_header_variants() {
        let start = |msg: &str| {
            let mut s = SaslServer::new(Mechanism::ScramSha256, "srv".into());
            s.start(msg.as_bytes())
        };
        assert_eq!(start("y,,n=user,r=abc"), need("user"));
        assert_eq!(start("n,a=,n=user,r=abc"), need("user"));
        assert_eq!(
            start("p=tls-unique,,n=user,r=abc"),
            fail(SaslFailure::NotAuthorized)
        );
        assert_eq!(
            start("n,a=admin,n=user,r=abc"),
            fail(SaslFailure::InvalidAuthzid)
        );
        assert_eq!(
            start("n,a=ad=2Cmin,n=user,r=abc"),
            fail(SaslFailure::InvalidAuthzid)
        );
        for bad in [
            "x,,n=user,r=abc",
            "N,,n=user,r=abc",
            ",,n=user,r=abc",
            "n,b=x,n=user,r=abc",
            "n,a=ad=min,n=user,r=abc",
            "n,n=user,r=abc",
            "n=user,r=abc",
        ] {
            assert_eq!(start(bad), fail(SaslFailure::MalformedRequest), "{bad}");
        }
    }

    #[test]
    fn y_flag_must_be_echoed_in_client_final() {
        let mut s = SaslServer::new(Mechanism::ScramSha1, SHA1_SERVER_NONCE.into());
        assert_eq!(
            s.start(b"y,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"),
            need("user")
        );
        s.credentials(Some(&rfc_creds()));
        // "biws" is "n,,", but this client sent "y,,".
        assert_eq!(
            s.respond(SHA1_CLIENT_FINAL.as_bytes()),
            fail(SaslFailure::NotAuthorized)
        );
    }

    #[test]
    fn client_first_syntax() {
        let start = |msg: &[u8]| {
            let mut s = SaslServer::new(Mechanism::ScramSha256, "srv".into());
            s.start(msg)
        };
        assert_eq!(start(b"n,,n=us=2Cer=3D,r=abc"), need("us,er="));
        assert_eq!(start(b"n,,n=user,r=abc,x=ext,y=more"), need("user"));
        for bad in [
            &b"n,,n=us=2cer,r=abc"[..],
            b"n,,n=us=er,r=abc",
            b"n,,n=user=,r=abc",
            b"n,,n=user=2,r=abc",
            b"n,,n=,r=abc",
            b"n,,n=user",
            b"n,,n=user,r=",
            b"n,,r=abc,n=user",
            b"n,,m=ext,n=user,r=abc",
            b"n,,n=user,r=abc,",
            b"n,,n=user,r=abc,xyz",
            b"n,,n=user,r=a\x7fb",
            b"n,,n=us\xffer,r=abc",
            b"n,,n=us\x07er,r=abc",
            b"n,,n=\xc2\xad,r=abc",
        ] {
            assert_eq!(start(bad), fail(SaslFailure::MalformedRequest), "{bad:?}");
        }
    }

    #[test]
    fn username_is_saslprepped() {
        let mut s = SaslServer::new(Mechanism::ScramSha256, "srv".into());
        // U+00AD SOFT HYPHEN maps to nothing; U+2168 ROMAN NUMERAL NINE NFKC-folds to "IX".
        assert_eq!(
            s.start("n,,n=us\u{AD}er\u{2168},r=abc".as_bytes()),
            need("userIX")
        );
    }

    #[test]
    fn out_of_order_calls_are_malformed() {
        let mut s = SaslServer::new(Mechanism::ScramSha1, "srv".into());
        assert_eq!(
            s.credentials(Some(&rfc_creds())),
            fail(SaslFailure::MalformedRequest)
        );

        let mut s = SaslServer::new(Mechanism::ScramSha1, "srv".into());
        assert_eq!(
            s.respond(SHA1_CLIENT_FIRST.as_bytes()),
            fail(SaslFailure::MalformedRequest)
        );

        // A response while the credential lookup is outstanding.
        let mut s = SaslServer::new(Mechanism::ScramSha1, "srv".into());
        assert_eq!(s.start(SHA1_CLIENT_FIRST.as_bytes()), need("user"));
        assert_eq!(
            s.respond(SHA1_CLIENT_FINAL.as_bytes()),
            fail(SaslFailure::MalformedRequest)
        );
        assert_eq!(
            s.credentials(Some(&rfc_creds())),
            fail(SaslFailure::MalformedRequest)
        );

        // A second start, and credentials twice.
        let mut s = sha1_awaiting_final();
        assert_eq!(
            s.start(SHA1_CLIENT_FIRST.as_bytes()),
            fail(SaslFailure::MalformedRequest)
        );
        let mut s = sha1_awaiting_final();
        assert_eq!(
            s.credentials(Some(&rfc_creds())),
            fail(SaslFailure::MalformedRequest)
        );

        // After a failure nothing proceeds.
        let mut s = SaslServer::new(Mechanism::ScramSha1, "srv".into());
        assert_eq!(s.start(b"bogus"), fail(SaslFailure::MalformedRequest));
        assert_eq!(
            s.respond(SHA1_CLIENT_FIRST.as_bytes()),
            fail(SaslFailure::MalformedRequest)
        );
    }

    #[test]
    fn saslname_escaping() {
        assert_eq!(escape_saslname("a,b=c"), "a=2Cb=3Dc");
        assert_eq!(unescape_saslname("a=2Cb=3Dc").as_deref(), Some("a,b=c"));
        assert_eq!(unescape_saslname("=3D2C").as_deref(), Some("=2C"));
        assert_eq!(unescape_saslname("plain").as_deref(), Some("plain"));
        assert_eq!(unescape_saslname("a=2"), None);
        assert_eq!(unescape_saslname("a=41"), None);
        assert_eq!(unescape_saslname("="), None);
    }
}
