//! Every map the datapath uses, defined in one place.
use aya_ebpf::{macros::map, maps::PerCpuHashMap};
use plink_common::{IfStats, MAX_INTERFACES};

/// Per-interface counters keyed by ifindex. The controller inserts a zeroed
/// entry for each interface it attaches to; frames on other interfaces are not counted.
#[map(name = "IF_STATS")]
pub static IF_STATS: PerCpuHashMap<u32, IfStats> =
    PerCpuHashMap::with_max_entries(MAX_INTERFACES, 0);
