//! IPFIX (RFC 7011) encoding of flow records: three templates of IANA
//! information elements, one per address-family pair, including the NAT
//! ones of RFC 8158 that nfdump's `nfcapd` (1.7) stores:
//! postNATSourceIPv4Address (225) and postNAPTSourceTransportPort (227) as
//! its "xlate src", 226 / 228 as "xlate dst", natEvent (230), octet and
//! packet delta counts each way (1 / 2 in, 23 / 24 out),
//! flowStart/EndMilliseconds, flowEndReason and ingressVRFID (the
//! consumer network id). NAT66 records carry the IPv6 post-NAT elements
//! (281 / 282), which nfcapd 1.7 does not store (it keeps the rest).
use std::net::{IpAddr, SocketAddr};

use super::{FlowEvent, FlowKind};

/// Template (data set) id of IPv4 flows (NAT44).
pub const TEMPLATE_ID: u16 = 256;
/// Template id of IPv6 flows to IPv6 backends (NAT66).
pub const TEMPLATE_ID_NAT66: u16 = 257;
/// Template id of IPv6 flows to IPv4 backends (NAT64).
pub const TEMPLATE_ID_NAT64: u16 = 258;
/// Largest message: fits a 1500-byte MTU with IPv4 and UDP headers.
pub const DEFAULT_MTU: usize = 1400;
const MESSAGE_HEADER: usize = 16;
const SET_HEADER: usize = 4;

/// natEvent values (IANA "natEvent" registry, RFC 8158). The registry has
/// no NAT66 session events: NAT66 flows use the generic create / delete.
pub const NAT_CREATE: u8 = 1;
pub const NAT_DELETE: u8 = 2;
pub const NAT44_SESSION_CREATE: u8 = 4;
pub const NAT44_SESSION_DELETE: u8 = 5;
pub const NAT64_SESSION_CREATE: u8 = 6;
pub const NAT64_SESSION_DELETE: u8 = 7;

/// flowEndReason values (IANA).
pub mod end_reason {
    pub const IDLE_TIMEOUT: u8 = 1;
    pub const END_OF_FLOW: u8 = 3;
    pub const FORCED_END: u8 = 4;
}

/// The IPv4 template's fields: (information element id, length).
pub const FIELDS: &[(u16, u16)] = &[
    (8, 4),   // sourceIPv4Address: the client
    (7, 2),   // sourceTransportPort
    (12, 4),  // destinationIPv4Address: the endpoint address
    (11, 2),  // destinationTransportPort
    (4, 1),   // protocolIdentifier
    (225, 4), // postNATSourceIPv4Address: the NAT address
    (227, 2), // postNAPTSourceTransportPort: the NAT port
    (226, 4), // postNATDestinationIPv4Address: the backend
    (228, 2), // postNAPTDestinationTransportPort: the backend port
    (230, 1), // natEvent
    (234, 4), // ingressVRFID: the consumer network id
    (152, 8), // flowStartMilliseconds
    (153, 8), // flowEndMilliseconds
    (1, 8),   // octetDeltaCount: consumer -> service
    (2, 8),   // packetDeltaCount
    (23, 8),  // postOctetDeltaCount: service -> consumer
    (24, 8),  // postPacketDeltaCount
    (136, 1), // flowEndReason (0 in start records)
    (323, 8), // observationTimeMilliseconds: when the event happened
];

/// NAT66: the IPv4 template with IPv6 addresses on both sides.
pub const FIELDS_NAT66: &[(u16, u16)] = &with_addresses(16, 16);
/// NAT64: IPv6 consumer side, IPv4 NAT address and backend.
pub const FIELDS_NAT64: &[(u16, u16)] = &with_addresses(16, 4);

