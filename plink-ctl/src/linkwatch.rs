//! rtnetlink link events: plink follows interfaces that are deleted and
//! re-created while it runs (containers recreate their veths), instead of
//! leaving a defunct XDP link behind and the new interface without a program.
use std::io;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// rtnetlink multicast group of link changes (`RTNLGRP_LINK`).
const RTNLGRP_LINK: u32 = 1;

/// What happened to an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// Created or changed (`RTM_NEWLINK`).
    Changed { name: String, ifindex: u32 },
    /// Deleted (`RTM_DELLINK`).
    Deleted { name: String, ifindex: u32 },
}

impl LinkEvent {
    pub fn name(&self) -> &str {
        match self {
            Self::Changed { name, .. } | Self::Deleted { name, .. } => name,
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

    #[test]
    fn garbage_gives_no_event_and_no_panic() {
        assert!(parse(&[]).is_empty());
        assert!(parse(&[0xff; 40]).is_empty());
        let mut cut = message(true, 7, "c1");
        cut.truncate(20);
        assert!(parse(&cut).is_empty());
    }
}
