//! `UserState` rules, tested on the plain struct: sessions are numbers, storage work is
//! inspected as effects.

use super::*;
use crate::model::{Roster, Subscription};
use shoal_xmpp::stanza::{TopLevel, parse_top_level};
use shoal_xmpp::xml::NsContext;

fn stanza(xml: &str) -> Stanza {
    match parse_top_level(&Bytes::copy_from_slice(xml.as_bytes()), NsContext::CLIENT) {
        Ok(TopLevel::Stanza(s)) => s,
        other => panic!("{other:?}"),
    }
}

fn full(s: &str) -> FullJid {
    FullJid::new(s).unwrap()
}

/// Limits for tests, generous enough not to get in the way.
pub(crate) fn limits() -> Arc<UserLimits> {
    Arc::new(UserLimits {
        max_resources: 10,
        roster: RosterLimits {
            max_items: 100,
            max_name_len: 100,
            max_group_len: 100,
            max_groups: 10,
        },
        max_blocklist: 10,
    })
}

fn item(jid: &str, sub: Subscription) -> RosterItem {
    RosterItem {
        jid: jid.into(),
        subscription: sub,
        ..RosterItem::default()
    }
}

/// juliet, whose roster has romeo (both), nurse (from), tybalt (to).
fn juliet_data() -> UserData {
    let mut roster = Roster::default();
    for (j, s) in [
        ("romeo@localhost", Subscription::Both),
        ("nurse@localhost", Subscription::From),
        ("tybalt@example.org", Subscription::To),
    ] {
        roster.items.insert(j.into(), item(j, s));
    }
    roster.version = 3;
    UserData {
        exists: true,
        roster,
        blocklist: Vec::new(),
    }
}

fn empty_user() -> UserState<u32> {
    UserState::new(
        BareJid::new("juliet@localhost").unwrap(),
        UserData {
            exists: true,
            ..UserData::default()
        },
        limits(),
    )
}

/// juliet with resources a (prio 1), b (prio 5), c (prio -1), d (bound, no presence).
fn juliet() -> UserState<u32> {
    let mut u = empty_user();
    for (i, (r, prio)) in [("a", Some(1)), ("b", Some(5)), ("c", Some(-1)), ("d", None)]
        .into_iter()
        .enumerate()
    {
        let (jid, _) = u.bind(r, i as u64, i as u32).unwrap();
        if let Some(p) = prio {
            u.own_presence(
                &jid,
                stanza(&format!("<presence><priority>{p}</priority></presence>")),
            );
        }
    }
    u
}

fn delivered_to(effects: &[Effect<u32>]) -> Vec<u32> {
    match effects {
        [Effect::Deliver(to, _)] => to.clone(),
        other => panic!("{other:?}"),
    }
}

fn routed(effects: &[Effect<u32>]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Route(s) => Some(s.to_xml()),
            _ => None,
        })
        .collect()
}

