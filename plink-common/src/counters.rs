//! Caps state, per-CPU traffic counters and the drop reasons every drop is
//! counted under.

/// Value of `EP_LIMITS`, indexed by endpoint id; written by the datapath only
/// (atomically, shared by all CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpLimitState {
    /// Flows created since the slot was zeroed. Live flows =
    /// `flows_created - EP_GC_FREED[endpoint] - flows_reclaimed` (the
    /// controller writes EP_GC_FREED).
    pub flows_created: u64,
    /// Second (`now_ns / 1e9`) the rate window counts.
    pub window_sec: u64,
    /// New flows admitted in that second.
    pub window_count: u64,
    /// Expired flows of this endpoint that the datapath removed itself to
    /// reuse their NAT port or cap slot (no controller needed; atomic adds).
    pub flows_reclaimed: u64,
    /// Next entry of the endpoint's `EP_RECENT` ring a refused new flow
    /// checks for an expired flow to reclaim.
    pub recent_cursor: u64,
}
const _: () = assert!(core::mem::size_of::<EpLimitState>() == 40);

/// Flows per endpoint whose keys the datapath remembers (`EP_RECENT`, a ring
/// written at creation): where the max-flows cap refuses a new flow, the
/// datapath looks there for an expired flow of the endpoint to reclaim, so
/// the cap frees itself without the controller's GC.
pub const EP_RECENT_FLOWS: u32 = 8;

/// Per-CPU traffic counters, used per endpoint, service, backend and NAT
/// address. Bytes are IP packet lengths; `in` = consumer → service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub flows_created: u64,
    /// New flows refused by the max-flows cap.
    pub refused_max_flows: u64,
    /// New flows refused by the new-flows-per-second cap.
    pub refused_rate: u64,
    /// New flows refused because no NAT port was free.
    pub nat_alloc_failures: u64,
    /// SYNs (consumer → service) whose MSS option was lowered to the clamp.
    pub mss_clamped_in: u64,
    /// SYN-ACKs (service → consumer) whose MSS option was lowered.
    pub mss_clamped_out: u64,
    /// Fragmentation-needed errors sent to a backend about a reply too big
    /// for the consumer interface (the reply itself is not forwarded).
    pub frag_needed_to_backend: u64,
    /// PROXY protocol headers inserted (first segments and their
    /// retransmissions).
    pub proxy_headers: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 96);

impl Counters {
    /// Sums per-CPU values into one total.
    pub fn add(&mut self, o: &Counters) {
        self.packets_in = self.packets_in.wrapping_add(o.packets_in);
        self.bytes_in = self.bytes_in.wrapping_add(o.bytes_in);
        self.packets_out = self.packets_out.wrapping_add(o.packets_out);
        self.bytes_out = self.bytes_out.wrapping_add(o.bytes_out);
        self.flows_created = self.flows_created.wrapping_add(o.flows_created);
        self.refused_max_flows = self.refused_max_flows.wrapping_add(o.refused_max_flows);
        self.refused_rate = self.refused_rate.wrapping_add(o.refused_rate);
        self.nat_alloc_failures = self.nat_alloc_failures.wrapping_add(o.nat_alloc_failures);
        self.mss_clamped_in = self.mss_clamped_in.wrapping_add(o.mss_clamped_in);
        self.mss_clamped_out = self.mss_clamped_out.wrapping_add(o.mss_clamped_out);
        self.frag_needed_to_backend = self
            .frag_needed_to_backend
            .wrapping_add(o.frag_needed_to_backend);
        self.proxy_headers = self.proxy_headers.wrapping_add(o.proxy_headers);
    }
}

macro_rules! drop_reasons {
    ($($variant:ident = $value:literal => $name:literal,)*) => {
        /// Why the datapath dropped a packet; index of the `DROPS` per-CPU array
        /// (and of `EP_DROPS` at `endpoint_id * DropReason::COUNT + reason`).
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum DropReason {
            $($variant = $value,)*
        }

        impl DropReason {
            /// Every reason, in index order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];

            /// snake_case name, used as a metric label.
            pub fn name(&self) -> &'static str {
                match self {
                    $(DropReason::$variant => $name,)*
                }
            }

            /// The reason stored at `index`.
            pub fn from_index(index: u32) -> Option<DropReason> {
                match index {
                    $($value => Some(DropReason::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

drop_reasons! {
    Malformed = 0 => "malformed",
    UnsupportedEthertype = 1 => "unsupported_ethertype",
    // IPv6 on a consumer interface while the IPv6 program's `V6_PROGS`
    // slot is empty (a controller that did not fill it).
    Ipv6 = 2 => "ipv6",
    IpOptions = 3 => "ip_options",
    Fragment = 4 => "fragment",
    UnsupportedProtocol = 5 => "unsupported_protocol",
    UnknownInterface = 6 => "unknown_interface",
    NoEndpoint = 7 => "no_endpoint",
    EndpointPending = 8 => "endpoint_pending",
    EndpointRejected = 9 => "endpoint_rejected",
    EndpointRemoved = 10 => "endpoint_removed",
    TcpNoFlow = 11 => "tcp_no_flow",
    CapMaxFlows = 12 => "cap_max_flows",
    CapNewFlowRate = 13 => "cap_new_flow_rate",
    NoBackend = 14 => "no_backend",
    NatPortsExhausted = 15 => "nat_ports_exhausted",
    ConntrackFull = 16 => "conntrack_full",
    TtlExceeded = 17 => "ttl_exceeded",
    FibNoNeigh = 18 => "fib_no_neigh",
    FibNotProvider = 19 => "fib_not_provider",
    FibFailed = 20 => "fib_failed",
    FragNeeded = 21 => "frag_needed",
    RedirectFailed = 22 => "redirect_failed",
    ArpNotOurs = 23 => "arp_not_ours",
    ReplyNoFlow = 24 => "reply_no_flow",
    CtBroken = 25 => "conntrack_broken",
    ServiceMissing = 26 => "service_missing",
    FibForwardingDisabled = 27 => "fib_forwarding_disabled",
    IcmpUnsupported = 28 => "icmp_unsupported",
    IcmpErrorNoFlow = 29 => "icmp_error_no_flow",
    OtherHost = 30 => "other_host",
    ReplyEndpointNotApproved = 31 => "reply_endpoint_not_approved",
    NatRetired = 32 => "nat_address_retired",
    ProxySynData = 33 => "proxy_syn_data",
    ProxyNoRoom = 34 => "proxy_no_room",
    ProxyHeaderChanged = 35 => "proxy_header_changed",
    Ipv6ExtensionHeader = 36 => "ipv6_extension_header",
    Ipv6AddressReserved = 37 => "ipv6_address_reserved",
    NdNotOurs = 38 => "nd_not_ours",
    // A NAT64 reply in UDP over IPv4 without a checksum: IPv6 requires one
    // and XDP cannot sum a payload of any length (RFC 7915 5.1.1 allows
    // dropping it).
    Nat64UdpNoChecksum = 39 => "nat64_udp_no_checksum",
}

impl DropReason {
    pub const COUNT: u32 = 40;
}
const _: () = assert!(DropReason::ALL.len() == DropReason::COUNT as usize);
