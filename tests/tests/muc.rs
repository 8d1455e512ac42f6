//! Multi-user chat (XEP-0045) over real TCP and TLS: entering a room (creation, the
//! occupant list, self-presence with status codes, history and subject), groupchat and
//! private messages, nick changes and conflicts, leaving, service discovery; also with
//! the occupants on two nodes of a cluster.

use shoal_tests::im::*;
use shoal_tests::{Client, TestCluster, TestNode};

const ROOM: &str = "coven@conference.localhost";
const MUC_USER: &str = "http://jabber.org/protocol/muc#user";

fn join(nick: &str) -> String {
    join_in(ROOM, nick)
}

fn join_in(room: &str, nick: &str) -> String {
    format!("<presence to='{room}/{nick}'><x xmlns='http://jabber.org/protocol/muc'/></presence>")
}

/// A presence from `ROOM/nick` to `to` with the occupant item and status codes.
fn occupant(nick: &str, to: &str, item: &str, codes: &[&str]) -> String {
    occupant_in(ROOM, nick, to, item, codes)
}

fn occupant_in(room: &str, nick: &str, to: &str, item: &str, codes: &[&str]) -> String {
    let codes: String = codes
        .iter()
        .map(|c| format!("<status code='{c}'/>"))
        .collect();
    format!(
        "<presence to='{to}' from='{room}/{nick}'><x xmlns='{MUC_USER}'>{item}{codes}</x></presence>"
    )
}

fn empty_subject(to: &str) -> String {
    format!("<message to='{to}' from='{ROOM}' type='groupchat'><subject/></message>")
}

fn groupchat(to: &str, nick: &str, id: &str, body: &str) -> String {
    groupchat_in(ROOM, to, nick, id, body)
}

fn groupchat_in(room: &str, to: &str, nick: &str, id: &str, body: &str) -> String {
    format!(
        "<message to='{to}' from='{room}/{nick}' id='{id}' type='groupchat'><body>{body}</body></message>"
    )
}

/// The room's creator accepts the default configuration (§10.1.2): others may enter.
async fn accept_instant(c: &mut Client, room: &str) {
    let me = jid(c);
    assert_eq!(
        ask(c, &format!("<iq to='{room}' id='instant' type='set'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'/></query></iq>")).await,
        format!("<iq to='{me}' from='{room}' id='instant' type='result'/>")
    );
}

/// A muc#owner form submission with these `(var, value)` fields.
fn configure(room: &str, id: &str, fields: &[(&str, &str)]) -> String {
    let fields: String = fields
        .iter()
        .map(|(var, value)| format!("<field var='{var}'><value>{value}</value></field>"))
        .collect();
    format!(
        "<iq to='{room}' id='{id}' type='set'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#roomconfig</value></field>{fields}</x></query></iq>"
    )
}

/// The service's room directory as `c` gets it, with `rsm` in the query.
async fn directory(c: &mut Client, id: &str, rsm: &str) -> String {
    ask(c, &directory_query(id, rsm)).await
}

fn directory_query(id: &str, rsm: &str) -> String {
    format!(
        "<iq to='conference.localhost' id='{id}' type='get'><query xmlns='http://jabber.org/protocol/disco#items'>{rsm}</query></iq>"
    )
}

/// juliet creates the room, romeo enters: the stanzas XEP-0045 §7.2 and §10.1 require,
/// in their order.
async fn two_in_room(j: &mut Client, r: &mut Client) {
    let (jf, rf) = (jid(j), jid(r));
    j.send(&join("juliet")).await.unwrap();
    assert_eq!(
        next(j).await,
        occupant(
            "juliet",
            &jf,
            &format!("<item affiliation='owner' role='moderator' jid='{jf}'/>"),
            &["110", "201"]
        )
    );
    assert_eq!(next(j).await, empty_subject(&jf));
    // Nobody else may enter before the owner accepts the instant room (§10.1.1).
    let early = ask(r, &join("romeo")).await;
    assert!(
        early.contains("type='error'") && early.contains("<item-not-found"),
        "{early}"
    );
    accept_instant(j, ROOM).await;

    r.send(&join("romeo")).await.unwrap();
    // The occupants already there (a participant does not see real JIDs), then its
    // own presence, then the subject.
    assert_eq!(
        next(r).await,
        occupant(
            "juliet",
            &rf,
            "<item affiliation='owner' role='moderator'/>",
            &[]
        )
    );
    assert_eq!(
        next(r).await,
        occupant(
            "romeo",
            &rf,
            "<item affiliation='none' role='participant'/>",
            &["110"]
        )
    );
    assert_eq!(next(r).await, empty_subject(&rf));
    // The moderator sees the newcomer with its real JID.
    assert_eq!(
        next(j).await,
        occupant(
            "romeo",
            &jf,
            &format!("<item affiliation='none' role='participant' jid='{rf}'/>"),
            &[]
        )
    );
}

