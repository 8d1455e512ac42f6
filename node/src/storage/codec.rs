//! The binary record format, shared by every backend that stores bytes.
//!
//! Each record starts with a version byte so the format can change without a migration
//! step: readers accept every version they know and reject the rest as corrupt. Every
//! record kind has its own version sequence, all starting at 1.
//!
//! Decoding never panics and never trusts a stored length for an allocation: damaged
//! bytes become [`StorageError::Corrupt`] naming the record. Keys (user, contact, seq)
//! live in the backend's key space, not in these records, so they cannot disagree.

use shoal_xmpp::sasl::{ScramCredentials, StoredCredentials};

use super::StorageError;
use crate::model::{OfflineMessage, RosterItem, Subscription};

/// Version 1: for SHA-1 then SHA-256, `iterations` (u32 BE), then `salt`,
/// `stored_key` and `server_key`, each a u16 BE length and the bytes.
const CREDENTIALS_V1: u8 = 1;
/// Version 1: a u64 BE. Roster versions and offline sequence counters.
const COUNTER_V1: u8 = 1;
/// Version 1: one string (u32 BE length, UTF-8). vCards, private XML, pending-in payloads.
const TEXT_V1: u8 = 1;
/// Version 1: `name` as a presence byte (0 or 1) then a string when 1; the group count
/// (u32 BE) then each group as a string; the subscription as a byte (0 none, 1 to,
/// 2 from, 3 both); a flags byte (bit 0 ask, bit 1 approved, the rest zero). The
/// contact's JID is the record's key.
const ROSTER_ITEM_V1: u8 = 1;
/// Version 1: `stored_at_ms` (u64 BE) then the stanza as a string. The seq is the key.
const OFFLINE_V1: u8 = 1;
/// Version 1: the count (u32 BE) then each JID as a string.
const BLOCKLIST_V1: u8 = 1;
/// Version 1: unix seconds (u64 BE) then the status as a string.
const LAST_ACTIVITY_V1: u8 = 1;

const FLAG_ASK: u8 = 1;
const FLAG_APPROVED: u8 = 2;

pub(crate) fn encode_credentials(creds: &StoredCredentials) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::with_capacity(1 + 2 * (4 + 6 + 16 + 32 + 32));
    out.push(CREDENTIALS_V1);
    for scram in [&creds.sha1, &creds.sha256] {
        out.extend_from_slice(&scram.iterations.to_be_bytes());
        for field in [&scram.salt, &scram.stored_key, &scram.server_key] {
            let len = u16::try_from(field.len())
                .map_err(|_| StorageError::Unrepresentable("credential field over 64 KiB"))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(field);
        }
    }
    Ok(out)
}

/// Decodes a record written by [`encode_credentials`]. `record` names it in errors.
pub(crate) fn decode_credentials(
    record: &str,
    bytes: &[u8],
) -> Result<StoredCredentials, StorageError> {
    decode(record, bytes, "credentials", CREDENTIALS_V1, |r| {
        let mut scram = || -> Option<ScramCredentials> {
            let iterations = u32::from_be_bytes(r.take(4)?.try_into().ok()?);
            Some(ScramCredentials {
                iterations,
                salt: r.field()?,
                stored_key: r.field()?,
                server_key: r.field()?,
            })
        };
        let sha1 = scram()?;
        let sha256 = scram()?;
        Some(StoredCredentials { sha1, sha256 })
    })
}

pub(crate) fn encode_counter(value: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    out.push(COUNTER_V1);
    out.extend_from_slice(&value.to_be_bytes());
    out
}

pub(crate) fn decode_counter(record: &str, bytes: &[u8]) -> Result<u64, StorageError> {
    decode(record, bytes, "counter", COUNTER_V1, Cursor::u64)
}

pub(crate) fn encode_text(text: &str) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::with_capacity(1 + 4 + text.len());
    out.push(TEXT_V1);
    put_str(&mut out, text)?;
    Ok(out)
}

