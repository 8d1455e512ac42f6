//! Stream and stanza error conditions, and the one place internal errors become them.
//!
//! RFC 6120 §4.9 (stream errors) and §8.3 (stanza errors) define closed sets of
//! conditions; they are enums here so nothing else spells them. [`StreamError::from`]
//! implementations map framer, parser and negotiation faults to the condition the RFC
//! asks for (DESIGN.md invariant 7).

use std::fmt::Write as _;

use crate::framer::FrameError;
use crate::ns;
use crate::xml::{XmlError, escape_into};

macro_rules! conditions {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $wire:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant,)* }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The element name on the wire.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire,)* }
            }

            pub fn from_name(s: &str) -> Option<Self> {
                match s { $($wire => Some($name::$variant),)* _ => None }
            }
        }
    };
}

conditions! {
    /// RFC 6120 §4.9.3 stream error conditions.
    StreamErrorCondition {
        BadFormat = "bad-format",
        BadNamespacePrefix = "bad-namespace-prefix",
        Conflict = "conflict",
        ConnectionTimeout = "connection-timeout",
        HostGone = "host-gone",
        HostUnknown = "host-unknown",
        ImproperAddressing = "improper-addressing",
        InternalServerError = "internal-server-error",
        InvalidFrom = "invalid-from",
        InvalidNamespace = "invalid-namespace",
        InvalidXml = "invalid-xml",
        NotAuthorized = "not-authorized",
        NotWellFormed = "not-well-formed",
        PolicyViolation = "policy-violation",
        RemoteConnectionFailed = "remote-connection-failed",
        Reset = "reset",
        ResourceConstraint = "resource-constraint",
        RestrictedXml = "restricted-xml",
        SeeOtherHost = "see-other-host",
        SystemShutdown = "system-shutdown",
        UndefinedCondition = "undefined-condition",
        UnsupportedEncoding = "unsupported-encoding",
        UnsupportedFeature = "unsupported-feature",
        UnsupportedStanzaType = "unsupported-stanza-type",
        UnsupportedVersion = "unsupported-version",
    }
}

conditions! {
    /// RFC 6120 §8.3.3 stanza error conditions.
    StanzaErrorCondition {
        BadRequest = "bad-request",
        Conflict = "conflict",
        FeatureNotImplemented = "feature-not-implemented",
        Forbidden = "forbidden",
        Gone = "gone",
        InternalServerError = "internal-server-error",
        ItemNotFound = "item-not-found",
        JidMalformed = "jid-malformed",
        NotAcceptable = "not-acceptable",
        NotAllowed = "not-allowed",
        NotAuthorized = "not-authorized",
        PolicyViolation = "policy-violation",
        RecipientUnavailable = "recipient-unavailable",
        Redirect = "redirect",
        RegistrationRequired = "registration-required",
        RemoteServerNotFound = "remote-server-not-found",
        RemoteServerTimeout = "remote-server-timeout",
        ResourceConstraint = "resource-constraint",
        ServiceUnavailable = "service-unavailable",
        SubscriptionRequired = "subscription-required",
        UndefinedCondition = "undefined-condition",
        UnexpectedRequest = "unexpected-request",
    }
}

conditions! {
    /// RFC 6120 §8.3.2 stanza error types.
    StanzaErrorType {
        Auth = "auth",
        Cancel = "cancel",
        Continue = "continue",
        Modify = "modify",
        Wait = "wait",
    }
}

impl StanzaErrorCondition {
    /// The error type RFC 6120 §8.3.3 gives in its example for each condition, used when
    /// the caller has no reason to pick another.
    pub fn default_type(self) -> StanzaErrorType {
        use StanzaErrorCondition::*;
        match self {
            BadRequest | JidMalformed | NotAcceptable | PolicyViolation | Redirect => {
                StanzaErrorType::Modify
            }
            Forbidden | NotAuthorized | RegistrationRequired | SubscriptionRequired => {
                StanzaErrorType::Auth
            }
            RecipientUnavailable | RemoteServerTimeout | ResourceConstraint => {
                StanzaErrorType::Wait
            }
            Conflict
            | FeatureNotImplemented
            | Gone
            | InternalServerError
            | ItemNotFound
            | NotAllowed
            | RemoteServerNotFound
            | ServiceUnavailable
            | UndefinedCondition
            | UnexpectedRequest => StanzaErrorType::Cancel,
        }
    }
}

/// A stream-level error: the stream is closed after sending it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamError {
    pub condition: StreamErrorCondition,
    /// Human-readable text for the peer (and the log line).
    pub text: Option<String>,
    /// With `<see-other-host/>` only: where the peer should reconnect, `host` or
    /// `host:port` (RFC 6120 §4.9.3.19), the condition element's content.
    pub other_host: Option<String>,
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.condition.as_str())?;
        if let Some(host) = &self.other_host {
            write!(f, " {host}")?;
        }
        match &self.text {
            Some(text) => write!(f, " ({text})"),
            None => Ok(()),
        }
    }
}

impl StreamError {
    pub fn new(condition: StreamErrorCondition) -> Self {
        Self {
            condition,
            text: None,
            other_host: None,
        }
    }

    pub fn with_text(condition: StreamErrorCondition, text: impl Into<String>) -> Self {
        Self {
            text: Some(text.into()),
            ..Self::new(condition)
        }
    }