#[tokio::test]
async fn enter_talk_change_nick_and_leave() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    let mut r = login(&node, "romeo", "orchard").await;
    two_in_room(&mut j, &mut r).await;
    let (jf, rf) = (jid(&j), jid(&r));

    // §7.4: a groupchat message reaches every occupant, the sender too.
    j.send(&format!(
        "<message to='{ROOM}' id='g1' type='groupchat'><body>Hail</body></message>"
    ))
    .await
    .unwrap();
    assert_eq!(next(&mut j).await, groupchat(&jf, "juliet", "g1", "Hail"));
    assert_eq!(next(&mut r).await, groupchat(&rf, "juliet", "g1", "Hail"));

    // §7.5: a private message between occupants.
    r.send(&format!(
        "<message to='{ROOM}/juliet' id='p1' type='chat'><body>psst</body></message>"
    ))
    .await
    .unwrap();
    assert_eq!(
        next(&mut j).await,
        format!(
            "<message to='{jf}' from='{ROOM}/romeo' id='p1' type='chat'><body>psst</body><x xmlns='{MUC_USER}'/></message>"
        )
    );

    // §7.2.9: a nick in use is a conflict; the room is unchanged.
    let mut n = login(&node, "nurse", "kitchen").await;
    n.send(&join("romeo")).await.unwrap();
    let err = next(&mut n).await;
    assert!(
        err.starts_with(&format!(
            "<presence to='{}' from='{ROOM}/romeo' type='error'>",
            jid(&n)
        )),
        "{err}"
    );
    assert!(
        err.contains(
            "<error type='cancel'><conflict xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>"
        ),
        "{err}"
    );
    expect_nothing(&mut j).await;

    // §7.6: romeo becomes montague: unavailable with the new nick and 303, then
    // available under the new nick.
    r.send(&format!("<presence to='{ROOM}/montague'/>"))
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        format!(
            "<presence to='{rf}' from='{ROOM}/romeo' type='unavailable'><x xmlns='{MUC_USER}'><item affiliation='none' role='participant' nick='montague'/><status code='303'/><status code='110'/></x></presence>"
        )
    );
    assert_eq!(
        next(&mut r).await,
        occupant(
            "montague",
            &rf,
            "<item affiliation='none' role='participant'/>",
            &["110"]
        )
    );
    assert_eq!(
        next(&mut j).await,
        format!(
            "<presence to='{jf}' from='{ROOM}/romeo' type='unavailable'><x xmlns='{MUC_USER}'><item affiliation='none' role='participant' jid='{rf}' nick='montague'/><status code='303'/></x></presence>"
        )
    );
    assert_eq!(
        next(&mut j).await,
        occupant(
            "montague",
            &jf,
            &format!("<item affiliation='none' role='participant' jid='{rf}'/>"),
            &[]
        )
    );

    // §7.14: leaving, with a status.
    r.send(&format!(
        "<presence to='{ROOM}/montague' type='unavailable'><status>farewell</status></presence>"
    ))
    .await
    .unwrap();
    assert_eq!(
        next(&mut r).await,
        format!(
            "<presence to='{rf}' from='{ROOM}/montague' type='unavailable'><status>farewell</status><x xmlns='{MUC_USER}'><item affiliation='none' role='none'/><status code='110'/></x></presence>"
        )
    );
    assert_eq!(
        next(&mut j).await,
        format!(
            "<presence to='{jf}' from='{ROOM}/montague' type='unavailable'><status>farewell</status><x xmlns='{MUC_USER}'><item affiliation='none' role='none' jid='{rf}'/></x></presence>"
        )
    );
    // Not an occupant any more: its groupchat messages are refused.
    let refused = ask(
        &mut r,
        &format!("<message to='{ROOM}' id='g2' type='groupchat'><body>hello?</body></message>"),
    )
    .await;
    assert!(refused.contains("type='error'"), "{refused}");
    assert!(refused.contains("<not-acceptable"), "{refused}");
}

