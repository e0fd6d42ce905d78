//! rtnetlink link, neighbour and route events: plink follows interfaces that
//! are deleted and re-created while it runs (containers recreate their
//! veths), instead of leaving a defunct XDP link behind and the new interface
//! without a program; and established flows look their next hop up again
//! when a neighbour's link-layer address or a route changed (the datapath
//! caches the next hop per flow under `GlobalConfig::hop_gen`).
use std::io;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
    neighbour::{NeighbourAttribute, NeighbourMessage, NeighbourState},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// rtnetlink multicast groups: link, neighbour (both families) and IPv4
/// and IPv6 route changes (`RTNLGRP_LINK`, `RTNLGRP_NEIGH`,
/// `RTNLGRP_IPV4_ROUTE`, `RTNLGRP_IPV6_ROUTE`).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_NEIGH: u32 = 3;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_ROUTE: u32 = 11;

/// What happened to an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// Created or changed (`RTM_NEWLINK`).
    Changed { name: String, ifindex: u32 },
    /// Deleted (`RTM_DELLINK`).
    Deleted { name: String, ifindex: u32 },
    /// A neighbour entry was written or deleted: where it is (interface,
    /// address as the kernel printed it) and, while it is usable, its
    /// link-layer address.
    Neighbour {
        ifindex: u32,
        addr: String,
        lladdr: Option<Vec<u8>>,
    },
    /// An IPv4 or IPv6 route was added or deleted.
    Route,
}

impl LinkEvent {
    /// The interface a link event names; `None` for neighbours and routes.
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Changed { name, .. } | Self::Deleted { name, .. } => Some(name),
            Self::Neighbour { .. } | Self::Route => None,
        }
    }
}

/// Decides which events move the next-hop generation: a route change, a
/// link change, and a neighbour whose usable link-layer address differs from
/// the last one seen. Neighbour reachability confirmations (REACHABLE ↔
/// STALE with the same address) arrive every few seconds per neighbour and
/// change nothing a flow caches, so they do not make every flow look its
/// next hop up again.
#[derive(Default)]
pub struct HopTracker {
    neighbours: std::collections::HashMap<(u32, String), Option<Vec<u8>>>,
}

impl HopTracker {
    /// Whether `event` may have changed a flow's next hop.
    pub fn moves_hops(&mut self, event: &LinkEvent) -> bool {
        match event {
            LinkEvent::Neighbour {
                ifindex,
                addr,
                lladdr,
            } => {
                let key = (*ifindex, addr.clone());
                let previous = self.neighbours.insert(key, lladdr.clone());
                // The first sighting of a usable neighbour may replace one
                // the datapath resolved before we watched: count it.
                previous.as_ref() != Some(lladdr)
            }
            LinkEvent::Route | LinkEvent::Changed { .. } | LinkEvent::Deleted { .. } => true,
        }
    }
}

/// A socket subscribed to link events in the current network namespace.
pub struct LinkEvents {
    socket: Socket,
}

impl LinkEvents {
    pub fn subscribe() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, 0))?;
        socket.add_membership(RTNLGRP_LINK)?;
        socket.add_membership(RTNLGRP_NEIGH)?;
        socket.add_membership(RTNLGRP_IPV4_ROUTE)?;
        socket.add_membership(RTNLGRP_IPV6_ROUTE)?;
        Ok(Self { socket })
    }

    /// Blocks until the kernel sends link messages; returns their events.
    pub fn next(&self) -> io::Result<Vec<LinkEvent>> {
        let mut buf = vec![0u8; 64 * 1024];
        let n = self.socket.recv(&mut &mut buf[..], 0)?;
        Ok(parse(&buf[..n]))
    }
}

/// The link events in one datagram of rtnetlink messages. Other messages
/// and undecodable ones are skipped (a watcher must not stop on them).
pub fn parse(mut datagram: &[u8]) -> Vec<LinkEvent> {
    let mut out = Vec::new();
    while datagram.len() >= 16 {
        let len = u32::from_ne_bytes([datagram[0], datagram[1], datagram[2], datagram[3]]) as usize;
        if len < 16 || len > datagram.len() {
            break;
        }
        if let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[..len])
            && let NetlinkPayload::InnerMessage(inner) = msg.payload
        {
            match inner {
                RouteNetlinkMessage::NewLink(m) => {
                    if let Some(name) = link_name(&m) {
                        out.push(LinkEvent::Changed {
                            name,
                            ifindex: m.header.index,
                        });
                    }
                }
                RouteNetlinkMessage::DelLink(m) => {
                    if let Some(name) = link_name(&m) {
                        out.push(LinkEvent::Deleted {
                            name,
                            ifindex: m.header.index,
                        });
                    }
                }
                RouteNetlinkMessage::NewNeighbour(m) => out.extend(neighbour(&m, true)),
                RouteNetlinkMessage::DelNeighbour(m) => out.extend(neighbour(&m, false)),
                RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_) => {
                    out.push(LinkEvent::Route)
                }
                _ => {}
            }
        }
        // Messages are 4-byte aligned within a datagram.
        let step = len.div_ceil(4) * 4;
        if step >= datagram.len() {
            break;
        }
        datagram = &datagram[step..];
    }
    out
}

