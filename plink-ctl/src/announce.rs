//! Route announcement through FRR (docs/FLEET.md): plink never speaks BGP.
//! It keeps one blackhole /32 (IPv6: /128) route per endpoint address it can serve in
//! the main table, with protocol [`RTPROT_PLINK`] and the metric of
//! `announce.metric`; FRR's bgpd redistributes exactly those (`redistribute
//! kernel route-map` matching the metric), setting the node's next hop on
//! the consumer link with an outbound route-map. Withdrawing is deleting
//! the route. The consumer interfaces never pass traffic to the kernel, so
//! the blackholes only ever see the gateway's own packets to an endpoint.
//!
//! [`desired`] is the pure part (unit-tested without root); [`RouteTable`]
//! writes the kernel table as a diff over rtnetlink.

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, bail};

use crate::{
    config::BackendState,
    model::Model,
    netlink::{NLMSG_ERROR, recv, request, send, socket},
    plan::Health,
};

/// `rtm_protocol` of plink's routes, so that a dump finds exactly ours and
/// `ip route show proto 245` shows them.
pub const RTPROT_PLINK: u8 = 245;

/// The endpoint addresses to announce: an address is announced while one
/// of its endpoints is approved and that endpoint's service has a backend
/// that takes new flows (active and healthy); nothing while the node drains.
pub fn desired(model: &Model, health: &dyn Health, draining: bool) -> BTreeSet<IpAddr> {
    if draining {
        return BTreeSet::new();
    }
    model
        .endpoints
        .values()
        .filter(|e| e.passes_traffic())
        .flat_map(|e| {
            let Some(s) = model.services.get(&e.service_id) else {
                return Vec::new();
            };
            if !s
                .backends
                .iter()
                .any(|b| b.state == BackendState::Active && health.healthy(b.id))
            {
                return Vec::new();
            }
            // The addresses the datapath serves: an IPv6 one of an IPv4
            // service (NAT64) draws traffic like the IPv4 one.
            e.served_addresses(s.family)
        })
        .collect()
}

/// What a sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RouteChanges {
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
}

/// plink's routes in one kernel routing table.
pub struct RouteTable {
    pub table: u32,
}

impl RouteTable {
    /// The main table: the one zebra reads kernel routes from.
    pub const MAIN: RouteTable = RouteTable { table: 254 };
}

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_DONE: u16 = 3;
const RTA_DST: u16 = 1;
const RTA_TABLE: u16 = 15;
const RTA_PRIORITY: u16 = 6;
const RTN_BLACKHOLE: u8 = 6;
const RT_TABLE_UNSPEC: u8 = 0;

/// A route message; `family` (AF_INET or AF_INET6) is the dump's when
/// `dst` is `None`, else `dst`'s own.
fn route_message(
    kind: u16,
    flags: u16,
    table: u32,
    family: u8,
    dst: Option<(IpAddr, u32)>,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(44);
    m.extend_from_slice(&0u32.to_ne_bytes()); // length, patched below
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let (family, dst_len) = match dst {
        None => (family, 0),
        Some((IpAddr::V4(_), _)) => (libc::AF_INET as u8, 32),
        Some((IpAddr::V6(_), _)) => (libc::AF_INET6 as u8, 128),
    };
    let (proto, kind_of) = if dst.is_some() {
        (RTPROT_PLINK, RTN_BLACKHOLE)
    } else {
        (0, 0)
    };
    m.extend_from_slice(&[family, dst_len, 0, 0, RT_TABLE_UNSPEC, proto, 0, kind_of]);
    m.extend_from_slice(&0u32.to_ne_bytes());
    if let Some((dst, metric)) = dst {
        let octets: Vec<u8> = match dst {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        m.extend_from_slice(&(4 + octets.len() as u16).to_ne_bytes());
        m.extend_from_slice(&RTA_DST.to_ne_bytes());
        m.extend_from_slice(&octets);
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&RTA_PRIORITY.to_ne_bytes());
        m.extend_from_slice(&metric.to_ne_bytes());
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&RTA_TABLE.to_ne_bytes());
        m.extend_from_slice(&table.to_ne_bytes());
    }
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m
}

