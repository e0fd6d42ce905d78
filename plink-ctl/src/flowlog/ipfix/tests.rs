use super::super::{EndReason, FlowEvent, FlowKind};
use super::*;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

fn event(i: u16, kind: FlowKind) -> FlowEvent {
    FlowEvent {
        kind,
        reason: (kind == FlowKind::End).then_some(EndReason::Closed),
        proto: 6,
        network_id: 2,
        endpoint_id: 7,
        service_id: 1,
        client: SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 10), 40000 + i).into(),
        endpoint: SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 50), 443).into(),
        nat: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 200), 1024 + i).into(),
        backend: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 8443).into(),
        start_ms: 1_700_000_000_000,
        end_ms: 1_700_000_001_500,
        time_ms: 1_700_000_002_000,
        packets_in: 10,
        bytes_in: 1000,
        packets_out: 8,
        bytes_out: 20_000,
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Checks each message: within the MTU, sets that tile it exactly, data
/// sets of whole records, and a sequence number counting the data records
/// of the messages before. Returns the data records of all of them.
fn check_messages(msgs: &[Vec<u8>]) -> u32 {
    let mut seen = 0u32;
    for m in msgs {
        assert!(m.len() <= DEFAULT_MTU, "{} bytes", m.len());
        assert_eq!(u32_at(m, 8), seen, "sequence = data records before");
        let mut at = 16;
        while at < m.len() {
            let (id, len) = (u16_at(m, at), u16_at(m, at + 2) as usize);
            if let Some(t) = Template::from_id(id) {
                assert_eq!((len - 4) % t.record_len(), 0);
                seen += ((len - 4) / t.record_len()) as u32;
            }
            at += len;
        }
        assert_eq!(at, m.len());
    }
    seen
}

#[test]
fn record_length_is_the_sum_of_the_template_fields() {
    assert_eq!(RECORD_LEN, 87);
    let t = Encoder::template_set();
    assert_eq!(u16_at(&t, 0), 2, "template set id");
    assert_eq!(u16_at(&t, 2) as usize, t.len());
    assert_eq!(u16_at(&t, 4), TEMPLATE_ID);
    assert_eq!(u16_at(&t, 6) as usize, FIELDS.len());
    // The IPv6 templates follow, the same elements with IPv6 addresses
    // where the family is IPv6 (sourceIPv6Address 27, destination 28,
    // postNATSource/DestinationIPv6Address 281 / 282).
    let t66 = 8 + FIELDS.len() * 4;
    assert_eq!(u16_at(&t, t66), TEMPLATE_ID_NAT66);
    let t64 = t66 + 4 + FIELDS_NAT66.len() * 4;
    assert_eq!(u16_at(&t, t64), TEMPLATE_ID_NAT64);
    assert_eq!(t64 + 4 + FIELDS_NAT64.len() * 4, t.len());
    let ids_at = |at: usize, n: usize| -> Vec<(u16, u16)> {
        (0..n)
            .map(|i| (u16_at(&t, at + 4 + i * 4), u16_at(&t, at + 6 + i * 4)))
            .collect()
    };
    let f66 = ids_at(t66, FIELDS_NAT66.len());
    let f64 = ids_at(t64, FIELDS_NAT64.len());
    for ie in [(27, 16), (28, 16), (281, 16), (282, 16)] {
        assert!(f66.contains(&ie), "NAT66 template lacks {ie:?}: {f66:?}");
    }
    for ie in [(27, 16), (28, 16), (225, 4), (226, 4)] {
        assert!(f64.contains(&ie), "NAT64 template lacks {ie:?}: {f64:?}");
    }
    assert_eq!(Template::Nat66.record_len(), RECORD_LEN + 4 * 12);
    assert_eq!(Template::Nat64.record_len(), RECORD_LEN + 2 * 12);
    // The NAT elements of RFC 8158 are in it.
    let ids: Vec<u16> = (0..FIELDS.len()).map(|i| u16_at(&t, 8 + i * 4)).collect();
    for ie in [225, 227, 230, 1, 2, 23, 24, 152, 153, 136] {
        assert!(ids.contains(&ie), "IE {ie} missing from {ids:?}");
    }
}

