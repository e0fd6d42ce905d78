//! Chaos: continuous new connections and long-lived streams while plink is
//! reloaded ten times and killed with SIGKILL three times (once mid-reload)
//! and restarted. Zero failed connections, zero resets, every byte intact.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use plink_tests::{
    gateway, netns,
    privatelink::{self as pl, PrivateLink},
    servers,
};

#[test]
fn sixty_seconds_of_reloads_and_kills_lose_nothing() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let mut plink = net.start_plink().unwrap();
    let config_path = plink.config_path.clone();
    let base = std::fs::read_to_string(&config_path).unwrap();

    const STREAM_BYTES: usize = 9 * 1024 * 1024;
    let mut streams = Vec::new();
    for i in 0..10u32 {
        let host = if i.is_multiple_of(2) {
            &net.consumer_a
        } else {
            &net.consumer_b
        };
        streams.push(
            servers::slow_stream(
                host,
                pl::endpoint_tcp(),
                STREAM_BYTES,
                Duration::from_millis(100),
            )
            .unwrap(),
        );
    }

    // Continuous new connections from both consumers.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for host in [net.consumer_a.clone(), net.consumer_b.clone()] {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        clients.push(std::thread::spawn(move || {
            let mut errors = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match servers::tcp_request(&host, None, pl::endpoint_tcp(), 4096) {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        errors.push(format!("{e:#}"));
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
                std::thread::sleep(Duration::from_millis(20));
            }
            errors
        }));
    }

    // Reloads that change something real, alternating two configs.
    let variant = |i: usize| -> String {
        if i.is_multiple_of(2) {
            base.replacen(
                "endpoints:\n",
                "endpoints:\n  - {name: orders-a2, tenant: tenant-a, network: vnet-a, address: 192.0.2.51, service: orders}\n",
                1,
            )
            .replacen("{address: 198.51.100.11}", "{address: 198.51.100.11, weight: 3}", 1)
        } else {
            base.clone()
        }
    };
    let started = Instant::now();
    let (mut reloads, mut kills) = (0, 0);
    // Kills after reloads 2, 5 (mid-reload: SIGHUP then SIGKILL) and 8.
    for i in 0..10 {
        std::fs::write(&config_path, variant(i)).unwrap();
        let child = net.topo.child_mut(plink.child).id() as i32;
        if i == 5 {
            // SAFETY: signals to our own child.
            unsafe { libc::kill(child, libc::SIGHUP) };
            unsafe { libc::kill(child, libc::SIGKILL) };
            reloads += 1;
        } else {
            plink.ctl(&net.gw, &["reload"]).unwrap();
            reloads += 1;
        }
        if i == 2 || i == 5 || i == 8 {
            if i != 5 {
                // SAFETY: signal to our own child.
                unsafe { libc::kill(child, libc::SIGKILL) };
            }
            let _ = net.topo.child_mut(plink.child).wait();
            kills += 1;
            std::thread::sleep(Duration::from_millis(500));
            let gw = net.gw.clone();
            plink = gateway::start(&mut net.topo, &gw, &variant(i)).unwrap();
        }
        std::thread::sleep(Duration::from_secs(4));
    }
    while started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::SeqCst);
    let mut errors = Vec::new();
    for c in clients {
        errors.extend(c.join().unwrap());
    }
    let results: Vec<Result<usize, String>> =
        streams.into_iter().map(|s| s.join().unwrap()).collect();
    let intact = results.iter().filter(|r| **r == Ok(STREAM_BYTES)).count();
    println!(
        "chaos: {} s, {reloads} reloads (one killed mid-way), {kills} SIGKILLs + restarts, {} connections ok, {} failed, {intact}/10 streams intact",
        started.elapsed().as_secs(),
        ok.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst)
    );
    assert!(errors.is_empty(), "failed connections: {errors:#?}");
    assert_eq!(intact, 10, "streams: {results:?}");
    assert!(
        ok.load(Ordering::SeqCst) > 100,
        "too few connections to mean anything"
    );
}
