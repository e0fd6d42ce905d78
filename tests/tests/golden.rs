//! Golden packets through the XDP programs (BPF_PROG_TEST_RUN), as Katran
//! tests its datapath (katran/lib/testing: KatranTestFixtures.h): one table of
//! named cases per concern, each an input frame, the program and ingress
//! interface, the expected verdict with the expected output frame or drop
//! reason, and the counters it must move. Steps that change state between
//! cases (a new spec, a GC round, time passing, a map edited) are table rows
//! too, so a scenario reads top to bottom. One runner (`Bench::run`) checks
//! them all; cases run inside a test namespace whose routes and permanent
//! neighbours the FIB lookups see. Expected frames are built with checksums
//! computed from scratch (tests/src/packet.rs).
//!
//! Topology (gateway namespace `gw`):
//!   c1 ── consumer network 1    c2 ── consumer network 2
//!   p0 ── provider, 198.51.100.1/24, neighbours .10 and .11 permanent,
//!         .99 routed but unresolved (NO_NEIGH)
//!
//! Tables, one module per concern: `tcp`, `udp`, `icmp` (echo, time
//! exceeded, answers by redirect), `icmp_errors` (RFC 5508 both ways), `mtu`
//! (frag needed, MSS clamp), `parse` (refused frames), `arp_and_isolation`,
//! `approval`, `lifecycle` (reloads), `caps_and_nat`, `conntrack`; `setup`
//! holds the topology, the spec and frame builders, `programs` the verifier
//! and neighbour checks, `fuzz` the randomised invariants.

#[path = "golden/approval.rs"]
mod approval;
#[path = "golden/arp_and_isolation.rs"]
mod arp_and_isolation;
#[path = "golden/caps_and_nat.rs"]
mod caps_and_nat;
#[path = "golden/conntrack.rs"]
mod conntrack;
#[path = "golden/fleet.rs"]
mod fleet;
#[path = "golden/flowlog.rs"]
mod flowlog;
#[path = "golden/fuzz.rs"]
mod fuzz;
#[path = "golden/icmp.rs"]
mod icmp;
#[path = "golden/icmp_errors.rs"]
mod icmp_errors;
#[path = "golden/ipv6.rs"]
mod ipv6;
#[path = "golden/lifecycle.rs"]
mod lifecycle;
#[path = "golden/mtu.rs"]
mod mtu;
#[path = "golden/nat64.rs"]
mod nat64;
#[path = "golden/parse.rs"]
mod parse;
#[path = "golden/programs.rs"]
mod programs;
#[path = "golden/proxy.rs"]
mod proxy;
#[path = "golden/setup.rs"]
mod setup;
#[path = "golden/tcp.rs"]
mod tcp;
#[path = "golden/udp.rs"]
mod udp;

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use plink_common::{
    CtFwdKey, DropReason, IPPROTO_TCP, IPPROTO_UDP, flow_hash, nat_probe_port, prog_names,
    tcp_state, v4,
};
use plink_ctl::{
    EBPF_OBJECT,
    dataplane::{
        AnswerPath, BackendSpec, BackendState, CounterKind, Dataplane, DataplaneSpec, EndpointSpec,
        EndpointState, InterfaceRole, InterfaceSpec, NatSpec, PortSpec, Protocol, RetiredNat,
        ServiceSpec, Sizes, TimeoutSpec,
    },
};
use plink_tests::{
    golden::{self, XdpRun, verdict},
    netns::{self, Host, Topology},
    packet::{
        ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_PORT_UNREACH, ICMP_TIME_EXCEEDED, IPPROTO_ICMP,
        Ipv4Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, arp_reply, arp_request, fix_checksums,
        ip_checksum_ok, l4_checksum_error, l4_checksum_ok,
    },
};

use setup::*;

/// A check of a case's output: `check(input, output)`.
pub type OutputCheck = Box<dyn Fn(&[u8], &[u8])>;
/// A condition polled until it holds.
pub type Poll = Box<dyn FnMut(&mut Bench) -> anyhow::Result<bool>>;