#[test]
fn first_message_has_header_template_and_data_in_field_order() {
    let mut e = Encoder::new(42);
    let msgs = e.encode(1_700_000_002, &[event(1, FlowKind::End)]);
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(u16_at(m, 0), 10, "version");
    assert_eq!(u16_at(m, 2) as usize, m.len(), "length");
    assert_eq!(u32_at(m, 4), 1_700_000_002, "export time");
    assert_eq!(u32_at(m, 8), 0, "sequence of the first message");
    assert_eq!(u32_at(m, 12), 42, "observation domain");
    let t = Encoder::template_set();
    assert_eq!(&m[16..16 + t.len()], &t[..]);
    let d = 16 + t.len();
    assert_eq!(u16_at(m, d), TEMPLATE_ID);
    assert_eq!(u16_at(m, d + 2) as usize, 4 + RECORD_LEN);
    let r = d + 4;
    assert_eq!(&m[r..r + 4], &[192, 0, 2, 10]);
    assert_eq!(u16_at(m, r + 4), 40001);
    assert_eq!(&m[r + 6..r + 10], &[192, 0, 2, 50]);
    assert_eq!(u16_at(m, r + 10), 443);
    assert_eq!(m[r + 12], 6);
    assert_eq!(
        &m[r + 13..r + 17],
        &[198, 51, 100, 200],
        "postNATSourceIPv4Address"
    );
    assert_eq!(u16_at(m, r + 17), 1025, "postNAPTSourceTransportPort");
    assert_eq!(&m[r + 19..r + 23], &[198, 51, 100, 10]);
    assert_eq!(u16_at(m, r + 23), 8443);
    assert_eq!(m[r + 25], NAT44_SESSION_DELETE);
    assert_eq!(u32_at(m, r + 26), 2, "ingressVRFID");
    assert_eq!(u64_at(m, r + 30), 1_700_000_000_000);
    assert_eq!(u64_at(m, r + 38), 1_700_000_001_500);
    assert_eq!(u64_at(m, r + 46), 1000, "octets in");
    assert_eq!(u64_at(m, r + 54), 10);
    assert_eq!(u64_at(m, r + 62), 20_000, "octets out");
    assert_eq!(u64_at(m, r + 70), 8);
    assert_eq!(m[r + 78], end_reason::END_OF_FLOW);
    assert_eq!(u64_at(m, r + 79), 1_700_000_002_000);
    assert_eq!(r + RECORD_LEN, m.len());
}

#[test]
fn messages_fit_the_mtu_and_sequence_numbers_count_data_records() {
    let mut e = Encoder::new(1);
    let recs: Vec<FlowEvent> = (0..100).map(|i| event(i, FlowKind::Start)).collect();
    let msgs = e.encode(100, &recs);
    assert!(msgs.len() > 1);
    assert_eq!(check_messages(&msgs), 100);
    // The next message goes on from there, without the template (not due).
    let next = e.encode(130, &recs[..1]);
    assert_eq!(u32_at(&next[0], 8), 100);
    assert_eq!(u16_at(&next[0], 16), TEMPLATE_ID, "no template set");
}

#[test]
fn the_template_is_resent_when_the_refresh_interval_passed() {
    let mut e = Encoder::new(1);
    e.encode(100, &[]);
    let idle = e.encode(159, &[]);
    assert!(idle.is_empty(), "nothing to send");
    let refreshed = e.encode(160, &[]);
    assert_eq!(refreshed.len(), 1);
    assert_eq!(u16_at(&refreshed[0], 16), 2, "template set");
    assert_eq!(u16_at(&refreshed[0], 2) as usize, refreshed[0].len());
}