/// [`FIELDS`] with the consumer-side addresses `pre` bytes long and the
/// provider-side ones `post` bytes (16: the IPv6 elements).
const fn with_addresses(pre: u16, post: u16) -> [(u16, u16); FIELDS.len()] {
    let mut f = [(0u16, 0u16); FIELDS.len()];
    let mut i = 0;
    while i < FIELDS.len() {
        f[i] = match (FIELDS[i].0, pre, post) {
            (8, 16, _) => (27, 16),    // sourceIPv6Address
            (12, 16, _) => (28, 16),   // destinationIPv6Address
            (225, _, 16) => (281, 16), // postNATSourceIPv6Address
            (226, _, 16) => (282, 16), // postNATDestinationIPv6Address
            _ => FIELDS[i],
        };
        i += 1;
    }
    f
}

/// One of the three templates, picked by a record's address families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Template {
    Nat44,
    Nat66,
    Nat64,
}

impl Template {
    pub const ALL: [Template; 3] = [Template::Nat44, Template::Nat66, Template::Nat64];

    pub fn of(r: &FlowEvent) -> Self {
        match (r.client, r.backend) {
            (SocketAddr::V4(_), _) => Template::Nat44,
            (SocketAddr::V6(_), SocketAddr::V6(_)) => Template::Nat66,
            (SocketAddr::V6(_), SocketAddr::V4(_)) => Template::Nat64,
        }
    }

    pub fn id(self) -> u16 {
        match self {
            Template::Nat44 => TEMPLATE_ID,
            Template::Nat66 => TEMPLATE_ID_NAT66,
            Template::Nat64 => TEMPLATE_ID_NAT64,
        }
    }

    pub fn from_id(id: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    pub fn fields(self) -> &'static [(u16, u16)] {
        match self {
            Template::Nat44 => FIELDS,
            Template::Nat66 => FIELDS_NAT66,
            Template::Nat64 => FIELDS_NAT64,
        }
    }

    /// Bytes of one data record.
    pub fn record_len(self) -> usize {
        self.fields().iter().map(|(_, l)| usize::from(*l)).sum()
    }

    fn nat_event(self, kind: FlowKind) -> u8 {
        match (self, kind) {
            (Template::Nat44, FlowKind::Start) => NAT44_SESSION_CREATE,
            (Template::Nat44, FlowKind::End) => NAT44_SESSION_DELETE,
            (Template::Nat66, FlowKind::Start) => NAT_CREATE,
            (Template::Nat66, FlowKind::End) => NAT_DELETE,
            (Template::Nat64, FlowKind::Start) => NAT64_SESSION_CREATE,
            (Template::Nat64, FlowKind::End) => NAT64_SESSION_DELETE,
        }
    }
}

/// Bytes of one IPv4 data record.
pub const RECORD_LEN: usize = {
    let mut n = 0;
    let mut i = 0;
    while i < FIELDS.len() {
        n += FIELDS[i].1 as usize;
        i += 1;
    }
    n
};

/// An IPFIX exporting process for one observation domain: sequence
/// numbers, template (re)sending, messages up to `mtu` bytes.
#[derive(Debug)]
pub struct Encoder {
    pub domain: u32,
    pub mtu: usize,
    /// Data records sent so far (the next message's sequence number).
    sequence: u32,
    /// Export time (s) the template was last sent; None: never.
    template_sent: Option<u32>,
    /// Resend the template this often (RFC 7011 §8.4 for UDP).
    pub template_refresh_secs: u32,
}

impl Encoder {
    pub fn new(domain: u32) -> Self {
        Self {
            domain,
            mtu: DEFAULT_MTU,
            sequence: 0,
            template_sent: None,
            template_refresh_secs: 60,
        }
    }

    /// The template set (set id 2) with plink's three templates.
    pub fn template_set() -> Vec<u8> {
        let len = SET_HEADER
            + Template::ALL
                .iter()
                .map(|t| 4 + t.fields().len() * 4)
                .sum::<usize>();
        let mut b = Vec::with_capacity(len);
        b.extend_from_slice(&2u16.to_be_bytes());
        b.extend_from_slice(&(len as u16).to_be_bytes());
        for t in Template::ALL {
            b.extend_from_slice(&t.id().to_be_bytes());
            b.extend_from_slice(&(t.fields().len() as u16).to_be_bytes());
            for (id, l) in t.fields() {
                b.extend_from_slice(&id.to_be_bytes());
                b.extend_from_slice(&l.to_be_bytes());
            }
        }
        b
    }

