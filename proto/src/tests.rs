use bytes::Bytes;
use prost::Message;

use super::v1::{
    Ack, Attached, Batch, BindReply, BindRequest, CloseSession, Frame, FromSession, Hello,
    PresenceFanout, Reattach, ReceiverMessage, RoomBroadcast, SenderMessage, SessionEvent,
    SessionsWanted, ShardHandoff, SharedState, ToBareJid, ToFullJid, Welcome, frame, from_session,
    receiver_message, sender_message, session_event, shard_handoff,
};
use super::*;

/// One frame of every kind, with every field set to something other than its default,
/// so a field that failed to round-trip would show.
fn every_kind() -> Vec<frame::Kind> {
    vec![
        frame::Kind::ToBare(ToBareJid {
            to: "juliet@example.com".into(),
            stanza: Bytes::from_static(
                b"<message to='juliet@example.com'><body>hi</body></message>",
            ),
            hops: 2,
        }),
        frame::Kind::ToFull(ToFullJid {
            to: "juliet@example.com/balcony".into(),
            stanza: Bytes::from_static(b"<iq type='get' id='1'/>"),
            session_id: 9,
        }),
        frame::Kind::PresenceFanout(PresenceFanout {
            stanza: Bytes::from_static(b"<presence from='romeo@example.net/orchard'/>"),
            recipients: vec![
                "juliet@example.com".into(),
                "nurse@example.com/kitchen".into(),
            ],
        }),
        frame::Kind::RoomBroadcast(RoomBroadcast {
            room: "coven@chat.example.com".into(),
            stanza: Bytes::from_static(b"<message type='groupchat'><body>x</body></message>"),
            recipients: vec!["hag66@shakespeare.lit/pda".into()],
        }),
        frame::Kind::SessionEvent(SessionEvent {
            kind: session_event::Kind::Bound as i32,
            full_jid: "romeo@example.net/orchard".into(),
            node: "node-b".into(),
            session_id: 42,
        }),
        frame::Kind::SessionEvent(SessionEvent {
            kind: session_event::Kind::Unbound as i32,
            full_jid: "romeo@example.net/orchard".into(),
            node: "node-b".into(),
            session_id: 42,
        }),
        frame::Kind::ShardHandoff(ShardHandoff {
            shard: 1023,
            epoch: 7,
            from_node: "node-a".into(),
            to_node: "node-b".into(),
            phase: shard_handoff::Phase::State as i32,
            chunk: 3,
            state: Bytes::from_static(&[0, 1, 2, 255]),
        }),
        frame::Kind::BindRequest(BindRequest {
            user: "juliet@example.com".into(),
            resource: "balcony".into(),
            session_id: u64::MAX,
        }),
        frame::Kind::BindReply(BindReply {
            session_id: 5,
            full_jid: "juliet@example.com/balcony".into(),
            error: "conflict".into(),
            error_text: "taken".into(),
            shared: Some(SharedState {
                user: "juliet@example.com".into(),
                blocklist: vec!["tybalt@example.com".into()],
                carbons: 1,
            }),
        }),
        frame::Kind::FromSession(FromSession {
            from: "juliet@example.com/balcony".into(),
            kind: from_session::Kind::SentCarbon as i32,
            stanza: Bytes::from_static(b"<presence/>"),
        }),
        frame::Kind::SharedState(SharedState {
            user: "juliet@example.com".into(),
            blocklist: vec!["example.org".into()],
            carbons: 2,
        }),
        frame::Kind::CloseSession(CloseSession {
            full_jid: "juliet@example.com/balcony".into(),
            session_id: 5,
            condition: "conflict".into(),
        }),
        frame::Kind::Reattach(Reattach {
            full_jid: "juliet@example.com/balcony".into(),
            session_id: 5,
        }),
        frame::Kind::Attached(Attached {
            full_jid: "juliet@example.com/balcony".into(),
            session_id: 5,
            present: true,
            presence: Bytes::from_static(b"<presence><priority>5</priority></presence>"),
            roster_requested: true,
            blocklist_requested: true,
            carbons: true,
        }),
        frame::Kind::SessionsWanted(SessionsWanted {
            shards: vec![0, 7, 1023],
        }),
    ]
}

#[test]
fn every_frame_kind_round_trips() {
    for (i, kind) in every_kind().into_iter().enumerate() {
        let frame = Frame {
            enqueued_at_unix_micros: 1_700_000_000_000_000 + i as u64,
            kind: Some(kind),
        };
        let encoded = frame.encode_to_vec();
        let decoded = Frame::decode(encoded.as_slice()).unwrap();
        assert_eq!(decoded, frame, "frame {i}");
    }
}