/// §7.2.15: history on entry, limited by the request, with delay stamps; then the
/// subject last. A closed connection leaves the room (its directed presence ends).
#[tokio::test]
async fn history_subject_and_leaving_by_disconnect() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    let mut r = login(&node, "romeo", "orchard").await;
    two_in_room(&mut j, &mut r).await;
    let (jf, rf) = (jid(&j), jid(&r));
    for (i, body) in ["one", "two", "three"].iter().enumerate() {
        j.send(&format!(
            "<message to='{ROOM}' id='h{i}' type='groupchat'><body>{body}</body></message>"
        ))
        .await
        .unwrap();
        assert_eq!(
            next(&mut j).await,
            groupchat(&jf, "juliet", &format!("h{i}"), body)
        );
        assert_eq!(
            next(&mut r).await,
            groupchat(&rf, "juliet", &format!("h{i}"), body)
        );
    }
    j.send(&format!(
        "<message to='{ROOM}' id='s1' type='groupchat'><subject>Plots</subject></message>"
    ))
    .await
    .unwrap();
    next(&mut j).await;
    next(&mut r).await;

    let mut n = login(&node, "nurse", "kitchen").await;
    let nf = jid(&n);
    n.send(&format!("<presence to='{ROOM}/nurse'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='2'/></x></presence>"))
        .await
        .unwrap();
    next(&mut n).await; // juliet
    next(&mut n).await; // romeo
    assert_eq!(
        next(&mut n).await,
        occupant(
            "nurse",
            &nf,
            "<item affiliation='none' role='participant'/>",
            &["110"]
        )
    );
    for (i, body) in [(1, "two"), (2, "three")] {
        let got = next(&mut n).await;
        let prefix = format!(
            "<message to='{nf}' from='{ROOM}/juliet' id='h{i}' type='groupchat'><body>{body}</body><delay xmlns='urn:xmpp:delay' from='{ROOM}' stamp='"
        );
        assert!(got.starts_with(&prefix), "{got}");
    }
    assert_eq!(
        next(&mut n).await,
        format!(
            "<message to='{nf}' from='{ROOM}/juliet' type='groupchat'><subject>Plots</subject></message>"
        )
    );
    next(&mut j).await; // nurse entered
    next(&mut r).await;

    // romeo's connection closes: the others see him leave.
    r.close().await.unwrap();
    assert_eq!(
        next(&mut n).await,
        format!(
            "<presence to='{nf}' from='{ROOM}/romeo' type='unavailable'><x xmlns='{MUC_USER}'><item affiliation='none' role='none'/></x></presence>"
        )
    );
}

#[tokio::test]
async fn service_and_room_discovery() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    let jf = jid(&j);
    assert_eq!(
        ask(&mut j, "<iq to='conference.localhost' id='d1' type='get'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>").await,
        format!("<iq to='{jf}' from='conference.localhost' id='d1' type='result'><query xmlns='http://jabber.org/protocol/disco#info'><identity category='conference' type='text' name='Chatrooms'/><feature var='http://jabber.org/protocol/disco#info'/><feature var='http://jabber.org/protocol/disco#items'/><feature var='http://jabber.org/protocol/muc'/><feature var='http://jabber.org/protocol/rsm'/></query></iq>")
    );
    j.send(&join("juliet")).await.unwrap();
    next(&mut j).await;
    next(&mut j).await;
    let info = ask(&mut j, &format!("<iq to='{ROOM}' id='d2' type='get'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")).await;
    assert!(
        info.contains("<identity category='conference' type='text' name='coven'/>"),
        "{info}"
    );
    assert!(
        info.contains("<feature var='http://jabber.org/protocol/muc'/>"),
        "{info}"
    );
}

/// Occupants on two nodes of a cluster: the room lives on one node, and every
/// occupant gets the room's stanzas wherever its session is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn occupants_on_two_cluster_nodes() {
    let cluster = TestCluster::start(2, &[("juliet", PW), ("romeo", PW)]);
    cluster.settled().await;
    let mut j = login(cluster.node(0), "juliet", "balcony").await;
    let mut r = login(cluster.node(1), "romeo", "orchard").await;
    two_in_room(&mut j, &mut r).await;
    let (jf, rf) = (jid(&j), jid(&r));
    r.send(&format!(
        "<message to='{ROOM}' id='g1' type='groupchat'><body>Across</body></message>"
    ))
    .await
    .unwrap();
    assert_eq!(next(&mut r).await, groupchat(&rf, "romeo", "g1", "Across"));
    assert_eq!(next(&mut j).await, groupchat(&jf, "romeo", "g1", "Across"));
}