pub(crate) fn decode_text(record: &str, bytes: &[u8]) -> Result<String, StorageError> {
    decode(record, bytes, "text", TEXT_V1, Cursor::str)
}

/// Encodes everything of `item` but its `jid`, which is the record's key.
pub(crate) fn encode_roster_item(item: &RosterItem) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::with_capacity(16);
    out.push(ROSTER_ITEM_V1);
    match &item.name {
        Some(name) => {
            out.push(1);
            put_str(&mut out, name)?;
        }
        None => out.push(0),
    }
    put_len(&mut out, item.groups.len())?;
    for group in &item.groups {
        put_str(&mut out, group)?;
    }
    out.push(match item.subscription {
        Subscription::None => 0,
        Subscription::To => 1,
        Subscription::From => 2,
        Subscription::Both => 3,
    });
    let mut flags = 0;
    if item.ask {
        flags |= FLAG_ASK;
    }
    if item.approved {
        flags |= FLAG_APPROVED;
    }
    out.push(flags);
    Ok(out)
}

/// Decodes a record written by [`encode_roster_item`] for the contact `jid`.
pub(crate) fn decode_roster_item(
    record: &str,
    jid: &str,
    bytes: &[u8],
) -> Result<RosterItem, StorageError> {
    decode(record, bytes, "roster item", ROSTER_ITEM_V1, |r| {
        let name = match r.byte()? {
            0 => None,
            1 => Some(r.str()?),
            _ => return None,
        };
        let count = r.u32()?;
        // Grow as groups are read rather than trusting `count` for an allocation.
        let mut groups = Vec::new();
        for _ in 0..count {
            groups.push(r.str()?);
        }
        let subscription = match r.byte()? {
            0 => Subscription::None,
            1 => Subscription::To,
            2 => Subscription::From,
            3 => Subscription::Both,
            _ => return None,
        };
        let flags = r.byte()?;
        if flags & !(FLAG_ASK | FLAG_APPROVED) != 0 {
            return None;
        }
        Some(RosterItem {
            jid: jid.to_owned(),
            name,
            groups,
            subscription,
            ask: flags & FLAG_ASK != 0,
            approved: flags & FLAG_APPROVED != 0,
        })
    })
}

/// Encodes an offline message's time and stanza; its seq is the record's key.
pub(crate) fn encode_offline(stored_at_ms: u64, xml: &str) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::with_capacity(1 + 8 + 4 + xml.len());
    out.push(OFFLINE_V1);
    out.extend_from_slice(&stored_at_ms.to_be_bytes());
    put_str(&mut out, xml)?;
    Ok(out)
}

pub(crate) fn decode_offline(
    record: &str,
    seq: u64,
    bytes: &[u8],
) -> Result<OfflineMessage, StorageError> {
    decode(record, bytes, "offline message", OFFLINE_V1, |r| {
        Some(OfflineMessage {
            seq,
            stored_at_ms: r.u64()?,
            xml: r.str()?,
        })
    })
}

pub(crate) fn encode_blocklist(jids: &[String]) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::with_capacity(1 + 4 + jids.iter().map(|j| 4 + j.len()).sum::<usize>());
    out.push(BLOCKLIST_V1);
    put_len(&mut out, jids.len())?;
    for jid in jids {
        put_str(&mut out, jid)?;
    }
    Ok(out)
}

/// The stored form of a blocklist: sorted by byte order without duplicates, and no
/// record at all (`None`) when empty, so clearing a list leaves nothing behind.
pub(crate) fn encode_blocklist_record(jids: &[String]) -> Result<Option<Vec<u8>>, StorageError> {
    let mut jids = jids.to_vec();
    jids.sort_unstable();
    jids.dedup();
    if jids.is_empty() {
        return Ok(None);
    }
    encode_blocklist(&jids).map(Some)
}

