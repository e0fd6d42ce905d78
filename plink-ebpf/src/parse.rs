//! Header parsing with the bounds checks the verifier wants.
use aya_ebpf::programs::XdpContext;
use network_types::eth::{EthHdr, EtherType};

pub enum EtherKind {
    Ipv4,
    Arp,
    Other,
}

/// Returns a pointer to a `T` at `offset`, or `None` when the frame is too short.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
pub fn ether_kind(ctx: &XdpContext) -> EtherKind {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return EtherKind::Other;
    };
    // Read the raw field: an unknown ether type must not be turned into the enum.
    let ether_type = unsafe {
        core::ptr::addr_of!((*eth).ether_type)
            .cast::<u16>()
            .read_unaligned()
    };
    if ether_type == EtherType::Ipv4 as u16 {
        EtherKind::Ipv4
    } else if ether_type == EtherType::Arp as u16 {
        EtherKind::Arp
    } else {
        EtherKind::Other
    }
}