/// §8.2 kick, §8.4 voice, §9.1 ban: what the moderator, the target and the others see,
/// and who may do what.
#[tokio::test]
async fn kick_voice_and_ban() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    let mut r = login(&node, "romeo", "orchard").await;
    two_in_room(&mut j, &mut r).await;
    let (jf, rf) = (jid(&j), jid(&r));
    let admin = |id: &str, item: &str| {
        format!(
            "<iq to='{ROOM}' id='{id}' type='set'><query xmlns='http://jabber.org/protocol/muc#admin'>{item}</query></iq>"
        )
    };

    // A participant may not kick.
    let no = ask(&mut r, &admin("k0", "<item nick='juliet' role='none'/>")).await;
    assert!(
        no.contains("type='error'") && no.contains("<forbidden"),
        "{no}"
    );

    // Voice taken: romeo becomes a visitor and may not speak.
    j.send(&admin("v1", "<item nick='romeo' role='visitor'/>"))
        .await
        .unwrap();
    next_unordered(
        &mut j,
        &[
            format!("<iq to='{jf}' from='{ROOM}' id='v1' type='result'/>"),
            occupant(
                "romeo",
                &jf,
                &format!("<item affiliation='none' role='visitor' jid='{rf}'/>"),
                &[],
            ),
        ],
    )
    .await;
    assert_eq!(
        next(&mut r).await,
        occupant(
            "romeo",
            &rf,
            "<item affiliation='none' role='visitor'/>",
            &["110"]
        )
    );
    let silent = ask(
        &mut r,
        &format!("<message to='{ROOM}' id='g1' type='groupchat'><body>hey</body></message>"),
    )
    .await;
    assert!(silent.contains("<forbidden"), "{silent}");

    // Kicked, with a reason: status 307, the actor's nick, 110 for the one kicked.
    j.send(&admin(
        "k1",
        "<item nick='romeo' role='none'><reason>Be gone</reason></item>",
    ))
    .await
    .unwrap();
    assert_eq!(
        next(&mut r).await,
        format!(
            "<presence to='{rf}' from='{ROOM}/romeo' type='unavailable'><x xmlns='{MUC_USER}'><item affiliation='none' role='none'><actor nick='juliet'/><reason>Be gone</reason></item><status code='307'/><status code='110'/></x></presence>"
        )
    );
    next_unordered(
        &mut j,
        &[
            format!("<iq to='{jf}' from='{ROOM}' id='k1' type='result'/>"),
            format!("<presence to='{jf}' from='{ROOM}/romeo' type='unavailable'><x xmlns='{MUC_USER}'><item affiliation='none' role='none' jid='{rf}'><actor nick='juliet'/><reason>Be gone</reason></item><status code='307'/></x></presence>"),
        ],
    )
    .await;

    // Banned by bare JID: entering is forbidden.
    assert_eq!(
        ask(
            &mut j,
            &admin("b1", "<item jid='romeo@localhost' affiliation='outcast'/>")
        )
        .await,
        format!("<iq to='{jf}' from='{ROOM}' id='b1' type='result'/>")
    );
    r.send(&join("romeo")).await.unwrap();
    let banned = next(&mut r).await;
    assert!(
        banned.contains("type='error'") && banned.contains("<forbidden"),
        "{banned}"
    );
}

/// XEP-0410 self-ping, a mediated invitation (§7.8.2), accepting the instant room
/// (§10.1.2) and destroying the room (§10.9).
#[tokio::test]
async fn self_ping_invitation_and_destruction() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    let mut r = login(&node, "romeo", "orchard").await;
    // Available, so that a message to her bare JID reaches this session (RFC 6121 §8.5.2).
    let mut n = online(&node, "nurse", "kitchen").await;
    two_in_room(&mut j, &mut r).await;
    let (jf, rf) = (jid(&j), jid(&r));
    let ping = |id: &str, nick: &str| {
        format!("<iq to='{ROOM}/{nick}' id='{id}' type='get'><ping xmlns='urn:xmpp:ping'/></iq>")
    };
    assert_eq!(
        ask(&mut r, &ping("p1", "romeo")).await,
        format!("<iq to='{rf}' from='{ROOM}/romeo' id='p1' type='result'/>")
    );
    let out = ask(&mut n, &ping("p2", "nurse")).await;
    assert!(
        out.contains("type='error'") && out.contains("<not-acceptable"),
        "{out}"
    );

    assert_eq!(
        ask(&mut j, &format!("<iq to='{ROOM}' id='c1' type='set'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'/></query></iq>")).await,
        format!("<iq to='{jf}' from='{ROOM}' id='c1' type='result'/>")
    );

    r.send(&format!("<message to='{ROOM}'><x xmlns='{MUC_USER}'><invite to='nurse@localhost'><reason>Come</reason></invite></x></message>"))
        .await
        .unwrap();
    assert_eq!(
        next(&mut n).await,
        format!(
            "<message to='nurse@localhost' from='{ROOM}'><x xmlns='{MUC_USER}'><invite from='{rf}'><reason>Come</reason></invite></x></message>"
        )
    );

    // Only the owner destroys.
    let destroy = |id: &str| {
        format!(
            "<iq to='{ROOM}' id='{id}' type='set'><query xmlns='http://jabber.org/protocol/muc#owner'><destroy jid='elsewhere@conference.localhost'><reason>Done</reason></destroy></query></iq>"
        )
    };
    let no = ask(&mut r, &destroy("x0")).await;
    assert!(no.contains("<forbidden"), "{no}");
    j.send(&destroy("x1")).await.unwrap();
    assert_eq!(
        next(&mut r).await,
        format!(
            "<presence to='{rf}' from='{ROOM}/romeo' type='unavailable'><x xmlns='{MUC_USER}'><item affiliation='none' role='none'/><destroy jid='elsewhere@conference.localhost'><reason>Done</reason></destroy></x></presence>"
        )
    );
    next_unordered(
        &mut j,
        &[
            format!("<iq to='{jf}' from='{ROOM}' id='x1' type='result'/>"),
            format!("<presence to='{jf}' from='{ROOM}/juliet' type='unavailable'><x xmlns='{MUC_USER}'><item affiliation='none' role='none'/><destroy jid='elsewhere@conference.localhost'><reason>Done</reason></destroy></x></presence>"),
        ],
    )
    .await;
    // The room is gone: entering creates a new one, owned by whoever enters first.
    r.send(&join("romeo")).await.unwrap();
    assert_eq!(
        next(&mut r).await,
        occupant(
            "romeo",
            &rf,
            &format!("<item affiliation='owner' role='moderator' jid='{rf}'/>"),
            &["110", "201"]
        )
    );
}

