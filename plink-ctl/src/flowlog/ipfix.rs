//! IPFIX (RFC 7011) encoding of flow records: one template of IANA
//! information elements, including the NAT ones of RFC 8158, chosen among
//! those nfdump's `nfcapd` (1.7) stores: postNATSourceIPv4Address (225) and
//! postNAPTSourceTransportPort (227) as its "xlate src", 226 / 228 as
//! "xlate dst", natEvent (230), octet and packet delta counts each way
//! (1 / 2 in, 23 / 24 out), flowStart/EndMilliseconds, flowEndReason and
//! ingressVRFID (the consumer network id).
use super::{FlowEvent, FlowKind};

/// Template id of plink's flow records (data set id).
pub const TEMPLATE_ID: u16 = 256;
/// Largest message: fits a 1500-byte MTU with IPv4 and UDP headers.
pub const DEFAULT_MTU: usize = 1400;
const MESSAGE_HEADER: usize = 16;
const SET_HEADER: usize = 4;

/// natEvent values (IANA "natEvent" registry, RFC 8158).
pub const NAT44_SESSION_CREATE: u8 = 4;
pub const NAT44_SESSION_DELETE: u8 = 5;

/// flowEndReason values (IANA).
pub mod end_reason {
    pub const IDLE_TIMEOUT: u8 = 1;
    pub const END_OF_FLOW: u8 = 3;
    pub const FORCED_END: u8 = 4;
}

/// The template's fields: (information element id, length).
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

/// Bytes of one data record.
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

    /// The template set (set id 2) with plink's one template.
    pub fn template_set() -> Vec<u8> {
        let mut b = Vec::with_capacity(SET_HEADER + 4 + FIELDS.len() * 4);
        let len = SET_HEADER + 4 + FIELDS.len() * 4;
        b.extend_from_slice(&2u16.to_be_bytes());
        b.extend_from_slice(&(len as u16).to_be_bytes());
        b.extend_from_slice(&TEMPLATE_ID.to_be_bytes());
        b.extend_from_slice(&(FIELDS.len() as u16).to_be_bytes());
        for (id, l) in FIELDS {
            b.extend_from_slice(&id.to_be_bytes());
            b.extend_from_slice(&l.to_be_bytes());
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
            let t = template.take().unwrap_or_default();
            let room = self
                .mtu
                .saturating_sub(MESSAGE_HEADER + t.len() + SET_HEADER);
            let n = (room / RECORD_LEN).max(1).min(rest.len());
            let (now, later) = rest.split_at(n);
            rest = later;
            let mut m = Vec::with_capacity(self.mtu);
            m.extend_from_slice(&10u16.to_be_bytes());
            m.extend_from_slice(&0u16.to_be_bytes()); // length, below
            m.extend_from_slice(&now_secs.to_be_bytes());
            m.extend_from_slice(&self.sequence.to_be_bytes());
            m.extend_from_slice(&self.domain.to_be_bytes());
            m.extend_from_slice(&t);
            if !now.is_empty() {
                let len = SET_HEADER + now.len() * RECORD_LEN;
                m.extend_from_slice(&TEMPLATE_ID.to_be_bytes());
                m.extend_from_slice(&(len as u16).to_be_bytes());
                for r in now {
                    data_record(&mut m, r);
                }
            }
            let len = m.len() as u16;
            m[2..4].copy_from_slice(&len.to_be_bytes());
            self.sequence = self.sequence.wrapping_add(now.len() as u32);
            out.push(m);
        }
        out
    }
}

fn data_record(m: &mut Vec<u8>, r: &FlowEvent) {
    let start = m.len();
    m.extend_from_slice(&r.client.ip().octets());
    m.extend_from_slice(&r.client.port().to_be_bytes());
    m.extend_from_slice(&r.endpoint.ip().octets());
    m.extend_from_slice(&r.endpoint.port().to_be_bytes());
    m.push(r.proto);
    m.extend_from_slice(&r.nat.ip().octets());
    m.extend_from_slice(&r.nat.port().to_be_bytes());
    m.extend_from_slice(&r.backend.ip().octets());
    m.extend_from_slice(&r.backend.port().to_be_bytes());
    m.push(match r.kind {
        FlowKind::Start => NAT44_SESSION_CREATE,
        FlowKind::End => NAT44_SESSION_DELETE,
    });
    m.extend_from_slice(&r.network_id.to_be_bytes());
    m.extend_from_slice(&r.start_ms.to_be_bytes());
    m.extend_from_slice(&r.end_ms.to_be_bytes());
    m.extend_from_slice(&r.bytes_in.to_be_bytes());
    m.extend_from_slice(&r.packets_in.to_be_bytes());
    m.extend_from_slice(&r.bytes_out.to_be_bytes());
    m.extend_from_slice(&r.packets_out.to_be_bytes());
    m.push(r.reason.map_or(0, |x| x.ipfix()));
    m.extend_from_slice(&r.time_ms.to_be_bytes());
    debug_assert_eq!(m.len() - start, RECORD_LEN);
}

#[cfg(test)]
mod tests;