#[test]
fn stream_messages_round_trip() {
    let batch = SenderMessage {
        kind: Some(sender_message::Kind::Batch(Batch {
            seq: 9,
            frames: every_kind()
                .into_iter()
                .map(|kind| Frame {
                    enqueued_at_unix_micros: 5,
                    kind: Some(kind),
                })
                .collect(),
        })),
    };
    let hello = SenderMessage {
        kind: Some(sender_message::Kind::Hello(Hello {
            protocol_version: 3,
            min_version: 2,
            node_id: "node-a".into(),
            incarnation: u64::MAX,
        })),
    };
    for message in [batch, hello] {
        let bytes = message.encode_to_vec();
        assert_eq!(SenderMessage::decode(bytes.as_slice()).unwrap(), message);
    }
    let welcome = ReceiverMessage {
        kind: Some(receiver_message::Kind::Welcome(Welcome {
            protocol_version: 1,
            node_id: "node-b".into(),
            resume_after: 12,
        })),
    };
    let ack = ReceiverMessage {
        kind: Some(receiver_message::Kind::Ack(Ack { seq: 77 })),
    };
    for message in [welcome, ack] {
        let bytes = message.encode_to_vec();
        assert_eq!(ReceiverMessage::decode(bytes.as_slice()).unwrap(), message);
    }
}

#[test]
fn stanza_payloads_decode_as_slices_of_the_buffer() {
    // With the `bytes` mapping, decoding from a `Bytes` buffer shares it rather than
    // copying each stanza; the pointer lands inside the encoded frame.
    let frame = Frame {
        enqueued_at_unix_micros: 1,
        kind: Some(frame::Kind::ToBare(ToBareJid {
            to: "a@b".into(),
            stanza: Bytes::from(vec![b'x'; 1000]),
            hops: 0,
        })),
    };
    let buffer = Bytes::from(frame.encode_to_vec());
    let decoded = Frame::decode(buffer.clone()).unwrap();
    let Some(frame::Kind::ToBare(to_bare)) = decoded.kind else {
        panic!("wrong kind");
    };
    let range = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
    assert!(range.contains(&(to_bare.stanza.as_ptr() as usize)));
}

#[test]
fn unknown_frame_kind_decodes_as_empty_kind() {
    // A newer node's frame kind (an unknown oneof tag, here 99 with a length-delimited
    // body) must decode, with no kind, so the receiver can count and skip it.
    let mut bytes = Frame {
        enqueued_at_unix_micros: 8,
        kind: None,
    }
    .encode_to_vec();
    prost::encoding::encode_key(99, prost::encoding::WireType::LengthDelimited, &mut bytes);
    prost::encoding::encode_varint(3, &mut bytes);
    bytes.extend_from_slice(b"new");
    let decoded = Frame::decode(bytes.as_slice()).unwrap();
    assert_eq!(decoded.enqueued_at_unix_micros, 8);
    assert_eq!(decoded.kind, None);

    // And a batch carrying it still yields its known frames around it.
    let known = Frame {
        enqueued_at_unix_micros: 9,
        kind: every_kind().into_iter().next(),
    };
    let mut batch = Batch {
        seq: 1,
        frames: vec![known.clone()],
    }
    .encode_to_vec();
    prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut batch);
    prost::encoding::encode_varint(bytes.len() as u64, &mut batch);
    batch.extend_from_slice(&bytes);
    let decoded = Batch::decode(batch.as_slice()).unwrap();
    assert_eq!(decoded.frames.len(), 2);
    assert_eq!(decoded.frames[0], known);
    assert_eq!(decoded.frames[1].kind, None);
}

#[test]
fn version_rule() {
    // Same version.
    assert_eq!(negotiate((1, 1), (1, 1)), Ok(1));
    // N talks to N-1 in either direction, speaking N-1.
    assert_eq!(negotiate((2, 1), (1, 1)), Ok(1));
    assert_eq!(negotiate((1, 1), (2, 1)), Ok(1));
    // A peer older than our minimum is refused, and so is one whose minimum is newer
    // than us.
    let refused = negotiate((3, 2), (1, 1)).unwrap_err();
    assert_eq!(
        refused.to_string(),
        "incompatible cluster protocol: peer speaks v1 and accepts v1 or newer, \
         this node speaks v3 and accepts v2 or newer"
    );
    assert!(negotiate((1, 1), (3, 2)).is_err());
    // The build's own constants are consistent.
    assert_eq!(
        negotiate(
            (PROTOCOL_VERSION, MIN_PROTOCOL_VERSION),
            (PROTOCOL_VERSION, MIN_PROTOCOL_VERSION)
        ),
        Ok(PROTOCOL_VERSION)
    );
}