/// A neighbour message as an event; `present`: RTM_NEWNEIGH (not deleted).
/// `None` for a message that says nothing about the address a flow would
/// use: no destination, or a usable state without a link-layer address
/// (state-only updates).
fn neighbour(m: &NeighbourMessage, present: bool) -> Option<LinkEvent> {
    let addr = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(d) => Some(format!("{d:?}")),
        _ => None,
    })?;
    let usable = present
        && matches!(
            m.header.state,
            NeighbourState::Reachable
                | NeighbourState::Stale
                | NeighbourState::Delay
                | NeighbourState::Probe
                | NeighbourState::Permanent
                | NeighbourState::Noarp
        );
    let lladdr = if usable {
        Some(m.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(l) => Some(l.clone()),
            _ => None,
        })?)
    } else {
        None
    };
    Some(LinkEvent::Neighbour {
        ifindex: m.header.ifindex,
        addr,
        lladdr,
    })
}

fn link_name(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(new: bool, index: u32, name: &str) -> Vec<u8> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.attributes.push(LinkAttribute::IfName(name.into()));
        let inner = if new {
            RouteNetlinkMessage::NewLink(link)
        } else {
            RouteNetlinkMessage::DelLink(link)
        };
        let mut msg = NetlinkMessage::from(inner);
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    #[test]
    fn a_datagram_of_link_messages_gives_their_events() {
        let mut datagram = message(true, 7, "c1");
        while !datagram.len().is_multiple_of(4) {
            datagram.push(0);
        }
        datagram.extend(message(false, 7, "c1"));
        assert_eq!(
            parse(&datagram),
            vec![
                LinkEvent::Changed {
                    name: "c1".into(),
                    ifindex: 7
                },
                LinkEvent::Deleted {
                    name: "c1".into(),
                    ifindex: 7
                },
            ]
        );
    }

    fn neighbour_message(state: NeighbourState, lladdr: [u8; 6]) -> Vec<u8> {
        use netlink_packet_route::neighbour::NeighbourAddress;
        let mut n = NeighbourMessage::default();
        n.header.ifindex = 3;
        n.header.state = state;
        n.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                std::net::Ipv4Addr::new(198, 51, 100, 10),
            )));
        n.attributes
            .push(NeighbourAttribute::LinkLayerAddress(lladdr.to_vec()));
        let mut msg = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(n));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    #[test]
    fn only_a_moved_neighbour_moves_the_next_hops() {
        let mac = [2, 0, 0, 0, 1, 0x10];
        let mut t = HopTracker::default();
        let seen = |t: &mut HopTracker, state, mac| {
            let events = parse(&neighbour_message(state, mac));
            assert_eq!(events.len(), 1, "{events:?}");
            t.moves_hops(&events[0])
        };
        assert!(
            seen(&mut t, NeighbourState::Reachable, mac),
            "first sighting"
        );
        assert!(
            !seen(&mut t, NeighbourState::Stale, mac),
            "reachability only"
        );
        assert!(!seen(&mut t, NeighbourState::Reachable, mac));
        assert!(
            seen(&mut t, NeighbourState::Reachable, [2, 0, 0, 0, 1, 0x77]),
            "moved"
        );
        assert!(seen(&mut t, NeighbourState::Failed, mac), "unusable");
        assert!(seen(&mut t, NeighbourState::Reachable, mac), "usable again");
        assert!(t.moves_hops(&LinkEvent::Route));
    }

    #[test]
    fn garbage_gives_no_event_and_no_panic() {
        assert!(parse(&[]).is_empty());
        assert!(parse(&[0xff; 40]).is_empty());
        let mut cut = message(true, 7, "c1");
        cut.truncate(20);
        assert!(parse(&cut).is_empty());
    }
}