/// What a case expects of the program's verdict and output.
pub enum Want {
    /// XDP_REDIRECT with exactly these bytes (checksums valid).
    Redirect(Vec<u8>),
    /// XDP_TX with exactly these bytes (checksums valid).
    Tx(Vec<u8>),
    /// XDP_DROP counted under this reason (and no other).
    Drop(DropReason),
    /// XDP_PASS with the frame unchanged.
    Pass,
    /// Only this verdict: frames that set state up, whose bytes other cases
    /// pin. Unless it is XDP_DROP, no drop may be counted.
    Verdict(u32),
    /// XDP_REDIRECT, no drop counted, and `check(input, output)` holds: for
    /// outputs that are not golden on purpose (a bad checksum carried, a port
    /// the probe picked).
    RedirectWith(OutputCheck),
}

/// A counter the runner can read before and after a case.
#[derive(Clone, Copy, Debug)]
pub enum Counter {
    Endpoint(u32, Field),
    Service(u32, Field),
    /// An endpoint's drops under one reason.
    EndpointDrops(u32, DropReason),
    /// Flows in conntrack.
    Flows,
    /// NAT ports in use on one address.
    NatPorts(Ipv4Addr),
}

/// A field of `plink_common::Counters`.
#[derive(Clone, Copy, Debug)]
pub enum Field {
    PacketsIn,
    PacketsOut,
    BytesOut,
    FlowsCreated,
    RefusedMaxFlows,
    RefusedRate,
    NatAllocFailures,
    MssClampedIn,
    MssClampedOut,
    FragNeededToBackend,
    ProxyHeaders,
}

impl Counter {
    fn read(self, b: &mut Bench) -> u64 {
        let field = |c: plink_common::Counters, f: Field| match f {
            Field::PacketsIn => c.packets_in,
            Field::PacketsOut => c.packets_out,
            Field::BytesOut => c.bytes_out,
            Field::FlowsCreated => c.flows_created,
            Field::RefusedMaxFlows => c.refused_max_flows,
            Field::RefusedRate => c.refused_rate,
            Field::NatAllocFailures => c.nat_alloc_failures,
            Field::MssClampedIn => c.mss_clamped_in,
            Field::MssClampedOut => c.mss_clamped_out,
            Field::FragNeededToBackend => c.frag_needed_to_backend,
            Field::ProxyHeaders => c.proxy_headers,
        };
        match self {
            Counter::Endpoint(id, f) => field(b.dp.counters(CounterKind::Endpoint, id).unwrap(), f),
            Counter::Service(id, f) => field(b.dp.counters(CounterKind::Service, id).unwrap(), f),
            Counter::EndpointDrops(id, r) => b.dp.endpoint_drop_counts(id).unwrap()[&r],
            Counter::Flows => b.dp.list_conntrack().unwrap().len() as u64,
            Counter::NatPorts(addr) => {
                b.dp.nat_ports_in_use()
                    .unwrap()
                    .get(&addr.into())
                    .copied()
                    .unwrap_or(0)
            }
        }
    }
}

/// One golden case: a frame into a program as if it arrived on `ingress`.
pub struct Case {
    pub name: String,
    pub prog: &'static str,
    pub ingress: u32,
    pub frame: Vec<u8>,
    pub want: Want,
    /// Counters that must move by exactly this much. Others are not looked
    /// at, except the global drop counters (see `Want`).
    pub deltas: Vec<(Counter, i64)>,
}