/// §10.2 configuration: the form, then a password-protected, moderated, non-anonymous
/// room of two at most, and what each setting does to newcomers (§7.2).
#[tokio::test]
async fn configured_room_admits_by_its_rules() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    let mut r = login(&node, "romeo", "orchard").await;
    let mut n = login(&node, "nurse", "kitchen").await;
    let (jf, rf) = (jid(&j), jid(&r));
    j.send(&join("juliet")).await.unwrap();
    next(&mut j).await;
    next(&mut j).await;
    let form = ask(&mut j, &format!("<iq to='{ROOM}' id='f1' type='get'><query xmlns='http://jabber.org/protocol/muc#owner'/></iq>")).await;
    assert!(form.starts_with(&format!("<iq to='{jf}' from='{ROOM}' id='f1' type='result'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='form'><field var='FORM_TYPE' type='hidden' label=''><value>http://jabber.org/protocol/muc#roomconfig</value></field>")), "{form}");
    assert!(form.contains("<field var='muc#roomconfig_moderatedroom' type='boolean' label='Moderated'><value>0</value></field>"), "{form}");

    let field =
        |var: &str, value: &str| format!("<field var='{var}'><value>{value}</value></field>");
    let submit = format!(
        "<iq to='{ROOM}' id='f2' type='set'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'>{}{}{}{}{}{}</x></query></iq>",
        field("FORM_TYPE", "http://jabber.org/protocol/muc#roomconfig"),
        field("muc#roomconfig_passwordprotectedroom", "1"),
        field("muc#roomconfig_roomsecret", "cauldron"),
        field("muc#roomconfig_moderatedroom", "1"),
        field("muc#roomconfig_whois", "anyone"),
        field("muc#roomconfig_maxusers", "2"),
    );
    j.send(&submit).await.unwrap();
    next_unordered(
        &mut j,
        &[
            format!("<iq to='{jf}' from='{ROOM}' id='f2' type='result'/>"),
            format!("<message to='{jf}' from='{ROOM}' type='groupchat'><x xmlns='{MUC_USER}'><status code='104'/></x></message>"),
        ],
    )
    .await;

    // No password: not authorized.
    r.send(&join("romeo")).await.unwrap();
    let err = next(&mut r).await;
    assert!(
        err.contains("type='error'") && err.contains("<not-authorized"),
        "{err}"
    );
    // With it: in, as a visitor (moderated), told that everyone sees real JIDs (100).
    let with_password = |nick: &str| {
        format!(
            "<presence to='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc'><password>cauldron</password></x></presence>"
        )
    };
    r.send(&with_password("romeo")).await.unwrap();
    assert_eq!(
        next(&mut r).await,
        occupant(
            "juliet",
            &rf,
            &format!("<item affiliation='owner' role='moderator' jid='{jf}'/>"),
            &[]
        )
    );
    assert_eq!(
        next(&mut r).await,
        occupant(
            "romeo",
            &rf,
            &format!("<item affiliation='none' role='visitor' jid='{rf}'/>"),
            &["100", "110"]
        )
    );
    next(&mut r).await; // subject
    // Two occupants at most.
    n.send(&with_password("nurse")).await.unwrap();
    let full = next(&mut n).await;
    assert!(full.contains("<service-unavailable"), "{full}");
    // A visitor may not change the subject (nor speak).
    let no = ask(
        &mut r,
        &format!("<message to='{ROOM}' id='s1' type='groupchat'><subject>Mine</subject></message>"),
    )
    .await;
    assert!(no.contains("<forbidden"), "{no}");
    // The room's discovery reflects the configuration.
    let info = ask(&mut r, &format!("<iq to='{ROOM}' id='d1' type='get'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")).await;
    for feature in ["muc_passwordprotected", "muc_moderated", "muc_nonanonymous"] {
        assert!(
            info.contains(&format!("<feature var='{feature}'/>")),
            "{info}"
        );
    }
}