fn v6(s: &str, port: u16) -> SocketAddr {
    SocketAddrV6::new(s.parse::<Ipv6Addr>().unwrap(), port, 0, 0).into()
}

/// A NAT66 record (IPv6 backend) and a NAT64 one (IPv4 backend).
fn ipv6_events() -> [FlowEvent; 2] {
    let mut nat66 = event(1, FlowKind::Start);
    nat66.client = v6("2001:db8:c::1", 40001);
    nat66.endpoint = v6("2001:db8:c::50", 80);
    nat66.nat = v6("2001:db8:100::200", 1025);
    nat66.backend = v6("2001:db8:100::10", 8080);
    let mut nat64 = event(2, FlowKind::End);
    nat64.client = v6("2001:db8:c::1", 40002);
    nat64.endpoint = v6("2001:db8:c::50", 80);
    [nat66, nat64]
}

#[test]
fn ipv6_records_take_their_template_with_16_byte_addresses() {
    let [nat66, nat64] = ipv6_events();
    assert_eq!(Template::of(&event(1, FlowKind::Start)), Template::Nat44);
    assert_eq!(Template::of(&nat66), Template::Nat66);
    assert_eq!(Template::of(&nat64), Template::Nat64);
    let mut e = Encoder::new(1);
    let msgs = e.encode(1_700_000_002, &[nat66, nat64]);
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    let d = 16 + Encoder::template_set().len();
    // One data set per template, in the order of the records.
    assert_eq!(u16_at(m, d), TEMPLATE_ID_NAT66);
    let len66 = u16_at(m, d + 2) as usize;
    assert_eq!(len66, 4 + Template::Nat66.record_len());
    let r = d + 4;
    let addr = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&m[at..at + 16]).unwrap());
    assert_eq!(addr(r), "2001:db8:c::1".parse::<Ipv6Addr>().unwrap());
    assert_eq!(u16_at(m, r + 16), 40001);
    assert_eq!(addr(r + 18), "2001:db8:c::50".parse::<Ipv6Addr>().unwrap());
    assert_eq!(m[r + 36], 6, "protocol");
    assert_eq!(
        addr(r + 37),
        "2001:db8:100::200".parse::<Ipv6Addr>().unwrap()
    );
    assert_eq!(u16_at(m, r + 53), 1025);
    assert_eq!(
        addr(r + 55),
        "2001:db8:100::10".parse::<Ipv6Addr>().unwrap()
    );
    assert_eq!(m[r + 73], NAT_CREATE);
    let d64 = d + len66;
    assert_eq!(u16_at(m, d64), TEMPLATE_ID_NAT64);
    assert_eq!(
        u16_at(m, d64 + 2) as usize,
        4 + Template::Nat64.record_len()
    );
    let r = d64 + 4;
    assert_eq!(addr(r), "2001:db8:c::1".parse::<Ipv6Addr>().unwrap());
    assert_eq!(&m[r + 37..r + 41], &[198, 51, 100, 200], "IPv4 NAT address");
    assert_eq!(u16_at(m, r + 41), 1026);
    assert_eq!(&m[r + 43..r + 47], &[198, 51, 100, 10], "IPv4 backend");
    assert_eq!(m[r + 49], NAT64_SESSION_DELETE);
    assert_eq!(r + Template::Nat64.record_len(), m.len());
    assert_eq!(super::super::records_in(m), 2);
}

#[test]
fn mixed_families_fit_the_mtu_and_count_every_record() {
    let [nat66, nat64] = ipv6_events();
    let recs: Vec<FlowEvent> = (0..90u16)
        .map(|i| match i % 3 {
            0 => event(i, FlowKind::Start),
            1 => nat66.clone(),
            _ => nat64.clone(),
        })
        .collect();
    let mut e = Encoder::new(1);
    let msgs = e.encode(100, &recs);
    assert_eq!(check_messages(&msgs), 90);
}