/// A state check between cases.
pub enum Expect {
    /// A counter's value.
    Count(Counter, u64),
    /// The NAT port count listed for an address (None: not listed).
    NatPorts(Ipv4Addr, Option<u64>),
    /// Any other assertion about the dataplane (flow entries' fields, …).
    That(&'static str, Box<dyn Fn(&mut Bench)>),
}

/// One row of a scenario.
pub enum Step {
    Case(Case),
    /// The controller applies a new spec.
    Apply(DataplaneSpec),
    /// One GC round, which collects exactly this many flows.
    Gc(u64),
    /// The controller purges an endpoint's flows: (flows removed, flows
    /// remaining if stated).
    Purge(u32, u64, Option<u64>),
    /// Time passes.
    Sleep(Duration),
    /// Poll (up to 5 s) until the condition holds.
    WaitFor(&'static str, Poll),
    Expect(Expect),
    /// A change outside the datapath and the spec (a neighbour, a map
    /// entry, the hop generation).
    Do(&'static str, Box<dyn FnOnce(&mut Bench)>),
}

/// A case of the consumer-side program.
pub fn consumer(
    name: impl Into<String>,
    ingress: u32,
    frame: impl AsRef<[u8]>,
    want: Want,
) -> Step {
    case(name, prog_names::CONSUMER, ingress, frame, want)
}

/// A case of the provider-side program.
pub fn provider(
    name: impl Into<String>,
    ingress: u32,
    frame: impl AsRef<[u8]>,
    want: Want,
) -> Step {
    case(name, prog_names::PROVIDER, ingress, frame, want)
}

fn case(
    name: impl Into<String>,
    prog: &'static str,
    ingress: u32,
    frame: impl AsRef<[u8]>,
    want: Want,
) -> Step {
    Step::Case(Case {
        name: name.into(),
        prog,
        ingress,
        frame: frame.as_ref().to_vec(),
        want,
        deltas: Vec::new(),
    })
}

impl Step {
    /// The counter deltas a case must produce.
    pub fn deltas(self, deltas: impl IntoIterator<Item = (Counter, i64)>) -> Step {
        match self {
            Step::Case(mut c) => {
                c.deltas.extend(deltas);
                Step::Case(c)
            }
            _ => panic!("only a case moves counters"),
        }
    }

    pub fn expect(name: &'static str, check: impl Fn(&mut Bench) + 'static) -> Step {
        Step::Expect(Expect::That(name, Box::new(check)))
    }

    pub fn count(counter: Counter, value: u64) -> Step {
        Step::Expect(Expect::Count(counter, value))
    }

    pub fn wait_for(
        what: &'static str,
        until: impl FnMut(&mut Bench) -> anyhow::Result<bool> + 'static,
    ) -> Step {
        Step::WaitFor(what, Box::new(until))
    }

    pub fn act(what: &'static str, f: impl FnOnce(&mut Bench) + 'static) -> Step {
        Step::Do(what, Box::new(f))
    }
}

/// XDP_REDIRECT with exactly these bytes, whatever their checksums say (a
/// checksum carried bad on purpose, UDP's "no checksum").
pub fn exactly(want: Vec<u8>) -> Want {
    Want::RedirectWith(Box::new(move |_, out| {
        assert_eq!(hex(out), hex(&want), "output bytes (got, want)")
    }))
}

/// A new flow of endpoint `ep`: counted once, one conntrack entry more.
pub fn opens(ep: u32) -> [(Counter, i64); 2] {
    [
        (Counter::Endpoint(ep, Field::FlowsCreated), 1),
        (Counter::Flows, 1),
    ]
}

/// A drop counted against endpoint `ep` under `reason`.
pub fn ep_drop(ep: u32, reason: DropReason) -> (Counter, i64) {
    (Counter::EndpointDrops(ep, reason), 1)
}

/// The loaded dataplane inside the gateway namespace.
pub struct Bench {
    pub dp: Dataplane,
}

impl Bench {
    pub fn new(spec: &DataplaneSpec) -> Self {
        Self::with_conntrack(spec, 1024)
    }

    pub fn with_conntrack(spec: &DataplaneSpec, conntrack: u32) -> Self {
        let mut dp = Dataplane::load_with(
            EBPF_OBJECT,
            None,
            Sizes {
                conntrack,
                lb_table: 1024,
                ..Sizes::default()
            },
        )
        .unwrap();
        dp.apply(spec).unwrap();
        dp.load_programs().unwrap();
        Self { dp }
    }

    pub fn raw(&mut self, prog: &str, ifindex: u32, frame: &[u8]) -> XdpRun {
        golden::run(self.dp.program(prog).unwrap(), ifindex, frame).unwrap()
    }

    fn drops(&mut self) -> BTreeMap<DropReason, u64> {
        self.dp.drop_counts().unwrap()
    }

    /// Runs a scenario's rows in order.
    pub fn run(&mut self, steps: Vec<Step>) {
        for step in steps {
            match step {
                Step::Case(c) => {
                    self.check(&c);
                }
                Step::Apply(spec) => self.dp.apply(&spec).unwrap(),
                Step::Gc(collected) => {
                    assert_eq!(self.dp.gc_conntrack().unwrap().flows, collected, "GC round");
                }
                Step::Purge(id, flows, remaining) => {
                    let r = self.dp.purge_endpoint(id).unwrap();
                    assert_eq!(r.flows, flows, "flows purged with endpoint {id}");
                    if let Some(remaining) = remaining {
                        assert_eq!(r.remaining, remaining, "flows left after the purge");
                    }
                }
                Step::Sleep(d) => std::thread::sleep(d),
                Step::WaitFor(what, mut until) => {
                    netns::wait_for(what, Duration::from_secs(5), || {
                        Ok(until(self)?.then_some(()))
                    })
                    .unwrap();
                }
                Step::Expect(Expect::Count(counter, value)) => {
                    assert_eq!(counter.read(self), value, "{counter:?}");
                }
                Step::Expect(Expect::NatPorts(addr, n)) => {
                    let listed = self
                        .dp
                        .nat_ports_in_use()
                        .unwrap()
                        .get(&addr.into())
                        .copied();
                    assert_eq!(listed, n, "NAT ports in use on {addr}");
                }
                Step::Expect(Expect::That(_, check)) => check(self),
                Step::Do(_, f) => f(self),
            }
        }
    }

    /// Runs one case and checks its verdict, output bytes, checksums, the
    /// global drop counters (exactly the expected reason moved, by one) and
    /// the counter deltas it states.
    pub fn check(&mut self, c: &Case) -> XdpRun {
        let name = &c.name;
        let counters_before: Vec<u64> = c.deltas.iter().map(|(k, _)| k.read(self)).collect();
        let before = self.drops();
        let run = self.raw(c.prog, c.ingress, &c.frame);
        let after = self.drops();
        let moved: Vec<(DropReason, u64)> = after
            .iter()
            .filter(|(r, n)| before.get(r) != Some(n))
            .map(|(r, n)| (*r, n - before.get(r).copied().unwrap_or(0)))
            .collect();
        let no_drop = |moved: &[(DropReason, u64)]| {
            assert!(moved.is_empty(), "{name}: no drop counted, got {moved:?}");
        };
        match &c.want {
            Want::Redirect(out) | Want::Tx(out) => {
                let v = if matches!(c.want, Want::Tx(_)) {
                    verdict::TX
                } else {
                    verdict::REDIRECT
                };
                assert_eq!(run.verdict, v, "{name}: verdict (drops moved: {moved:?})");
                assert_eq!(
                    hex(&run.output),
                    hex(out),
                    "{name}: output bytes (got, want)"
                );
                if run.output[12..14] == [8, 0] {
                    assert!(ip_checksum_ok(&run.output), "{name}: IP checksum");
                    assert!(l4_checksum_ok(&run.output), "{name}: L4 checksum");
                }
                no_drop(&moved);
            }
            Want::Drop(reason) => {
                assert_eq!(run.verdict, verdict::DROP, "{name}: verdict");
                assert_eq!(moved, vec![(*reason, 1)], "{name}: drop reason");
            }
            Want::Pass => {
                assert_eq!(run.verdict, verdict::PASS, "{name}: verdict");
                assert_eq!(run.output, c.frame, "{name}: passed unchanged");
                no_drop(&moved);
            }
            Want::Verdict(v) => {
                assert_eq!(run.verdict, *v, "{name}: verdict (drops moved: {moved:?})");
                if *v != verdict::DROP {
                    no_drop(&moved);
                }
            }
            Want::RedirectWith(check) => {
                assert_eq!(
                    run.verdict,
                    verdict::REDIRECT,
                    "{name}: verdict (drops moved: {moved:?})"
                );
                no_drop(&moved);
                check(&c.frame, &run.output);
            }
        }
        for ((counter, delta), before) in c.deltas.iter().zip(counters_before) {
            let now = counter.read(self);
            assert_eq!(
                now as i64 - before as i64,
                *delta,
                "{name}: {counter:?} moved by (got, want)"
            );
        }
        run
    }
}

/// Loads `spec` in the gateway namespace and runs `scenario` there (the
/// tables are built on that thread: their checks need not be `Send`).
pub fn golden(
    gw: &Gw,
    spec: DataplaneSpec,
    scenario: impl FnOnce(&mut Bench, Ifs, DataplaneSpec) + Send + 'static,
) {
    golden_sized(gw, spec, 1024, scenario)
}

/// `golden` with a conntrack table of `conntrack` flows.
pub fn golden_sized(
    gw: &Gw,
    spec: DataplaneSpec,
    conntrack: u32,
    scenario: impl FnOnce(&mut Bench, Ifs, DataplaneSpec) + Send + 'static,
) {
    let ifs = gw.ifs();
    gw.host
        .run_in(move || {
            let mut b = Bench::with_conntrack(&spec, conntrack);
            scenario(&mut b, ifs, spec)
        })
        .unwrap();
}