/// Persistent rooms keep their configuration, affiliations and subject in storage
/// across a restart; temporary ones are gone with their occupants. The service lists
/// public rooms, a page at a time (XEP-0059).
#[tokio::test]
async fn persistent_rooms_outlive_a_restart_and_are_listed() {
    let first = node();
    let mut j = login(&first, "juliet", "balcony").await;
    let mut r = login(&first, "romeo", "orchard").await;
    let (jf, rf) = (jid(&j), jid(&r));
    let secret = "secret@conference.localhost";
    let picnic = "picnic@conference.localhost";
    for (room, by_romeo) in [(ROOM, false), (secret, false), (picnic, true)] {
        let c = if by_romeo { &mut r } else { &mut j };
        c.send(&join_in(room, "host")).await.unwrap();
        next(c).await;
        next(c).await;
    }
    for (room, fields) in [
        (
            ROOM,
            &[
                ("muc#roomconfig_roomname", "The Coven"),
                ("muc#roomconfig_persistentroom", "1"),
            ][..],
        ),
        (
            secret,
            &[
                ("muc#roomconfig_persistentroom", "1"),
                ("muc#roomconfig_publicroom", "0"),
            ][..],
        ),
    ] {
        j.send(&configure(room, "cfg", fields)).await.unwrap();
        next_unordered(
            &mut j,
            &[
                format!("<iq to='{jf}' from='{room}' id='cfg' type='result'/>"),
                format!("<message to='{jf}' from='{room}' type='groupchat'><x xmlns='{MUC_USER}'><status code='104'/></x></message>"),
            ],
        )
        .await;
    }
    assert_eq!(
        ask(&mut j, &format!("<iq to='{ROOM}' id='m' type='set'><query xmlns='http://jabber.org/protocol/muc#admin'><item jid='romeo@localhost' affiliation='member'/></query></iq>")).await,
        format!("<iq to='{jf}' from='{ROOM}' id='m' type='result'/>")
    );
    assert_eq!(
        ask(
            &mut j,
            &format!(
                "<message to='{ROOM}' id='s' type='groupchat'><subject>Brewing</subject></message>"
            )
        )
        .await,
        format!(
            "<message to='{jf}' from='{ROOM}/host' id='s' type='groupchat'><subject>Brewing</subject></message>"
        )
    );

    // The hidden room is not listed; the others are, in JID order.
    let items = |rooms: &[(&str, &str)]| -> String {
        rooms
            .iter()
            .map(|(jid, name)| format!("<item jid='{jid}' name='{name}'/>"))
            .collect()
    };
    let answer = |to: &str, id: &str, body: String| {
        format!(
            "<iq to='{to}' from='conference.localhost' id='{id}' type='result'><query xmlns='http://jabber.org/protocol/disco#items'>{body}</query></iq>"
        )
    };
    // The directory is read from storage, which rooms write after they answer: it
    // shows the hidden room's new configuration soon after.
    let want = answer(&rf, "l1", items(&[(ROOM, "The Coven"), (picnic, "picnic")]));
    let query = directory_query("l1", "");
    ask_until(&mut r, &query, &want, std::time::Duration::from_secs(5)).await;
    let rsm = "http://jabber.org/protocol/rsm";
    assert_eq!(
        directory(
            &mut r,
            "l2",
            &format!("<set xmlns='{rsm}'><max>1</max></set>")
        )
        .await,
        answer(
            &rf,
            "l2",
            format!(
                "{}<set xmlns='{rsm}'><first index='0'>{ROOM}</first><last>{ROOM}</last><count>2</count></set>",
                items(&[(ROOM, "The Coven")])
            )
        )
    );
    assert_eq!(
        directory(
            &mut r,
            "l3",
            &format!("<set xmlns='{rsm}'><max>1</max><after>{ROOM}</after></set>")
        )
        .await,
        answer(
            &rf,
            "l3",
            format!(
                "{}<set xmlns='{rsm}'><first index='1'>{picnic}</first><last>{picnic}</last><count>2</count></set>",
                items(&[(picnic, "picnic")])
            )
        )
    );

    let dir = first.data_dir();
    drop((j, r));
    first.stop();
    let second = users(TestNode::builder()).data_dir(dir).start();
    let mut r = login(&second, "romeo", "orchard").await;
    let rf = jid(&r);
    assert_eq!(
        directory(&mut r, "l4", "").await,
        answer(&rf, "l4", items(&[(ROOM, "The Coven")]))
    );
    // Romeo is still a member; the subject is still juliet's, who is not there.
    r.send(&join("romeo")).await.unwrap();
    assert_eq!(
        next(&mut r).await,
        occupant(
            "romeo",
            &rf,
            "<item affiliation='member' role='participant'/>",
            &["110"]
        )
    );
    assert_eq!(
        next(&mut r).await,
        format!(
            "<message to='{rf}' from='{ROOM}/host' type='groupchat'><subject>Brewing</subject></message>"
        )
    );
    let info = ask(&mut r, &format!("<iq to='{ROOM}' id='i' type='get'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")).await;
    assert!(
        info.contains("name='The Coven'") && info.contains("<feature var='muc_persistent'/>"),
        "{info}"
    );
    // The room information form (§6.4): one occupant, the subject.
    for field in [
        "<field var='muc#roominfo_occupants' label='Number of occupants'><value>1</value></field>",
        "<field var='muc#roominfo_subject' label='Current subject'><value>Brewing</value></field>",
    ] {
        assert!(info.contains(field), "{info}");
    }
    // The temporary room is gone: entering it creates it anew.
    r.send(&join_in(picnic, "romeo")).await.unwrap();
    assert_eq!(
        next(&mut r).await,
        occupant_in(
            picnic,
            "romeo",
            &rf,
            &format!("<item affiliation='owner' role='moderator' jid='{rf}'/>"),
            &["110", "201"]
        )
    );
}