/// The host destination (/32 or /128) and metric of one rtnetlink route
/// message, if it is one of plink's blackholes in `table`.
fn parse_route(msg: &[u8], table: u32) -> Option<(IpAddr, u32)> {
    // nlmsghdr (16) + rtmsg (12).
    let rt = msg.get(16..28)?;
    let (family, dst_len, rtm_table, proto, kind) = (rt[0], rt[1], rt[4], rt[5], rt[7]);
    let host_len = match i32::from(family) {
        libc::AF_INET => 32,
        libc::AF_INET6 => 128,
        _ => return None,
    };
    if dst_len != host_len || proto != RTPROT_PLINK || kind != RTN_BLACKHOLE {
        return None;
    }
    let mut table_of = u32::from(rtm_table);
    let mut dst = None;
    let mut metric = 0;
    let mut attrs = msg.get(28..)?;
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            break;
        }
        let value = &attrs[4..len];
        match (kind, value) {
            (RTA_DST, [a, b, c, d]) => dst = Some(IpAddr::V4(Ipv4Addr::new(*a, *b, *c, *d))),
            (RTA_DST, v6) if v6.len() == 16 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(v6);
                dst = Some(IpAddr::V6(Ipv6Addr::from(o)));
            }
            (RTA_TABLE, [a, b, c, d]) => table_of = u32::from_ne_bytes([*a, *b, *c, *d]),
            (RTA_PRIORITY, [a, b, c, d]) => metric = u32::from_ne_bytes([*a, *b, *c, *d]),
            _ => {}
        }
        let next = len.div_ceil(4) * 4;
        attrs = attrs.get(next..).unwrap_or(&[]);
    }
    (table_of == table)
        .then_some(dst)
        .flatten()
        .map(|d| (d, metric))
}

impl RouteTable {
    /// plink's routes in the table now (both families), with their metrics.
    pub fn list(&self) -> anyhow::Result<BTreeSet<(IpAddr, u32)>> {
        let mut out = self.list_family(libc::AF_INET as u8)?;
        out.extend(self.list_family(libc::AF_INET6 as u8)?);
        Ok(out)
    }