pub(crate) fn decode_blocklist(record: &str, bytes: &[u8]) -> Result<Vec<String>, StorageError> {
    decode(record, bytes, "blocklist", BLOCKLIST_V1, |r| {
        let count = r.u32()?;
        let mut jids = Vec::new();
        for _ in 0..count {
            jids.push(r.str()?);
        }
        Some(jids)
    })
}

pub(crate) fn encode_last_activity(unix_secs: u64, status: &str) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::with_capacity(1 + 8 + 4 + status.len());
    out.push(LAST_ACTIVITY_V1);
    out.extend_from_slice(&unix_secs.to_be_bytes());
    put_str(&mut out, status)?;
    Ok(out)
}

pub(crate) fn decode_last_activity(
    record: &str,
    bytes: &[u8],
) -> Result<(u64, String), StorageError> {
    decode(record, bytes, "last activity", LAST_ACTIVITY_V1, |r| {
        Some((r.u64()?, r.str()?))
    })
}

/// Checks the version byte, runs `body` over the rest and insists it consumed all of
/// it. `body` returns `None` for truncated or invalid contents.
fn decode<'a, T>(
    record: &str,
    bytes: &'a [u8],
    kind: &str,
    version: u8,
    body: impl FnOnce(&mut Cursor<'a>) -> Option<T>,
) -> Result<T, StorageError> {
    let corrupt = |reason: String| StorageError::Corrupt {
        record: record.to_owned(),
        reason,
    };
    let mut r = Cursor(bytes);
    match r.byte() {
        Some(v) if v == version => {}
        Some(v) => return Err(corrupt(format!("unknown {kind} version {v}"))),
        None => return Err(corrupt("empty record".to_owned())),
    }
    let value = body(&mut r).ok_or_else(|| corrupt(format!("truncated or invalid {kind}")))?;
    if !r.0.is_empty() {
        return Err(corrupt(format!("{} trailing bytes", r.0.len())));
    }
    Ok(value)
}