    /// Encodes `records` into messages of at most `mtu` bytes, exported at
    /// `now_secs` (UNIX time). The first message carries the template when
    /// it is due (never sent, or older than the refresh interval).
    pub fn encode(&mut self, now_secs: u32, records: &[FlowEvent]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let due = self
            .template_sent
            .is_none_or(|t| now_secs.wrapping_sub(t) >= self.template_refresh_secs);
        let mut template = due.then(Self::template_set);
        if template.is_some() {
            self.template_sent = Some(now_secs);
        }
        let mut rest = records;
        while !rest.is_empty() || template.is_some() {
            let mut m = Vec::with_capacity(self.mtu);
            m.extend_from_slice(&10u16.to_be_bytes());
            m.extend_from_slice(&0u16.to_be_bytes()); // length, below
            m.extend_from_slice(&now_secs.to_be_bytes());
            m.extend_from_slice(&self.sequence.to_be_bytes());
            m.extend_from_slice(&self.domain.to_be_bytes());
            debug_assert_eq!(m.len(), MESSAGE_HEADER);
            m.extend_from_slice(&template.take().unwrap_or_default());
            let mut sent = 0;
            // One data set per run of records of the same template, while
            // the message has room (at least one record per message).
            while let Some(first) = rest.first() {
                let t = Template::of(first);
                let run = rest.iter().take_while(|r| Template::of(r) == t).count();
                let room = self.mtu.saturating_sub(m.len() + SET_HEADER) / t.record_len();
                let n = if sent == 0 { room.max(1) } else { room }.min(run);
                if n == 0 {
                    break;
                }
                let (now, later) = rest.split_at(n);
                rest = later;
                let len = SET_HEADER + n * t.record_len();
                m.extend_from_slice(&t.id().to_be_bytes());
                m.extend_from_slice(&(len as u16).to_be_bytes());
                for r in now {
                    data_record(&mut m, t, r);
                }
                sent += n;
            }
            let len = m.len() as u16;
            m[2..4].copy_from_slice(&len.to_be_bytes());
            self.sequence = self.sequence.wrapping_add(sent as u32);
            out.push(m);
        }
        out
    }
}

fn put_addr(m: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => m.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => m.extend_from_slice(&a.octets()),
    }
}

fn data_record(m: &mut Vec<u8>, t: Template, r: &FlowEvent) {
    let start = m.len();
    put_addr(m, r.client.ip());
    m.extend_from_slice(&r.client.port().to_be_bytes());
    put_addr(m, r.endpoint.ip());
    m.extend_from_slice(&r.endpoint.port().to_be_bytes());
    m.push(r.proto);
    put_addr(m, r.nat.ip());
    m.extend_from_slice(&r.nat.port().to_be_bytes());
    put_addr(m, r.backend.ip());
    m.extend_from_slice(&r.backend.port().to_be_bytes());
    m.push(t.nat_event(r.kind));
    m.extend_from_slice(&r.network_id.to_be_bytes());
    m.extend_from_slice(&r.start_ms.to_be_bytes());
    m.extend_from_slice(&r.end_ms.to_be_bytes());
    m.extend_from_slice(&r.bytes_in.to_be_bytes());
    m.extend_from_slice(&r.packets_in.to_be_bytes());
    m.extend_from_slice(&r.bytes_out.to_be_bytes());
    m.extend_from_slice(&r.packets_out.to_be_bytes());
    m.push(r.reason.map_or(0, |x| x.ipfix()));
    m.extend_from_slice(&r.time_ms.to_be_bytes());
    debug_assert_eq!(m.len() - start, t.record_len());
}

#[cfg(test)]
mod tests;
