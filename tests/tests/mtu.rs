//! End to end: path MTU towards backends and TCP MSS clamping (issue 15) on
//! the reference topology (`plink_tests::privatelink`), with a consumer link
//! whose gateway side has MTU 1200 while the client's side keeps 1500, so
//! the client offers MSS 1460 and the backend's full-size segments do not
//! fit the consumer interface.

use plink_tests::{
    gateway::Gateway,
    netns,
    privatelink::{self as pl, PrivateLink},
    servers,
};

const DOWNLOAD: usize = 2 << 20;
const FRAG_NEEDED_SENT: &str = "plink_service_frag_needed_sent_total{service=\"orders\"}";

fn with_small_consumer_link() -> PrivateLink {
    let net = PrivateLink::build().unwrap();
    net.gw.ip(&["link", "set", "c1", "mtu", "1200"]).unwrap();
    net
}

/// What the backend that served `reply` caches as the path MTU to the NAT
/// address.
fn backend_route(net: &PrivateLink, reply: &servers::Reply) -> String {
    net.provider
        .exec(
            "ip",
            &[
                "route",
                "get",
                &pl::ORDERS_NAT.to_string(),
                "from",
                &reply.local.ip().to_string(),
            ],
        )
        .unwrap()
}

/// Without clamping, path MTU discovery does it: plink answers the
/// backend's oversized segments with fragmentation needed (MTU 1200) from
/// the NAT address, the backend lowers its segments, the download arrives
/// whole.
#[test]
fn a_small_consumer_mtu_reaches_the_backend_as_frag_needed() {
    netns::require_root_and_tools();
    let mut net = with_small_consumer_link();
    let plink = net.start_plink().unwrap();
    let reply = servers::tcp_request(&net.consumer_a, None, pl::endpoint_tcp(), DOWNLOAD)
        .expect("the download completes");
    assert_eq!(reply.body_len, DOWNLOAD);
    let scrape = plink.scrape(&net.gw).unwrap();
    assert!(
        Gateway::sample(&scrape, FRAG_NEEDED_SENT) > 0,
        "the backend was told about the consumer MTU:\n{scrape}"
    );
    let cache = backend_route(&net, &reply);
    assert!(
        cache.contains("mtu 1200"),
        "the backend learned the path MTU: {cache}"
    );
}

/// With `mss_clamp: auto` the handshake already settles on MSS 1160
/// (1200 - 40), in both directions: no segment is too big, no ICMP is
/// needed, the backend caches no path MTU.
#[test]
fn mss_clamp_auto_fits_a_small_consumer_mtu_without_icmp() {
    netns::require_root_and_tools();
    let mut net = with_small_consumer_link();
    let plink = net
        .start_plink_with(&pl::Options {
            orders_extra: "    mss_clamp: auto\n".into(),
            ..Default::default()
        })
        .unwrap();
    let reply = servers::tcp_request(&net.consumer_a, None, pl::endpoint_tcp(), DOWNLOAD)
        .expect("the download completes");
    assert_eq!(reply.body_len, DOWNLOAD);
    let scrape = plink.scrape(&net.gw).unwrap();
    assert_eq!(Gateway::sample(&scrape, FRAG_NEEDED_SENT), 0, "{scrape}");
    assert_eq!(Gateway::drops(&scrape, "frag_needed"), 0, "{scrape}");
    for dir in ["in", "out"] {
        let series =
            format!("plink_service_mss_clamped_total{{service=\"orders\",direction=\"{dir}\"}}");
        assert!(
            Gateway::sample(&scrape, &series) >= 1,
            "{series} counts the clamped handshake:\n{scrape}"
        );
    }
    let cache = backend_route(&net, &reply);
    assert!(!cache.contains("mtu"), "no path MTU learned: {cache}");
}