    fn list_family(&self, family: u8) -> anyhow::Result<BTreeSet<(IpAddr, u32)>> {
        let sock = socket()?;
        send(
            &sock,
            &route_message(RTM_GETROUTE, NLM_F_DUMP, self.table, family, None),
        )?;
        let mut out = BTreeSet::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = recv(&sock, &mut buf)?;
            let mut rest = &buf[..n];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let flags = u16::from_ne_bytes([rest[6], rest[7]]);
                if len < 16 || len > rest.len() {
                    bail!("malformed netlink route dump");
                }
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let err = rest
                            .get(16..20)
                            .map_or(0, |e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]));
                        return Err(io::Error::from_raw_os_error(-err))
                            .context("dumping the routing tables");
                    }
                    RTM_NEWROUTE => {
                        if let Some(dst) = parse_route(&rest[..len], self.table) {
                            out.insert(dst);
                        }
                    }
                    _ => {}
                }
                if flags & NLM_F_MULTI == 0 {
                    return Ok(out);
                }
                rest = &rest[len.div_ceil(4) * 4..];
            }
        }
    }

    /// Makes plink's routes in the table exactly `want`, with `metric`.
    pub fn sync(&self, want: &BTreeSet<IpAddr>, metric: u32) -> anyhow::Result<RouteChanges> {
        let have = self.list()?;
        let want: BTreeSet<(IpAddr, u32)> = want.iter().map(|a| (*a, metric)).collect();
        let host = |a: &IpAddr| if a.is_ipv4() { 32 } else { 128 };
        let mut changes = RouteChanges::default();
        for &(dst, metric) in want.difference(&have) {
            let msg = route_message(
                RTM_NEWROUTE,
                NLM_F_CREATE | NLM_F_REPLACE | NLM_F_ACK,
                self.table,
                0,
                Some((dst, metric)),
            );
            match request(&msg)? {
                0 => changes.added.push(dst),
                e => {
                    return Err(io::Error::from_raw_os_error(e)).with_context(|| {
                        format!(
                            "adding the route {dst}/{} to table {}",
                            host(&dst),
                            self.table
                        )
                    });
                }
            }
        }
        for &(dst, metric) in have.difference(&want) {
            let msg = route_message(RTM_DELROUTE, NLM_F_ACK, self.table, 0, Some((dst, metric)));
            match request(&msg)? {
                0 | libc::ESRCH | libc::ENOENT => changes.removed.push(dst),
                e => {
                    return Err(io::Error::from_raw_os_error(e)).with_context(|| {
                        format!(
                            "removing the route {dst}/{} from table {}",
                            host(&dst),
                            self.table
                        )
                    });
                }
            }
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Config,
        model::{BackendId, Model},
        state::PersistedState,
    };

    struct Down(Vec<u32>);
    impl Health for Down {
        fn healthy(&self, b: BackendId) -> bool {
            !self.0.contains(&b.0)
        }
    }

    fn model(text: &str) -> Model {
        let cfg = Config::parse(std::path::Path::new("test.yaml"), text)
            .unwrap_or_else(|e| panic!("{e}"));
        let state = crate::state::reconcile(&cfg, &PersistedState::default()).expect("ids");
        Model::build(&cfg, &state).expect("model")
    }

    const CFG: &str = "
interfaces:
  - {name: c1, role: consumer, network: vnet-a, next_hop: 192.0.2.10}
  - {name: p0, role: provider}
services:
  - name: orders
    protocol: tcp
    ports: [{port: 80, target_port: 8080}]
    backends: [{address: 198.51.100.10}, {address: 198.51.100.11}]
    nat: {addresses: [198.51.100.201], ports: 20000-29999}
    visibility: ['*']
    auto_approve: [tenant-a]
endpoints:
  - {name: a, tenant: tenant-a, network: vnet-a, address: 192.0.2.100, service: orders}
  - {name: b, tenant: tenant-b, network: vnet-a, address: 192.0.2.101, service: orders}
";

    #[test]
    fn approved_endpoints_with_a_backend_up_are_announced() {
        let m = model(CFG);
        let all = desired(&m, &crate::plan::AllHealthy, false);
        // `b` is pending (tenant-b is not auto-approved).
        assert_eq!(all, BTreeSet::from([IpAddr::from([192, 0, 2, 100])]));
        let ids: Vec<u32> = m
            .services
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.id.0))
            .collect();
        assert_eq!(desired(&m, &Down(ids[..1].to_vec()), false), all);
        assert!(
            desired(&m, &Down(ids), false).is_empty(),
            "no backend up: withdrawn"
        );
        assert!(
            desired(&m, &crate::plan::AllHealthy, true).is_empty(),
            "draining: withdrawn"
        );
    }

    #[test]
    fn a_nat64_address_is_announced_beside_the_ipv4_one() {
        let m = model(&CFG.replace(
            "address: 192.0.2.100, service: orders}",
            "address: 192.0.2.100, address6: '2001:db8:c1::100', service: orders}",
        ));
        let six: IpAddr = "2001:db8:c1::100".parse().unwrap();
        assert_eq!(
            desired(&m, &crate::plan::AllHealthy, false),
            BTreeSet::from([IpAddr::from([192, 0, 2, 100]), six])
        );
        // An IPv6 address alone in front of the IPv4 service.
        let m = model(&CFG.replace(
            "address: 192.0.2.100, service: orders}",
            "address: '2001:db8:c1::100', service: orders}",
        ));
        assert_eq!(
            desired(&m, &crate::plan::AllHealthy, false),
            BTreeSet::from([six])
        );
    }

    #[test]
    fn a_dumped_route_is_ours_only_in_our_table() {
        let mut msg = route_message(
            RTM_NEWROUTE,
            0,
            142,
            0,
            Some((IpAddr::from([192, 0, 2, 100]), 4242)),
        );
        assert_eq!(
            parse_route(&msg, 142),
            Some((IpAddr::from([192, 0, 2, 100]), 4242))
        );
        assert_eq!(parse_route(&msg, 143), None);
        msg[16 + 5] = 3; // proto boot: someone else's route
        assert_eq!(parse_route(&msg, 142), None);
    }

    #[test]
    fn an_ipv6_route_is_a_blackhole_128() {
        let dst: IpAddr = "2001:db8:c1::50".parse().unwrap();
        let msg = route_message(RTM_NEWROUTE, 0, 254, 0, Some((dst, 4242)));
        assert_eq!(msg[16], libc::AF_INET6 as u8, "family");
        assert_eq!(msg[17], 128, "dst_len");
        assert_eq!(msg[16 + 7], RTN_BLACKHOLE);
        assert_eq!(parse_route(&msg, 254), Some((dst, 4242)));
        let mut v4_len = msg.clone();
        v4_len[17] = 32; // an IPv6 /32 is a prefix, not an endpoint's route
        assert_eq!(parse_route(&v4_len, 254), None);
    }
}
