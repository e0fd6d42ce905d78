//! ARP replies for endpoint addresses (consumer side) and NAT addresses
//! (provider side), built in place and sent back out of the ingress
//! interface (`answer::back_out`).
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use plink_common::{DropReason, NetAddrKey, nat_addr_flags, role, v4_be};

use crate::{
    maps::{ARP_ENDPOINTS, INTERFACES, NAT_ADDRS},
    parse::{ETH_LEN, load, store},
    stats::{self, NO_EP},
};

const ARP_LEN: usize = 28;

/// Answers an ARP request on `ifindex` if it asks for one of our addresses.
/// Anything else is dropped on consumer interfaces and passed on the provider.
#[inline(never)]
pub fn handle(ctx: XdpContext, ifindex: u32, want_role: u32) -> u32 {
    let not_ours = || {
        if want_role == role::CONSUMER as u32 {
            stats::drop(DropReason::ArpNotOurs, NO_EP)
        } else {
            xdp_action::XDP_PASS
        }
    };
    // SAFETY: map value, read only.
    let Some(iface) = (unsafe { INTERFACES.get(&ifindex) }).copied() else {
        return not_ours();
    };
    if iface.role as u32 != want_role {
        return not_ours();
    }
    let Some(mut a) = load::<[u8; ARP_LEN]>(&ctx, ETH_LEN) else {
        return if want_role == role::CONSUMER as u32 {
            stats::drop(DropReason::Malformed, NO_EP)
        } else {
            xdp_action::XDP_PASS
        };
    };
    // Ethernet/IPv4 request: htype 1, ptype 0x0800, hlen 6, plen 4, op 1.
    if a[0..8] != [0, 1, 8, 0, 6, 4, 0, 1] {
        return not_ours();
    }
    let target = [a[24], a[25], a[26], a[27]];
    let target_be = u32::from_ne_bytes(target);
    let ours = if want_role == role::CONSUMER as u32 {
        let key = NetAddrKey {
            network_id: iface.network_id,
            addr_be: v4_be(target_be),
        };
        // SAFETY: map lookup, value unused.
        unsafe { ARP_ENDPOINTS.get(&key) }.is_some()
    } else {
        // SAFETY: as above. A retired address (drained, kept only to drop
        // late replies) is no longer announced.
        unsafe { NAT_ADDRS.get(&v4_be(target_be)) }
            .is_some_and(|n| n.flags & nat_addr_flags::RETIRED == 0)
    };
    if !ours {
        return not_ours();
    }
    let mut requester_mac = [0u8; 6];
    requester_mac.copy_from_slice(&a[8..14]);
    let requester_ip = [a[14], a[15], a[16], a[17]];
    a[7] = 2; // reply
    a[8..14].copy_from_slice(&iface.mac);
    a[14..18].copy_from_slice(&target);
    a[18..24].copy_from_slice(&requester_mac);
    a[24..28].copy_from_slice(&requester_ip);
    if store(&ctx, ETH_LEN, a) && store(&ctx, 0, requester_mac) && store(&ctx, 6, iface.mac) {
        crate::answer::back_out(&ctx, iface.flags, NO_EP)
    } else {
        stats::drop(DropReason::Malformed, NO_EP)
    }
}