/// A room outlives the node hosting it: occupants on three nodes talk, the room's
/// node dies mid-conversation, and the new owner restores the room from storage with
/// the occupants whose sessions live on, without them entering again. A message sent
/// while the room had no owner is delivered once it has one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_outlives_its_node() {
    let mut cluster = TestCluster::start(3, &[("juliet", PW), ("romeo", PW), ("nurse", PW)]);
    cluster.settled().await;
    let name = shoal_tests::cluster::account_owned_by(2, 3, "room", "conference.localhost");
    let room = format!("{name}@conference.localhost");
    let mut j = login(cluster.node(0), "juliet", "balcony").await;
    let mut r = login(cluster.node(1), "romeo", "orchard").await;
    let mut n = login(cluster.node(2), "nurse", "kitchen").await;
    let (jf, rf) = (jid(&j), jid(&r));
    for (c, nick, before) in [
        (&mut j, "juliet", 0),
        (&mut r, "romeo", 1),
        (&mut n, "nurse", 2),
    ] {
        c.send(&join_in(&room, nick)).await.unwrap();
        for _ in 0..before + 2 {
            next(c).await; // the others, itself, the subject
        }
        if nick == "juliet" {
            accept_instant(c, &room).await;
        }
    }
    next_unordered(
        &mut j,
        &[
            occupant_in(
                &room,
                "romeo",
                &jf,
                &format!("<item affiliation='none' role='participant' jid='{rf}'/>"),
                &[],
            ),
            occupant_in(
                &room,
                "nurse",
                &jf,
                "<item affiliation='none' role='participant' jid='nurse@localhost/kitchen'/>",
                &[],
            ),
        ],
    )
    .await;
    next(&mut r).await; // nurse entered
    let say = |id: &str, body: &str| {
        format!("<message to='{room}' id='{id}' type='groupchat'><body>{body}</body></message>")
    };
    // The room's node sends each other node the message once, with its recipients,
    // and hands the nurse's copy to her session itself (the nodes of a test cluster
    // share one metrics registry, and only rooms count these).
    let copies = || {
        ["here", "node", "account"].map(|path| {
            let sample = format!("shoal_muc_copies_total{{path=\"{path}\"}}");
            cluster.node(0).metric(&sample)
        })
    };
    let before = copies();
    r.send(&say("g1", "Before")).await.unwrap();
    assert_eq!(
        next(&mut j).await,
        groupchat_in(&room, &jf, "romeo", "g1", "Before")
    );
    assert_eq!(
        next(&mut r).await,
        groupchat_in(&room, &rf, "romeo", "g1", "Before")
    );
    assert_eq!(
        next(&mut n).await,
        groupchat_in(&room, "nurse@localhost/kitchen", "romeo", "g1", "Before")
    );
    let after = copies();
    assert_eq!([0, 1, 2].map(|i| after[i] - before[i]), [1.0, 2.0, 0.0]);

    cluster.kill(2);
    drop(n);
    r.send(&say("g2", "While nobody hosts it")).await.unwrap();
    assert_eq!(
        next(&mut j).await,
        groupchat_in(&room, &jf, "romeo", "g2", "While nobody hosts it")
    );
    assert_eq!(
        next(&mut r).await,
        groupchat_in(&room, &rf, "romeo", "g2", "While nobody hosts it")
    );
    j.send(&say("g3", "After")).await.unwrap();
    assert_eq!(
        next(&mut j).await,
        groupchat_in(&room, &jf, "juliet", "g3", "After")
    );
    assert_eq!(
        next(&mut r).await,
        groupchat_in(&room, &rf, "juliet", "g3", "After")
    );

    // The nurse's session died with its node: she is not in the room any more, and
    // entering again she finds exactly juliet and romeo.
    let mut n = login(cluster.node(0), "nurse", "again").await;
    let nf = jid(&n);
    n.send(&join_in(&room, "nurse")).await.unwrap();
    assert_eq!(
        next(&mut n).await,
        occupant_in(
            &room,
            "juliet",
            &nf,
            "<item affiliation='owner' role='moderator'/>",
            &[]
        )
    );
    assert_eq!(
        next(&mut n).await,
        occupant_in(
            &room,
            "romeo",
            &nf,
            "<item affiliation='none' role='participant'/>",
            &[]
        )
    );
    assert_eq!(
        next(&mut n).await,
        occupant_in(
            &room,
            "nurse",
            &nf,
            "<item affiliation='none' role='participant'/>",
            &["110"]
        )
    );
}