/// Appends a u32 BE length, refusing what does not fit.
fn put_len(out: &mut Vec<u8>, len: usize) -> Result<(), StorageError> {
    let len = u32::try_from(len).map_err(|_| StorageError::Unrepresentable("length over 4 GiB"))?;
    out.extend_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Appends a u32-length-prefixed string.
fn put_str(out: &mut Vec<u8>, s: &str) -> Result<(), StorageError> {
    put_len(out, s.len())?;
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Reads from the front of a byte slice; `None` when it runs out or holds nonsense.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    /// A u16-length-prefixed byte string.
    fn field(&mut self) -> Option<Vec<u8>> {
        let len = u16::from_be_bytes(self.take(2)?.try_into().ok()?);
        self.take(len.into()).map(<[u8]>::to_vec)
    }

    /// A u32-length-prefixed UTF-8 string.
    fn str(&mut self) -> Option<String> {
        let len = usize::try_from(self.u32()?).ok()?;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).ok().map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every truncation, an unknown version and trailing garbage are all `Corrupt`.
    fn assert_rejects_damage<T: std::fmt::Debug>(
        bytes: &[u8],
        decode: impl Fn(&[u8]) -> Result<T, StorageError>,
    ) {
        for n in 0..bytes.len() {
            let err = decode(&bytes[..n]).unwrap_err();
            assert!(matches!(err, StorageError::Corrupt { .. }), "{n}: {err}");
        }
        let mut bad = bytes.to_vec();
        bad[0] = 99;
        assert!(matches!(decode(&bad), Err(StorageError::Corrupt { .. })));
        let mut long = bytes.to_vec();
        long.push(0);
        assert!(matches!(decode(&long), Err(StorageError::Corrupt { .. })));
    }

    #[test]
    fn round_trip() {
        let creds = StoredCredentials::derive("pw", b"salt-a", b"salt-bb", 4096);
        let bytes = encode_credentials(&creds).unwrap();
        assert_eq!(bytes[0], CREDENTIALS_V1);
        assert_eq!(decode_credentials("u", &bytes).unwrap(), creds);
    }

    #[test]
    fn rejects_damage_without_panicking() {
        let creds = StoredCredentials::derive("pw", b"salt-a", b"salt-bb", 4096);
        let bytes = encode_credentials(&creds).unwrap();
        assert_rejects_damage(&bytes, |b| decode_credentials("u", b));
    }

    #[test]
    fn roster_item_round_trip() {
        let items = [
            RosterItem {
                jid: "bob@example.org".into(),
                ..RosterItem::default()
            },
            RosterItem {
                jid: "carol@example.org".into(),
                name: Some("Carol ☃".into()),
                groups: vec!["Friends".into(), String::new()],
                subscription: Subscription::Both,
                ask: true,
                approved: true,
            },
            RosterItem {
                jid: "dave@example.org".into(),
                name: Some(String::new()),
                groups: vec![],
                subscription: Subscription::From,
                ask: false,
                approved: true,
            },
        ];
        for item in items {
            let bytes = encode_roster_item(&item).unwrap();
            assert_eq!(decode_roster_item("r", &item.jid, &bytes).unwrap(), item);
            assert_rejects_damage(&bytes, |b| decode_roster_item("r", &item.jid, b));
        }
        // Out-of-range enum bytes and unknown flags are corrupt, not guessed at.
        let mut bytes = encode_roster_item(&RosterItem::default()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] = 4;
        assert!(decode_roster_item("r", "x", &bytes).is_err());
        bytes[last] = 0;
        bytes[last - 1] = 4;
        assert!(decode_roster_item("r", "x", &bytes).is_err());
        bytes[last - 1] = 0;
        bytes[1] = 2;
        assert!(decode_roster_item("r", "x", &bytes).is_err());
    }

    #[test]
    fn other_records_round_trip() {
        let bytes = encode_counter(u64::MAX - 1);
        assert_eq!(decode_counter("c", &bytes).unwrap(), u64::MAX - 1);
        assert_rejects_damage(&bytes, |b| decode_counter("c", b));

        let bytes = encode_text("<vCard xmlns='vcard-temp'/>").unwrap();
        assert_eq!(
            decode_text("t", &bytes).unwrap(),
            "<vCard xmlns='vcard-temp'/>"
        );
        assert_rejects_damage(&bytes, |b| decode_text("t", b));

        let bytes = encode_offline(1_700_000_000_123, "<message/>").unwrap();
        let msg = decode_offline("o", 7, &bytes).unwrap();
        assert_eq!(
            msg,
            OfflineMessage {
                seq: 7,
                stored_at_ms: 1_700_000_000_123,
                xml: "<message/>".into()
            }
        );
        assert_rejects_damage(&bytes, |b| decode_offline("o", 7, b));

        let jids = vec!["a@x".to_owned(), "b@y/r".to_owned(), "z".to_owned()];
        let bytes = encode_blocklist(&jids).unwrap();
        assert_eq!(decode_blocklist("b", &bytes).unwrap(), jids);
        assert_rejects_damage(&bytes, |b| decode_blocklist("b", b));
        let empty = encode_blocklist(&[]).unwrap();
        assert_eq!(decode_blocklist("b", &empty).unwrap(), Vec::<String>::new());

        let bytes = encode_last_activity(42, "gone fishing").unwrap();
        assert_eq!(
            decode_last_activity("l", &bytes).unwrap(),
            (42, "gone fishing".to_owned())
        );
        assert_rejects_damage(&bytes, |b| decode_last_activity("l", b));
    }

    #[test]
    fn invalid_utf8_is_corrupt() {
        let mut bytes = encode_text("ab").unwrap();
        bytes[5] = 0xff;
        assert!(matches!(
            decode_text("t", &bytes),
            Err(StorageError::Corrupt { .. })
        ));
    }

    #[test]
    fn huge_stored_counts_do_not_allocate() {
        // A blocklist claiming u32::MAX entries with none present fails fast.
        let bytes = [BLOCKLIST_V1, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode_blocklist("b", &bytes),
            Err(StorageError::Corrupt { .. })
        ));
    }
}
