//! The PROXY protocol v2 headers the controller writes to PROXY_HEADERS
//! (issue 18), read by an independent parser (the `ppp` crate) once a flow's
//! addresses are filled in at `ADDRS_OFF`, as the datapath does.

use std::{borrow::Cow, net::Ipv4Addr, path::Path};

use plink_common::proxy::{self, LinkIdTlv, ProxyHeader, build_header, tlv};
use ppp::v2::{Addresses, Command, Header, IPv4, Protocol, Version};

const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(192, 0, 2, 7), 40_123);
const ENDPOINT: (Ipv4Addr, u16) = (Ipv4Addr::new(192, 0, 2, 50), 443);

/// The header as a flow from CLIENT to ENDPOINT sends it.
fn on_the_wire(h: &ProxyHeader) -> Vec<u8> {
    let mut b = h.bytes[..usize::from(h.len)].to_vec();
    let at = proxy::ADDRS_OFF;
    assert_eq!(
        &b[at..at + 12],
        &[0; 12],
        "address bytes are left to the datapath"
    );
    b[at..at + 4].copy_from_slice(&CLIENT.0.octets());
    b[at + 4..at + 8].copy_from_slice(&ENDPOINT.0.octets());
    b[at + 8..at + 10].copy_from_slice(&CLIENT.1.to_be_bytes());
    b[at + 10..at + 12].copy_from_slice(&ENDPOINT.1.to_be_bytes());
    b
}

/// Parses `wire` with ppp: the whole of it is the header, PROXY over TCP4
/// with CLIENT and ENDPOINT; returns the TLVs other than NOOP padding.
fn parse(wire: &[u8]) -> Vec<Tlv> {
    let h = Header::try_from(wire).unwrap_or_else(|e| panic!("ppp refuses {wire:02x?}: {e}"));
    assert_eq!(h.len(), wire.len(), "the length field covers every byte");
    assert_eq!(h.version, Version::Two);
    assert_eq!(h.command, Command::Proxy);
    assert_eq!(h.protocol, Protocol::Stream);
    assert_eq!(
        h.addresses,
        Addresses::IPv4(IPv4::new(CLIENT.0, ENDPOINT.0, CLIENT.1, ENDPOINT.1))
    );
    let mut out = Vec::new();
    for t in h.tlvs() {
        let t = t.unwrap_or_else(|e| panic!("ppp refuses a TLV of {wire:02x?}: {e}"));
        if t.kind == tlv::NOOP {
            assert!(t.value.iter().all(|b| *b == 0), "padding is zeros");
            continue;
        }
        let value = match t.value {
            Cow::Borrowed(v) => v.to_vec(),
            Cow::Owned(v) => v,
        };
        out.push((t.kind, value));
    }
    out
}

/// A TLV: its type and value.
type Tlv = (u8, Vec<u8>);

fn with_subtype(sub: u8, rest: &[u8]) -> Vec<u8> {
    let mut v = vec![sub];
    v.extend_from_slice(rest);
    v
}

#[test]
fn every_link_id_tlv_parses_with_ppp_to_the_addresses_and_the_link_id() {
    let id: u32 = 0x0A0B_0C0D;
    let cases: Vec<(LinkIdTlv, &[u8], Tlv)> = vec![
        (
            LinkIdTlv::Azure,
            b"",
            (0xEE, with_subtype(0x01, &id.to_le_bytes())),
        ),
        (
            LinkIdTlv::Aws,
            b"vpce-0123456789abcdef0",
            (0xEA, with_subtype(0x01, b"vpce-0123456789abcdef0")),
        ),
        (
            LinkIdTlv::Gcp,
            b"",
            (0xE0, u64::from(id).to_be_bytes().to_vec()),
        ),
        (
            LinkIdTlv::Custom(0xE5),
            b"",
            (0xE5, id.to_be_bytes().to_vec()),
        ),
        (
            LinkIdTlv::Custom(0xEF),
            b"",
            (0xEF, id.to_be_bytes().to_vec()),
        ),
    ];
    for (kind, name, want) in cases {
        let h = build_header(kind, id, name).unwrap();
        let wire = on_the_wire(&h);
        assert_eq!(wire.len() % 4, 0, "{kind:?}");
        assert_eq!(parse(&wire), vec![want], "{kind:?}");
    }
}

