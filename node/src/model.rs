//! Stored per-account data shared by the storage backends and the user logic: roster
//! items with their subscription state (RFC 6121 §2, §3 and Appendix A), and offline
//! messages.
//!
//! Plain data only: no I/O, no protocol decisions. The subscription state machine lives
//! in `roster`, persistence in `storage`.

use std::collections::BTreeMap;

/// The `subscription` attribute of a roster item (RFC 6121 §2.1.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Subscription {
    #[default]
    None,
    /// The user receives the contact's presence.
    To,
    /// The contact receives the user's presence.
    From,
    Both,
}

impl Subscription {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::To => "to",
            Self::From => "from",
            Self::Both => "both",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Self::None,
            "to" => Self::To,
            "from" => Self::From,
            "both" => Self::Both,
            _ => return None,
        })
    }

    /// The user receives the contact's presence.
    pub fn has_to(self) -> bool {
        matches!(self, Self::To | Self::Both)
    }

    /// The contact receives the user's presence.
    pub fn has_from(self) -> bool {
        matches!(self, Self::From | Self::Both)
    }
}

/// One contact on a user's roster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RosterItem {
    /// The contact's bare JID (prepared), also the roster's key.
    pub jid: String,
    pub name: Option<String>,
    pub groups: Vec<String>,
    pub subscription: Subscription,
    /// The user asked to subscribe and the contact has not answered ("Pending Out",
    /// shown as `ask='subscribe'`).
    pub ask: bool,
    /// The user pre-approved a subscription request from the contact (RFC 6121 §3.4).
    pub approved: bool,
}

/// A user's roster with its version (RFC 6121 §2.6).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Roster {
    /// Incremented on every change; clients cache by it.
    pub version: u64,
    /// Items by contact bare JID.
    pub items: BTreeMap<String, RosterItem>,
    /// Subscription requests from contacts awaiting the user's answer ("Pending In"),
    /// by contact bare JID, with the request's payload XML (status, nick) to redeliver
    /// at the user's next login. Not shown in the roster itself.
    pub pending_in: BTreeMap<String, String>,
}

/// What the shard loads from storage before a user's stanzas can be handled.
#[derive(Debug, Clone, Default)]
pub struct UserData {
    /// The account exists (stanzas to unknown accounts are refused, never stored).
    pub exists: bool,
    pub roster: Roster,
    pub blocklist: Vec<String>,
}

/// A message stored for an offline user (XEP-0160).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineMessage {
    /// Position in the user's queue, increasing; used to remove what was delivered.
    pub seq: u64,
    /// When the server stored it, milliseconds since the Unix epoch (for the XEP-0203
    /// delay stamp).
    pub stored_at_ms: u64,
    /// The message stanza as routed (with `from` and `to`), serialised.
    pub xml: String,
}