/// Affiliation lists and granting ownership (§9.5, §10.3, §10.5), a XEP-0249 direct
/// invitation passing through, and history limited by `since` (§7.2.15).
#[tokio::test]
async fn lists_ownership_direct_invitations_and_history_since() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    let mut r = login(&node, "romeo", "orchard").await;
    let mut n = online(&node, "nurse", "kitchen").await;
    two_in_room(&mut j, &mut r).await;
    let (jf, rf, nf) = (jid(&j), jid(&r), jid(&n));
    let admin = |id: &str, kind: &str, item: &str| {
        format!(
            "<iq to='{ROOM}' id='{id}' type='{kind}'><query xmlns='http://jabber.org/protocol/muc#admin'>{item}</query></iq>"
        )
    };
    let list = |to: &str, id: &str, items: &str| {
        format!(
            "<iq to='{to}' from='{ROOM}' id='{id}' type='result'><query xmlns='http://jabber.org/protocol/muc#admin'>{items}</query></iq>"
        )
    };

    j.send(&admin(
        "m1",
        "set",
        "<item jid='romeo@localhost' affiliation='member'/>",
    ))
    .await
    .unwrap();
    let romeo_as = |aff: &str, role: &str| {
        [
            format!("<iq to='{jf}' from='{ROOM}' id='m1' type='result'/>"),
            occupant(
                "romeo",
                &jf,
                &format!("<item affiliation='{aff}' role='{role}' jid='{rf}'/>"),
                &[],
            ),
        ]
    };
    next_unordered(&mut j, &romeo_as("member", "participant")).await;
    assert_eq!(
        next(&mut r).await,
        occupant(
            "romeo",
            &rf,
            "<item affiliation='member' role='participant'/>",
            &["110"]
        )
    );
    assert_eq!(
        ask(&mut j, &admin("l1", "get", "<item affiliation='member'/>")).await,
        list(
            &jf,
            "l1",
            "<item affiliation='member' jid='romeo@localhost'/>"
        )
    );
    let no = ask(&mut r, &admin("l2", "get", "<item affiliation='owner'/>")).await;
    assert!(
        no.contains("type='error'") && no.contains("<forbidden"),
        "{no}"
    );

    // A second owner (a moderator, so it sees real JIDs) may list the owners.
    j.send(&admin(
        "m1",
        "set",
        "<item jid='romeo@localhost' affiliation='owner'/>",
    ))
    .await
    .unwrap();
    next_unordered(&mut j, &romeo_as("owner", "moderator")).await;
    assert_eq!(
        next(&mut r).await,
        occupant(
            "romeo",
            &rf,
            &format!("<item affiliation='owner' role='moderator' jid='{rf}'/>"),
            &["110"]
        )
    );
    assert_eq!(
        ask(&mut r, &admin("l3", "get", "<item affiliation='owner'/>")).await,
        list(
            &rf,
            "l3",
            "<item affiliation='owner' jid='juliet@localhost'/><item affiliation='owner' jid='romeo@localhost'/>"
        )
    );

    // XEP-0249: an invitation sent to the user directly, passed on as it is.
    j.send("<message to='nurse@localhost' id='inv'><x xmlns='jabber:x:conference' jid='coven@conference.localhost' reason='Join us'/></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut n).await,
        format!(
            "<message to='nurse@localhost' from='{jf}' id='inv'><x xmlns='jabber:x:conference' jid='coven@conference.localhost' reason='Join us'/></message>"
        )
    );

    // History since a time after every message: none, straight to the subject.
    j.send(&format!(
        "<message to='{ROOM}' id='g1' type='groupchat'><body>Old news</body></message>"
    ))
    .await
    .unwrap();
    next(&mut j).await;
    next(&mut r).await;
    n.send(&format!("<presence to='{ROOM}/nurse'><x xmlns='http://jabber.org/protocol/muc'><history since='2100-01-01T00:00:00Z'/></x></presence>"))
        .await
        .unwrap();
    for nick in ["juliet", "romeo"] {
        assert!(
            next(&mut n)
                .await
                .contains(&format!("from='{ROOM}/{nick}'"))
        );
    }
    assert_eq!(
        next(&mut n).await,
        occupant(
            "nurse",
            &nf,
            "<item affiliation='none' role='participant'/>",
            &["110"]
        )
    );
    assert_eq!(next(&mut n).await, empty_subject(&nf));
}

/// An occupant that blocks the room (XEP-0191) gets none of its stanzas, although
/// the room hands copies to sessions itself.
#[tokio::test]
async fn a_blocked_room_reaches_nobody() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    let mut r = login(&node, "romeo", "orchard").await;
    two_in_room(&mut j, &mut r).await;
    let (jf, rf) = (jid(&j), jid(&r));
    assert_eq!(
        ask(&mut r, &format!("<iq type='set' id='bl'><block xmlns='urn:xmpp:blocking'><item jid='{ROOM}'/></block></iq>")).await,
        format!("<iq to='{rf}' id='bl' type='result'/>")
    );
    j.send(&format!(
        "<message to='{ROOM}' id='g1' type='groupchat'><body>Anyone?</body></message>"
    ))
    .await
    .unwrap();
    assert_eq!(
        next(&mut j).await,
        groupchat(&jf, "juliet", "g1", "Anyone?")
    );
    expect_nothing(&mut r).await;
}