#[test]
fn every_padding_length_and_the_longest_aws_name_parse() {
    // Names of 1..=AWS_NAME_MAX bytes need every NOOP length: none, or 3, 6
    // or 5 bytes for 1, 2 or 3 bytes short of a word (a TLV is 3 at least).
    let mut padded = std::collections::BTreeSet::new();
    for n in 1..=proxy::AWS_NAME_MAX {
        let name = vec![b'e'; n];
        let h = build_header(LinkIdTlv::Aws, 1, &name).unwrap();
        let wire = on_the_wire(&h);
        assert_eq!(parse(&wire), vec![(0xEA, with_subtype(0x01, &name))], "{n}");
        // TLV: 3 + 1 + n bytes after the fixed part; the rest is padding.
        padded.insert(wire.len() - proxy::FIXED_LEN - 4 - n);
    }
    assert_eq!(
        padded.into_iter().collect::<Vec<_>>(),
        [0, 3, 5, 6],
        "no padding, or a NOOP TLV of 3, 5 or 6 bytes"
    );
}

#[test]
fn the_header_sum_plus_the_address_words_is_the_sum_of_the_wire_bytes() {
    // What the datapath adds to the TCP checksum: `sum` and the flow's 12
    // address bytes, as 16-bit words (the header keeps them word-aligned).
    let fold = |mut s: u32| {
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    };
    for kind in [LinkIdTlv::Azure, LinkIdTlv::Gcp, LinkIdTlv::Custom(0xE3)] {
        let h = build_header(kind, u32::MAX, b"").unwrap();
        let wire = on_the_wire(&h);
        let at = proxy::ADDRS_OFF;
        let addrs = proxy::ones_sum(&wire[at..at + 12]);
        assert_eq!(
            fold(h.sum + u32::from(addrs)),
            proxy::ones_sum(&wire),
            "{kind:?}"
        );
    }
}

/// From the YAML to the bytes: the header the plan puts in PROXY_HEADERS
/// for an endpoint carries its configured link id.
#[test]
fn a_configured_link_id_reaches_the_header_the_plan_writes() {
    use plink_ctl::{config::Config, model::Model, plan, state};
    let text = "\
interfaces:
  - {name: c1, role: consumer, network: vnet-a}
  - {name: p0, role: provider}
services:
  - name: web
    protocol: tcp
    ports: [{port: 443}]
    backends: [{address: 198.51.100.10}]
    nat: {addresses: [198.51.100.200]}
    visibility: ['*']
    proxy_protocol: {version: 2, link_id_tlv: azure}
endpoints:
  - {name: web-a, tenant: t, network: vnet-a, address: 192.0.2.50, service: web, link_id: 168496141}
";
    let config = Config::parse(Path::new("t.yaml"), text).unwrap_or_else(|e| panic!("{e}"));
    let st = state::reconcile(&config, &state::PersistedState::default()).unwrap();
    let model = Model::build(&config, &st).unwrap();
    let mut observed = plan::Observed::default();
    for (i, name) in ["c1", "p0"].into_iter().enumerate() {
        observed.interfaces.insert(
            name.into(),
            plan::HostInterface {
                ifindex: 10 + i as u32,
                mac: [2, 0, 0, 0, 0, i as u8],
                answers: plink_ctl::dataplane::AnswerPath::XdpTx,
            },
        );
    }
    let spec = plan::plan(&model, &observed, &plan::AllHealthy).unwrap();
    let id = model.endpoint_by_name("web-a").unwrap().id.0;
    let wire = on_the_wire(&spec.proxy_headers[&id]);
    assert_eq!(
        parse(&wire),
        vec![(0xEE, with_subtype(0x01, &0x0A0B_0C0Du32.to_le_bytes()))]
    );
}