    /// `<see-other-host>host</see-other-host>`: the peer should reconnect to `host`
    /// (`host` or `host:port`, an IPv6 address in brackets).
    pub fn see_other_host(host: impl Into<String>) -> Self {
        Self {
            other_host: Some(host.into()),
            ..Self::new(StreamErrorCondition::SeeOtherHost)
        }
    }

    /// `<stream:error>…</stream:error>` (the stream close is written separately).
    pub fn to_xml(&self) -> String {
        let condition = self.condition.as_str();
        let mut s = format!("<stream:error><{condition} xmlns='{}'", ns::STREAM_ERRORS);
        match &self.other_host {
            Some(host) => {
                s.push('>');
                escape_into(&mut s, host);
                let _ = write!(s, "</{condition}>");
            }
            None => s.push_str("/>"),
        }
        if let Some(text) = &self.text {
            let _ = write!(s, "<text xmlns='{}'>", ns::STREAM_ERRORS);
            escape_into(&mut s, text);
            s.push_str("</text>");
        }
        s.push_str("</stream:error>");
        s
    }
}

impl From<StreamErrorCondition> for StreamError {
    fn from(condition: StreamErrorCondition) -> Self {
        Self::new(condition)
    }
}

impl From<FrameError> for StreamError {
    fn from(e: FrameError) -> Self {
        let condition = match e {
            FrameError::NotWellFormed(_) | FrameError::InvalidUtf8 => {
                StreamErrorCondition::NotWellFormed
            }
            FrameError::RestrictedXml(_) => StreamErrorCondition::RestrictedXml,
            // RFC 6120 §13.12: an over-large stanza is a policy violation; so is abusive
            // nesting, which has no condition of its own.
            FrameError::TooLarge { .. } | FrameError::TooDeep { .. } => {
                StreamErrorCondition::PolicyViolation
            }
        };
        Self::with_text(condition, e.to_string())
    }
}

impl From<XmlError> for StreamError {
    fn from(e: XmlError) -> Self {
        let condition = match e {
            XmlError::NotWellFormed(_) => StreamErrorCondition::NotWellFormed,
            XmlError::BadNamespacePrefix(_) => StreamErrorCondition::BadNamespacePrefix,
        };
        Self::with_text(condition, e.to_string())
    }
}

/// A stanza-level error, sent back in an error stanza.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StanzaError {
    pub error_type: StanzaErrorType,
    pub condition: StanzaErrorCondition,
    pub text: Option<String>,
}

impl StanzaError {
    pub fn new(condition: StanzaErrorCondition) -> Self {
        Self {
            error_type: condition.default_type(),
            condition,
            text: None,
        }
    }

    pub fn with_text(condition: StanzaErrorCondition, text: impl Into<String>) -> Self {
        Self {
            text: Some(text.into()),
            ..Self::new(condition)
        }
    }

    /// `<error type='…'><condition xmlns='…'/>[<text/>]</error>`.
    pub fn write_to(&self, out: &mut String) {
        let _ = write!(
            out,
            "<error type='{}'><{} xmlns='{}'/>",
            self.error_type.as_str(),
            self.condition.as_str(),
            ns::STANZA_ERRORS
        );
        if let Some(text) = &self.text {
            let _ = write!(out, "<text xmlns='{}'>", ns::STANZA_ERRORS);
            escape_into(out, text);
            out.push_str("</text>");
        }
        out.push_str("</error>");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_names_round_trip() {
        for c in StreamErrorCondition::ALL {
            assert_eq!(StreamErrorCondition::from_name(c.as_str()), Some(*c));
        }
        for c in StanzaErrorCondition::ALL {
            assert_eq!(StanzaErrorCondition::from_name(c.as_str()), Some(*c));
        }
        assert_eq!(StreamErrorCondition::ALL.len(), 25);
        assert_eq!(StanzaErrorCondition::ALL.len(), 22);
    }

    #[test]
    fn stream_error_xml() {
        let e = StreamError::with_text(StreamErrorCondition::PolicyViolation, "too <big>");
        assert_eq!(
            e.to_xml(),
            "<stream:error><policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>too &lt;big&gt;</text></stream:error>"
        );
    }

    #[test]
    fn see_other_host_xml() {
        let e = StreamError::see_other_host("[2001:db8::1]:5222");
        assert_eq!(
            e.to_xml(),
            "<stream:error><see-other-host xmlns='urn:ietf:params:xml:ns:xmpp-streams'>\
             [2001:db8::1]:5222</see-other-host></stream:error>"
        );
        assert_eq!(e.to_string(), "see-other-host [2001:db8::1]:5222");
    }

    #[test]
    fn frame_errors_map_to_rfc_conditions() {
        use StreamErrorCondition::*;
        let cases = [
            (FrameError::NotWellFormed("x"), NotWellFormed),
            (FrameError::InvalidUtf8, NotWellFormed),
            (FrameError::RestrictedXml("comment"), RestrictedXml),
            (FrameError::TooLarge { limit: 1 }, PolicyViolation),
            (FrameError::TooDeep { limit: 1 }, PolicyViolation),
        ];
        for (fe, want) in cases {
            assert_eq!(StreamError::from(fe).condition, want);
        }
    }

    #[test]
    fn stanza_error_xml() {
        let mut s = String::new();
        StanzaError::new(StanzaErrorCondition::ServiceUnavailable).write_to(&mut s);
        assert_eq!(
            s,
            "<error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>"
        );
        assert_eq!(
            StanzaError::new(StanzaErrorCondition::ResourceConstraint).error_type,
            StanzaErrorType::Wait
        );
    }
}