fn bounced(effects: &[Effect<u32>]) -> String {
    match effects {
        [Effect::Route(s)] => s.to_xml(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bare_chat_goes_to_highest_non_negative_priority() {
    let mut u = juliet();
    let e = u.deliver(stanza(
        "<message from='romeo@localhost/x' to='juliet@localhost' type='chat'><body>hi</body></message>",
    ));
    assert_eq!(delivered_to(&e), vec![1]);
}

#[test]
fn equal_priorities_all_receive() {
    let mut u = juliet();
    u.own_presence(
        &full("juliet@localhost/a"),
        stanza("<presence><priority>5</priority></presence>"),
    );
    let e = u.deliver(stanza(
        "<message to='juliet@localhost'><body>hi</body></message>",
    ));
    assert_eq!(delivered_to(&e), vec![0, 1]);
}

#[test]
fn no_available_resource_stores_offline() {
    let mut u = empty_user();
    let (c, _) = u.bind("c", 1, 7u32).unwrap();
    u.own_presence(&c, stanza("<presence><priority>-1</priority></presence>"));
    let msg = stanza(
        "<message from='romeo@localhost/x' to='juliet@localhost' id='m1' type='chat'><body>hi</body></message>",
    );
    assert_eq!(
        u.deliver(msg.clone()),
        vec![Effect::Job(Job::StoreOffline(msg))]
    );
    // Not without content (a chat state), nor when the sender says not to.
    let state = stanza(
        "<message to='juliet@localhost' type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/></message>",
    );
    assert!(u.deliver(state).is_empty());
    let no_store = stanza(
        "<message to='juliet@localhost' type='chat'><body>x</body><no-store xmlns='urn:xmpp:hints'/></message>",
    );
    assert!(u.deliver(no_store).is_empty());
    // A negative-priority resource still gets messages to its full JID.
    let e = u.deliver(stanza(
        "<message to='juliet@localhost/c'><body>hi</body></message>",
    ));
    assert_eq!(delivered_to(&e), vec![7]);
}

#[test]
fn unknown_account_is_service_unavailable() {
    let mut u: UserState<u32> = UserState::new(
        BareJid::new("ghost@localhost").unwrap(),
        UserData::default(),
        limits(),
    );
    let e = u.deliver(stanza(
        "<message from='romeo@localhost/x' to='ghost@localhost' id='m1'><body>hi</body></message>",
    ));
    assert_eq!(
        bounced(&e),
        "<message to='romeo@localhost/x' from='ghost@localhost' id='m1' type='error'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
    );
    assert!(
        u.deliver(stanza(
            "<presence from='romeo@localhost/x' to='ghost@localhost' type='subscribe'/>"
        ))
        .is_empty()
    );
}

#[test]
fn full_jid_rules() {
    let mut u = juliet();
    assert_eq!(
        delivered_to(&u.deliver(stanza("<message to='juliet@localhost/d'/>"))),
        vec![3]
    );
    assert_eq!(
        delivered_to(&u.deliver(stanza("<message to='juliet@localhost/zz' type='chat'/>"))),
        vec![1]
    );
    assert!(
        bounced(&u.deliver(stanza(
            "<message from='r@localhost/x' to='juliet@localhost/zz' type='groupchat'/>"
        )))
        .contains("service-unavailable")
    );
    assert!(bounced(&u.deliver(stanza("<iq from='r@localhost/x' to='juliet@localhost/zz' id='1' type='get'><ping xmlns='urn:xmpp:ping'/></iq>"))).contains("service-unavailable"));
    assert!(
        u.deliver(stanza("<presence to='juliet@localhost/zz'/>"))
            .is_empty()
    );
    assert!(
        u.deliver(stanza("<iq to='juliet@localhost/zz' id='1' type='error'/>"))
            .is_empty()
    );
    let iq = stanza(
        "<iq from='r@localhost/x' to='juliet@localhost/a' id='j1' type='set'><jingle xmlns='urn:xmpp:jingle:1' action='session-initiate'/></iq>",
    );
    match &u.deliver(iq.clone())[..] {
        [Effect::Deliver(to, s)] => {
            assert_eq!(to, &vec![0]);
            assert_eq!(s, &iq);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn rebinding_replaces_and_limits_apply() {
    let mut u = juliet();
    let (_, effects) = u.bind("a", 10, 10).unwrap();
    assert_eq!(effects[0], Effect::Replaced(0));
    assert!(
        matches!(&effects[1], Effect::Deliver(to, s) if to == &vec![1, 2] && s.kind == Kind::Presence(PresenceType::Unavailable))
    );
    assert!(u.unbind(&full("juliet@localhost/a"), 0, 100).is_empty());
    assert_eq!(
        delivered_to(&u.deliver(stanza("<message to='juliet@localhost/a'/>"))),
        vec![10]
    );
    let mut small = UserState::new(
        BareJid::new("juliet@localhost").unwrap(),
        UserData {
            exists: true,
            ..UserData::default()
        },
        Arc::new(UserLimits {
            max_resources: 1,
            ..(*limits()).clone()
        }),
    );
    small.bind("a", 1, 1u32).unwrap();
    let err = small.bind("b", 2, 2).unwrap_err();
    assert_eq!(err.condition, StanzaErrorCondition::ResourceConstraint);
}

#[test]
fn last_unbind_records_last_activity() {
    let mut u = empty_user();
    let (a, _) = u.bind("a", 1, 1u32).unwrap();
    let e = u.unbind(&a, 1, 1234);
    assert_eq!(
        e,
        vec![Effect::Persist(Write::LastActivity {
            unix_secs: 1234,
            status: String::new()
        })]
    );
    assert!(u.is_idle());
}

/// The status of the unavailable presence a client sent before leaving is kept with
/// the last activity (XEP-0012 §4), once; a later plain disconnect stores none.
#[test]
fn last_activity_keeps_the_unavailable_status() {
    let mut u = empty_user();
    let (a, _) = u.bind("a", 1, 1u32).unwrap();
    u.own_presence(&a, stanza("<presence/>"));
    u.own_presence(
        &a,
        stanza("<presence type='unavailable'><status>Gone fishing</status></presence>"),
    );
    let last = |e: Vec<Effect<u32>>| {
        e.into_iter()
            .find_map(|e| match e {
                Effect::Persist(Write::LastActivity { status, .. }) => Some(status),
                _ => None,
            })
            .expect("a last-activity write")
    };
    assert_eq!(last(u.unbind(&a, 1, 10)), "Gone fishing");
    let (a, _) = u.bind("a", 2, 2u32).unwrap();
    assert_eq!(last(u.unbind(&a, 2, 20)), "");
}

#[test]
fn initial_presence_broadcasts_probes_and_flushes_offline() {
    let mut u = UserState::new(
        BareJid::new("juliet@localhost").unwrap(),
        juliet_data(),
        limits(),
    );
    let (a, _) = u.bind("balcony", 1, 1u32).unwrap();
    let e = u.own_presence(&a, stanza("<presence><show>chat</show></presence>"));
    let r = routed(&e);
    // To contacts with a 'from' subscription (romeo, nurse), not tybalt (to only).
    assert!(r.contains(&"<presence to='nurse@localhost' from='juliet@localhost/balcony'><show>chat</show></presence>".to_string()), "{r:?}");
    assert!(r.contains(&"<presence to='romeo@localhost' from='juliet@localhost/balcony'><show>chat</show></presence>".to_string()));
    assert!(
        !r.iter()
            .any(|s| s.contains("to='tybalt@example.org'><show"))
    );
    // Probes to contacts she subscribes to (romeo, tybalt).
    assert!(r.contains(
        &"<presence to='romeo@localhost' from='juliet@localhost' type='probe'/>".to_string()
    ));
    assert!(r.contains(
        &"<presence to='tybalt@example.org' from='juliet@localhost' type='probe'/>".to_string()
    ));
    assert_eq!(r.len(), 4);
    // Her own resource hears it, and stored messages are delivered.
    assert!(e.iter().any(|x| matches!(x, Effect::Deliver(to, s) if to == &vec![1] && s.kind == Kind::Presence(PresenceType::Available))));
    assert!(e.contains(&Effect::Job(Job::DeliverOffline(1))));
    // A presence update is broadcast again but probes nobody.
    let e = u.own_presence(&a, stanza("<presence><show>away</show></presence>"));
    assert_eq!(routed(&e).len(), 2);
    assert!(!e.iter().any(|x| matches!(x, Effect::Job(_))));
}

#[test]
fn probes_are_answered_only_for_subscribers() {
    let mut u = UserState::new(
        BareJid::new("juliet@localhost").unwrap(),
        juliet_data(),
        limits(),
    );
    // Offline: a subscriber learns she is unavailable.
    let e = u.deliver(stanza(
        "<presence from='romeo@localhost' to='juliet@localhost' type='probe'/>",
    ));
    assert_eq!(
        routed(&e),
        vec!["<presence to='romeo@localhost' from='juliet@localhost' type='unavailable'/>"]
    );
    let (a, _) = u.bind("balcony", 1, 1u32).unwrap();
    u.own_presence(&a, stanza("<presence><status>here</status></presence>"));
    let e = u.deliver(stanza(
        "<presence from='romeo@localhost' to='juliet@localhost' type='probe'/>",
    ));
    assert_eq!(
        routed(&e),
        vec![
            "<presence to='romeo@localhost' from='juliet@localhost/balcony'><status>here</status></presence>"
        ]
    );
    // tybalt has no 'from' subscription: nothing.
    assert!(
        u.deliver(stanza(
            "<presence from='tybalt@example.org' to='juliet@localhost' type='probe'/>"
        ))
        .is_empty()
    );
}

fn roster_iq(u: &mut UserState<u32>, from: &FullJid, xml: &str) -> Vec<Effect<u32>> {
    u.account_iq(from, stanza(xml))
}

#[test]
fn roster_get_set_remove_and_pushes() {
    let mut u = UserState::new(
        BareJid::new("juliet@localhost").unwrap(),
        juliet_data(),
        limits(),
    );
    let (a, _) = u.bind("a", 1, 1u32).unwrap();
    let (b, _) = u.bind("b", 2, 2u32).unwrap();
    // Only 'a' asks for the roster, so only 'a' gets pushes.
    let e = roster_iq(
        &mut u,
        &a,
        "<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>",
    );
    let r = routed(&e);
    assert!(r[0].starts_with("<iq to='juliet@localhost/a' id='r1' type='result'><query xmlns='jabber:iq:roster' ver='3'>"), "{r:?}");
    let e = roster_iq(
        &mut u,
        &b,
        "<iq type='set' id='s1'><query xmlns='jabber:iq:roster'><item jid='benvolio@localhost' name='Ben'><group>Friends</group></item></query></iq>",
    );
    assert_eq!(
        routed(&e),
        vec!["<iq to='juliet@localhost/b' id='s1' type='result'/>"]
    );
    assert!(e.iter().any(|x| matches!(x, Effect::Persist(Write::PutItem(i)) if i.jid == "benvolio@localhost" && i.name.as_deref() == Some("Ben"))));
    let pushes: Vec<_> = e
        .iter()
        .filter_map(|x| match x {
            Effect::Deliver(to, s) => Some((to.clone(), s.to_xml())),
            _ => None,
        })
        .collect();
    assert_eq!(pushes.len(), 1);
    assert_eq!(pushes[0].0, vec![1]);
    assert!(
        pushes[0].1.contains("ver='4'") && pushes[0].1.contains("benvolio@localhost"),
        "{pushes:?}"
    );
    // Unchanged version: empty result (RFC 6121 §2.6.3).
    let e = roster_iq(
        &mut u,
        &a,
        "<iq type='get' id='r2'><query xmlns='jabber:iq:roster' ver='4'/></iq>",
    );
    assert_eq!(
        routed(&e),
        vec!["<iq to='juliet@localhost/a' id='r2' type='result'/>"]
    );
    // Removing romeo (both) cancels both directions.
    let e = roster_iq(
        &mut u,
        &a,
        "<iq type='set' id='s2'><query xmlns='jabber:iq:roster'><item jid='romeo@localhost' subscription='remove'/></query></iq>",
    );
    let r = routed(&e);
    assert!(
        r.contains(
            &"<presence to='romeo@localhost' from='juliet@localhost' type='unsubscribe'/>"
                .to_string()
        ),
        "{r:?}"
    );
    assert!(r.contains(
        &"<presence to='romeo@localhost' from='juliet@localhost' type='unsubscribed'/>".to_string()
    ));
    assert!(e.contains(&Effect::Persist(Write::RemoveItem(
        "romeo@localhost".into()
    ))));
    // Removing what is not there.
    let e = roster_iq(
        &mut u,
        &a,
        "<iq type='set' id='s3'><query xmlns='jabber:iq:roster'><item jid='nobody@localhost' subscription='remove'/></query></iq>",
    );
    assert!(routed(&e)[0].contains("<item-not-found"));
}

/// A client acknowledging a roster push may echo the query back (slixmpp sends
/// `<iq type='result'><query xmlns='jabber:iq:roster'/></iq>`): that is a response, so
/// it is neither answered (as if it were a roster get) nor makes the session
/// interested in pushes.
#[test]
fn roster_push_acknowledgements_are_not_answered() {
    let mut u = UserState::new(
        BareJid::new("juliet@localhost").unwrap(),
        juliet_data(),
        limits(),
    );
    let (a, _) = u.bind("a", 1, 1u32).unwrap();
    for ack in [
        "<iq type='result' id='push3'><query xmlns='jabber:iq:roster'/></iq>",
        "<iq type='result' id='push3' to='juliet@localhost'><query xmlns='jabber:iq:roster'/></iq>",
        "<iq type='error' id='push3'><query xmlns='jabber:iq:roster'/></iq>",
        "<iq type='result' id='b1'><blocklist xmlns='urn:xmpp:blocking'/></iq>",
    ] {
        assert_eq!(roster_iq(&mut u, &a, ack), Vec::new(), "{ack}");
    }
    // 'a' never asked for the roster, so a change is not pushed to it.
    let e = roster_iq(
        &mut u,
        &a,
        "<iq type='set' id='s1'><query xmlns='jabber:iq:roster'><item jid='benvolio@localhost'/></query></iq>",
    );
    assert_eq!(
        routed(&e),
        vec!["<iq to='juliet@localhost/a' id='s1' type='result'/>"]
    );
    assert!(!e.iter().any(|x| matches!(x, Effect::Deliver(..))), "{e:?}");
}

#[test]
fn subscription_round_trip_on_both_sides() {
    // Romeo asks Juliet; both live here, each side is its own UserState.
    let mut romeo = UserState::new(
        BareJid::new("romeo@localhost").unwrap(),
        UserData {
            exists: true,
            ..UserData::default()
        },
        limits(),
    );
    let mut juliet = UserState::new(
        BareJid::new("juliet@localhost").unwrap(),
        UserData {
            exists: true,
            ..UserData::default()
        },
        limits(),
    );
    let (r, _) = romeo.bind("orchard", 1, 1u32).unwrap();
    romeo.account_iq(
        &r,
        stanza("<iq type='get' id='g'><query xmlns='jabber:iq:roster'/></iq>"),
    );
    let (j, _) = juliet.bind("balcony", 2, 2u32).unwrap();
    juliet.own_presence(&j, stanza("<presence/>"));

    let e = romeo.outbound_subscription(stanza(
        "<presence from='romeo@localhost/orchard' to='juliet@localhost' type='subscribe'/>",
    ));
    let out = routed(&e);
    assert_eq!(
        out,
        vec!["<presence to='juliet@localhost' from='romeo@localhost' type='subscribe'/>"]
    );
    assert!(e.iter().any(|x| matches!(x, Effect::Persist(Write::PutItem(i)) if i.ask && i.subscription == Subscription::None)));
    assert!(e.iter().any(|x| matches!(x, Effect::Deliver(to, s) if to == &vec![1] && s.to_xml().contains("ask='subscribe'"))));

    // Juliet's server stores the request and shows it to her.
    let e = juliet.deliver(stanza(&out[0]));
    assert!(e.iter().any(
        |x| matches!(x, Effect::Persist(Write::PendingIn(c, Some(_))) if c == "romeo@localhost")
    ));
    assert!(e.iter().any(|x| matches!(x, Effect::Deliver(to, s) if to == &vec![2] && s.kind == Kind::Presence(PresenceType::Subscribe))));

    // She approves: romeo gets 'subscribed' and her presence.
    let e = juliet.outbound_subscription(stanza(
        "<presence from='juliet@localhost/balcony' to='romeo@localhost' type='subscribed'/>",
    ));
    let out = routed(&e);
    assert!(
        out.contains(
            &"<presence to='romeo@localhost' from='juliet@localhost' type='subscribed'/>"
                .to_string()
        ),
        "{out:?}"
    );
    assert!(
        out.contains(
            &"<presence to='romeo@localhost' from='juliet@localhost/balcony'/>".to_string()
        ),
        "{out:?}"
    );
    assert!(e.contains(&Effect::Persist(Write::PendingIn(
        "romeo@localhost".into(),
        None
    ))));
    assert!(e.iter().any(
        |x| matches!(x, Effect::Persist(Write::PutItem(i)) if i.subscription == Subscription::From)
    ));

    // Romeo's side: 'to' now, ask cleared, pushed.
    let e = romeo.deliver(stanza(
        "<presence to='romeo@localhost' from='juliet@localhost' type='subscribed'/>",
    ));
    assert!(e.iter().any(|x| matches!(x, Effect::Persist(Write::PutItem(i)) if i.subscription == Subscription::To && !i.ask)));
    // A second 'subscribed' changes nothing.
    let e = romeo.deliver(stanza(
        "<presence to='romeo@localhost' from='juliet@localhost' type='subscribed'/>",
    ));
    assert!(!e.iter().any(|x| matches!(x, Effect::Persist(_))));
}

#[test]
fn pending_requests_are_redelivered_at_login() {
    let mut data = UserData {
        exists: true,
        ..UserData::default()
    };
    data.roster.pending_in.insert(
        "romeo@localhost".into(),
        "<status>let me in</status>".into(),
    );
    let mut u = UserState::new(BareJid::new("juliet@localhost").unwrap(), data, limits());
    let (a, _) = u.bind("a", 1, 1u32).unwrap();
    let e = u.own_presence(&a, stanza("<presence/>"));
    assert!(e.iter().any(|x| matches!(x, Effect::Deliver(to, s) if to == &vec![1] && s.to_xml() == "<presence to='juliet@localhost' from='romeo@localhost' type='subscribe'><status>let me in</status></presence>")), "{e:?}");
}

#[test]
fn blocking_hides_and_refuses() {
    let mut u = UserState::new(
        BareJid::new("juliet@localhost").unwrap(),
        juliet_data(),
        limits(),
    );
    let (a, _) = u.bind("a", 1, 1u32).unwrap();
    let (b, _) = u.bind("b", 2, 2u32).unwrap();
    u.own_presence(&a, stanza("<presence/>"));
    // Only b asks for the blocklist, so only b gets the pushes (XEP-0191 §3.3).
    u.account_iq(
        &b,
        stanza("<iq type='get' id='l'><blocklist xmlns='urn:xmpp:blocking'/></iq>"),
    );
    let e = u.account_iq(&a, stanza("<iq type='set' id='b1'><block xmlns='urn:xmpp:blocking'><item jid='tybalt@example.org'/><item jid='nurse@localhost'/></block></iq>"));
    let pushed: Vec<(Vec<u32>, String)> = e
        .iter()
        .filter_map(|e| match e {
            Effect::Deliver(to, s) => Some((to.clone(), s.to_xml())),
            _ => None,
        })
        .collect();
    assert_eq!(
        pushed,
        [(
            vec![2],
            "<iq to='juliet@localhost/b' id='block-push' type='set'><block xmlns='urn:xmpp:blocking'><item jid='tybalt@example.org'/><item jid='nurse@localhost'/></block></iq>".to_owned()
        )]
    );
    assert_eq!(
        routed(&e)[0],
        "<iq to='juliet@localhost/a' id='b1' type='result'/>"
    );
    assert!(e.contains(&Effect::Persist(Write::Blocklist(vec![
        "nurse@localhost".into(),
        "tybalt@example.org".into()
    ]))));
    // XEP-0191 §3.3: the nurse ("from") saw juliet's presence and is told she went
    // offline; tybalt ("to") never saw it and learns nothing.
    assert_eq!(
        routed(&e)[1..],
        ["<presence to='nurse@localhost' from='juliet@localhost/a' type='unavailable'/>"]
    );
    assert!(
        u.shared()
            .is_blocked(&Jid::new("tybalt@example.org/sword").unwrap())
    );
    // Messages and iqs from a blocked entity get <service-unavailable/>; presence and
    // errors get nothing.
    assert!(bounced(&u.deliver(stanza("<message from='tybalt@example.org/sword' to='juliet@localhost'><body>duel</body></message>"))).contains("service-unavailable"));
    assert!(
        u.deliver(stanza(
            "<message from='tybalt@example.org/sword' to='juliet@localhost' type='error'/>"
        ))
        .is_empty()
    );
    assert!(
        u.deliver(stanza(
            "<presence from='tybalt@example.org/sword' to='juliet@localhost' type='probe'/>"
        ))
        .is_empty()
    );
    assert!(bounced(&u.deliver(stanza("<iq from='tybalt@example.org/sword' to='juliet@localhost' id='q' type='get'><query xmlns='jabber:iq:last'/></iq>"))).contains("service-unavailable"));
    let e = u.account_iq(
        &a,
        stanza("<iq type='get' id='b2'><blocklist xmlns='urn:xmpp:blocking'/></iq>"),
    );
    assert_eq!(
        routed(&e),
        vec![
            "<iq to='juliet@localhost/a' id='b2' type='result'><blocklist xmlns='urn:xmpp:blocking'><item jid='nurse@localhost'/><item jid='tybalt@example.org'/></blocklist></iq>"
        ]
    );
    // Unblock all: the nurse gets juliet's current presence back (§3.4).
    let e = u.account_iq(
        &a,
        stanza("<iq type='set' id='b3'><unblock xmlns='urn:xmpp:blocking'/></iq>"),
    );
    assert!(e.contains(&Effect::Persist(Write::Blocklist(vec![]))));
    assert_eq!(
        routed(&e)[1..],
        ["<presence to='nurse@localhost' from='juliet@localhost/a'/>"]
    );
    assert!(
        !u.shared()
            .is_blocked(&Jid::new("tybalt@example.org").unwrap())
    );
}

#[test]
fn carbons_copy_received_and_sent_chats() {
    let mut u = empty_user();
    let (a, _) = u.bind("a", 1, 1u32).unwrap();
    let (b, _) = u.bind("b", 2, 2u32).unwrap();
    u.own_presence(&a, stanza("<presence/>"));
    u.own_presence(&b, stanza("<presence/>"));
    let e = u.account_iq(
        &b,
        stanza("<iq type='set' id='c'><enable xmlns='urn:xmpp:carbons:2'/></iq>"),
    );
    assert_eq!(
        routed(&e),
        vec!["<iq to='juliet@localhost/b' id='c' type='result'/>"]
    );
    assert_eq!(u.shared().carbons_enabled(), 1);
    // A chat to a's full JID is copied to b.
    let e = u.deliver(stanza("<message from='romeo@localhost/x' to='juliet@localhost/a' type='chat'><body>hi</body></message>"));
    assert_eq!(e.len(), 2);
    match &e[1] {
        Effect::Deliver(to, s) => {
            assert_eq!(to, &vec![2]);
            assert_eq!(
                s.to_xml(),
                "<message to='juliet@localhost/b' from='juliet@localhost' type='chat'><received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' to='juliet@localhost/a' from='romeo@localhost/x' type='chat'><body>hi</body></message></forwarded></received></message>"
            );
        }
        other => panic!("{other:?}"),
    }
    // What a sends is copied to b; what b sends is not copied back to b.
    let sent = stanza(
        "<message from='juliet@localhost/a' to='romeo@localhost' type='chat'><body>yo</body></message>",
    );
    assert!(
        matches!(&u.sent_carbon(&a, &sent)[..], [Effect::Deliver(to, s)] if to == &vec![2] && s.to_xml().contains("<sent xmlns='urn:xmpp:carbons:2'>"))
    );
    assert!(u.sent_carbon(&b, &sent).is_empty());
    // Private messages are not copied.
    let private = stanza(
        "<message from='romeo@localhost/x' to='juliet@localhost/a' type='chat'><body>psst</body><private xmlns='urn:xmpp:carbons:2'/></message>",
    );
    assert_eq!(u.deliver(private).len(), 1);
}

#[test]
fn account_storage_requests_become_jobs() {
    let mut u = empty_user();
    let (a, _) = u.bind("a", 1, 1u32).unwrap();
    let e = u.account_iq(
        &a,
        stanza("<iq type='set' id='v'><vCard xmlns='vcard-temp'><FN>Juliet</FN></vCard></iq>"),
    );
    assert!(
        matches!(&e[..], [Effect::Job(Job::VcardSet { xml, .. })] if xml == "<vCard xmlns='vcard-temp'><FN>Juliet</FN></vCard>")
    );
    let e = u.account_iq(&a, stanza("<iq type='set' id='p'><query xmlns='jabber:iq:private'><prefs xmlns='urn:x:prefs'><a/></prefs></query></iq>"));
    assert!(
        matches!(&e[..], [Effect::Job(Job::PrivateSet { key, .. })] if key == "prefs urn:x:prefs")
    );
    // Reserved namespaces are refused (XEP-0049).
    let e = u.account_iq(&a, stanza("<iq type='get' id='p2'><query xmlns='jabber:iq:private'><x xmlns='jabber:iq:roster'/></query></iq>"));
    assert!(routed(&e)[0].contains("not-acceptable"));
    let e = u.account_iq(&a, stanza("<iq type='set' id='pw'><query xmlns='jabber:iq:register'><username>juliet</username><password>n3w</password></query></iq>"));
    assert!(
        matches!(&e[..], [Effect::Job(Job::ChangePassword { password, .. })] if password == "n3w")
    );
    let e = u.account_iq(&a, stanza("<iq type='set' id='pw2'><query xmlns='jabber:iq:register'><username>romeo</username><password>x</password></query></iq>"));
    assert!(routed(&e)[0].contains("not-acceptable"));
    let e = u.account_iq(
        &a,
        stanza("<iq type='set' id='rm'><query xmlns='jabber:iq:register'><remove/></query></iq>"),
    );
    assert!(
        matches!(&e[..], [Effect::Job(Job::RemoveAccount { requester: Some(1), sessions, .. })] if sessions == &vec![1])
    );
}

#[test]
fn account_removal_cancels_subscriptions_and_stops_writes() {
    let mut u = UserState::new(
        BareJid::new("juliet@localhost").unwrap(),
        juliet_data(),
        limits(),
    );
    let (a, _) = u.bind("a", 1, 1u32).unwrap();
    let e = u.account_iq(
        &a,
        stanza("<iq type='set' id='rm'><query xmlns='jabber:iq:register'><remove/></query></iq>"),
    );
    let r = routed(&e);
    for want in [
        "<presence to='romeo@localhost' from='juliet@localhost' type='unsubscribe'/>",
        "<presence to='romeo@localhost' from='juliet@localhost' type='unsubscribed'/>",
        "<presence to='nurse@localhost' from='juliet@localhost' type='unsubscribed'/>",
        "<presence to='tybalt@example.org' from='juliet@localhost' type='unsubscribe'/>",
    ] {
        assert!(r.contains(&want.to_string()), "{want} not in {r:?}");
    }
    assert!(
        matches!(e.last(), Some(Effect::Job(Job::RemoveAccount { requester: Some(1), sessions, .. })) if sessions == &vec![1])
    );
    // Once removed, the account writes nothing more (no last-activity record).
    assert!(!u.exists());
    assert!(u.unbind(&a, 1, 99).is_empty());
}

/// Every row of RFC 6121 Appendix A.2 (outbound) and A.3 (inbound), run through the
/// user state itself: the contact's stored state afterwards is the table's new state,
/// what the table routes or delivers is routed or delivered, and a change is persisted.
#[test]
fn appendix_a_through_the_user_state() {
    let states = [
        "None",
        "None + Pending Out",
        "None + Pending In",
        "None + Pending Out/In",
        "To",
        "To + Pending In",
        "From",
        "From + Pending Out",
        "Both",
    ];
    let named = |name: &str| {
        let (sub, ask, pending_in) = match name {
            "None" => (Subscription::None, false, false),
            "None + Pending Out" => (Subscription::None, true, false),
            "None + Pending In" => (Subscription::None, false, true),
            "None + Pending Out/In" => (Subscription::None, true, true),
            "To" => (Subscription::To, false, false),
            "To + Pending In" => (Subscription::To, false, true),
            "From" => (Subscription::From, false, false),
            "From + Pending Out" => (Subscription::From, true, false),
            _ => (Subscription::Both, false, false),
        };
        ContactState {
            subscription: sub,
            ask,
            pending_in,
            approved: false,
            in_roster: true,
        }
    };
    let ops = [
        ("subscribe", SubscriptionOp::Subscribe),
        ("subscribed", SubscriptionOp::Subscribed),
        ("unsubscribe", SubscriptionOp::Unsubscribe),
        ("unsubscribed", SubscriptionOp::Unsubscribed),
    ];
    let mut rows = 0;
    for outbound in [true, false] {
        for name in states {
            for (op_name, op) in ops {
                let row = format!(
                    "{} {op_name} in {name}",
                    if outbound { "outbound" } else { "inbound" }
                );
                let old = named(name);
                let mut data = UserData {
                    exists: true,
                    ..UserData::default()
                };
                data.roster.items.insert(
                    "romeo@localhost".into(),
                    RosterItem {
                        jid: "romeo@localhost".into(),
                        subscription: old.subscription,
                        ask: old.ask,
                        ..RosterItem::default()
                    },
                );
                if old.pending_in {
                    data.roster
                        .pending_in
                        .insert("romeo@localhost".into(), String::new());
                }
                let mut u =
                    UserState::new(BareJid::new("juliet@localhost").unwrap(), data, limits());
                let (j, _) = u.bind("balcony", 1, 1u32).unwrap();
                u.own_presence(&j, stanza("<presence/>"));
                let (t, effects) = if outbound {
                    let st = stanza(&format!(
                        "<presence from='juliet@localhost/balcony' to='romeo@localhost' type='{op_name}'/>"
                    ));
                    (roster::outbound(&old, op), u.outbound_subscription(st))
                } else {
                    let st = stanza(&format!(
                        "<presence from='romeo@localhost/orchard' to='juliet@localhost' type='{op_name}'/>"
                    ));
                    (roster::inbound(&old, op), u.deliver(st))
                };
                let now = ContactState::of(&u.data.roster, "romeo@localhost");
                assert_eq!(now, t.new_state, "{row}: stored state");
                let sent = effects.iter().any(|e| match e {
                    Effect::Route(s) => {
                        s.kind == Kind::Presence(op.presence_type())
                            && s.to
                                .as_ref()
                                .is_some_and(|t| t.as_str() == "romeo@localhost")
                    }
                    Effect::Deliver(to, s) => {
                        to == &vec![1] && s.kind == Kind::Presence(op.presence_type())
                    }
                    _ => false,
                });
                assert_eq!(sent, t.forward, "{row}: routed/delivered");
                let persisted = effects.iter().any(|e| matches!(e, Effect::Persist(_)));
                assert_eq!(persisted, t.new_state != old, "{row}: persisted");
                rows += 1;
            }
        }
    }
    assert_eq!(rows, 72);
}
