//! A fleet's nodes choose the same backend for every flow (issue 17 item
//! 1): one shared config, three node sections; each node's dataplane is
//! loaded from its resolved config with the fleet's shared ids (what etcd
//! holds), and 1,000 new flows are checked against a prediction made from
//! the config alone (Maglev over the backends' addresses, ports and
//! weights, the datapath's flow hash). Each node source-NATs to its own
//! address.

use std::path::Path;

use plink_ctl::{
    config::Config,
    maglev::{self, MaglevBackend},
    model::Model,
    plan::{self, AllHealthy, HostInterface, Observed},
    state::{self, PersistedState},
};

use super::*;

const BACKEND12: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 12);
const BACKEND12_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x12];

const FLEET: &str = "\
interfaces:
  - {name: c1, role: consumer, network: vnet-a}
  - {name: c2, role: consumer, network: vnet-b}
  - {name: p0, role: provider}
services:
  - name: orders
    protocol: tcp
    ports: [{port: 80, target_port: 8080}]
    backends: [{address: 198.51.100.12, weight: 3}, {address: 198.51.100.10}, {address: 198.51.100.11, weight: 2}]
    nat: {ports: 1024-65535}
    visibility: ['*']
    auto_approve: ['*']
    maglev_table_size: 307
endpoints:
  - {name: orders-a, tenant: t, network: vnet-a, address: 192.0.2.50, service: orders}
fleet:
  nodes:
    - name: gw1
      nat: [{service: orders, addresses: [198.51.100.201]}]
    - name: gw2
      nat: [{service: orders, addresses: [198.51.100.202]}]
    - name: gw3
      nat: [{service: orders, addresses: [198.51.100.203]}]
";

/// The backend the config says a flow gets: Maglev over the service's
/// backends (any listing order gives the same table), indexed by the flow
/// hash of its forward key.
fn predict(cfg: &Config, network_id: u32, client_port: u16) -> Ipv4Addr {
    let s = &cfg.services[0];
    let target = s.ports[0].target_port.unwrap_or(s.ports[0].port);
    let backends: Vec<MaglevBackend> = s
        .backends
        .iter()
        .map(|b| MaglevBackend {
            address: b.address,
            port: target,
            weight: b.weight,
        })
        .collect();
    let table = maglev::build_table(&backends, s.maglev_table_size).unwrap();
    let key = fwd_key(network_id, (CLIENT, client_port), (EP_TCP, 80), IPPROTO_TCP);
    let slot = flow_hash(&key) % s.maglev_table_size;
    match backends[table[slot as usize] as usize].address {
        std::net::IpAddr::V4(a) => a,
        other => panic!("the fleet's service is IPv4, not {other}"),
    }
}

#[test]
fn every_node_picks_the_same_backend_for_1000_flows() {
    let gw = gateway();
    gw.host
        .neigh_permanent("198.51.100.12", BACKEND12_MAC, "p0")
        .unwrap();
    let shared_cfg = Config::parse(Path::new("fleet.yaml"), FLEET).unwrap();
    // The fleet's shared ids and decisions, as the first node wrote them to
    // the store and every other node reads them.
    let shared: PersistedState = state::reconcile(&shared_cfg, &PersistedState::default()).unwrap();
    let network_id = shared.networks.get(&"vnet-a".to_owned()).unwrap();
    let predicted: Vec<Ipv4Addr> = (0..1000u16)
        .map(|i| predict(&shared_cfg, network_id, 10_000 + i))
        .collect();
    // The weights show in the prediction (3:1:2), so it is not trivial.
    let share = |a: Ipv4Addr| predicted.iter().filter(|&&p| p == a).count();
    assert!(share(BACKEND12) > share(BACKEND11) && share(BACKEND11) > share(BACKEND10));

    let ifs = gw.ifs();
    let mut observed = Observed::default();
    for (name, ifindex, mac) in [
        ("c1", ifs.c1, ifs.c1_mac),
        ("c2", ifs.c2, ifs.c2_mac),
        ("p0", ifs.p0, ifs.p0_mac),
    ] {
        observed.interfaces.insert(
            name.to_owned(),
            HostInterface {
                ifindex,
                mac,
                answers: AnswerPath::XdpTx,
            },
        );
    }
    for (node, nat) in [
        ("gw1", Ipv4Addr::new(198, 51, 100, 201)),
        ("gw2", Ipv4Addr::new(198, 51, 100, 202)),
        ("gw3", Ipv4Addr::new(198, 51, 100, 203)),
    ] {
        let cfg = Config::parse_node(Path::new("fleet.yaml"), FLEET, Some(node)).unwrap();
        // The node folds its resolved config into the shared state: no id
        // changes (only the NAT addresses differ between nodes).
        let folded = state::reconcile(&cfg, &shared).unwrap();
        assert!(
            plink_ctl::fleet::same_shared(&folded, &shared),
            "{node}: ids as shared"
        );
        let model = Model::build(&cfg, &folded).unwrap();
        let spec = plan::plan(&model, &observed, &AllHealthy).unwrap();
        let predicted = predicted.clone();
        golden(&gw, spec, move |bench, n, _| {
            let mut counts = BTreeMap::<Ipv4Addr, u32>::new();
            for (i, want) in predicted.iter().enumerate() {
                let port = 10_000 + i as u16;
                let syn = Ipv4Packet::tcp((CLIENT, port), (EP_TCP, 80), TCP_SYN)
                    .macs(CLIENT_MAC, n.c1_mac)
                    .build();
                let run = bench.raw(prog_names::CONSUMER, n.c1, &syn);
                assert_eq!(run.verdict, verdict::REDIRECT, "{node}: flow {i} forwarded");
                let src = Ipv4Addr::new(
                    run.output[26],
                    run.output[27],
                    run.output[28],
                    run.output[29],
                );
                let dst = Ipv4Addr::new(
                    run.output[30],
                    run.output[31],
                    run.output[32],
                    run.output[33],
                );
                assert_eq!(
                    dst, *want,
                    "{node}: flow from port {port} goes to the predicted backend"
                );
                assert_eq!(
                    src, nat,
                    "{node}: flow {i} is NATed to the node's own address"
                );
                *counts.entry(dst).or_default() += 1;
            }
            println!("fleet: {node}: 1000 flows matched the prediction, backends {counts:?}");
        });
    }
}
