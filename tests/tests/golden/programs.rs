//! What the verifier accepted, and the managed neighbours the controller
//! keeps: no packets, kept next to the golden cases since they share the
//! gateway namespace.

use super::*;

/// Loads both programs and prints what the verifier accepted, so CI logs show
/// program growth.
#[test]
fn verified_program_sizes() {
    netns::require_root_and_tools();
    let mut dp = Dataplane::load_with(EBPF_OBJECT, None, Sizes::default()).unwrap();
    dp.load_programs().unwrap();
    // The benchmark reference forwarder ships in the same object: it must
    // pass the verifier too, although plink-ctl never loads it.
    dp.program(prog_names::BENCH_FWD).unwrap().load().unwrap();
    for name in [
        prog_names::CONSUMER,
        prog_names::PROVIDER,
        prog_names::CONSUMER6,
        prog_names::PROVIDER6,
        prog_names::NAT64_ERROR,
        prog_names::BENCH_FWD,
    ] {
        let info = dp.program(name).unwrap().info().unwrap();
        let verified = info.verified_instruction_count().unwrap_or(0);
        println!(
            "{name}: verified_insns={verified} xlated_bytes={} jited_bytes={}",
            info.size_translated().unwrap_or(0),
            info.size_jitted()
        );
        let stack = stack_use(info.id());
        println!("{name}: stack bytes per BPF function (xlated dump): {stack:?}");
        assert!(!stack.is_empty(), "{name}: bpftool listed its functions");
        assert!(
            verified > 0,
            "{name}: the kernel reports verified instructions"
        );
        assert!(
            verified < 200_000,
            "{name}: stays well inside the verifier's 1M limit"
        );
    }
}

/// Deepest `r10` (frame pointer) offset of each BPF function of program `id`,
/// read from `bpftool prog dump xlated`: the stack each function uses. The
/// verifier's limit is 512 bytes along any call chain.
fn stack_use(id: u32) -> Vec<(String, u32)> {
    let out = std::process::Command::new("bpftool")
        .args(["prog", "dump", "xlated", "id", &id.to_string()])
        .output()
        .expect("bpftool is installed (cargo xtask setup)");
    assert!(out.status.success(), "bpftool prog dump xlated id {id}");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut funcs: Vec<(String, u32)> = Vec::new();
    for line in text.lines() {
        // Function headers look like `int name(...):` or `name:`.
        let t = line.trim();
        if !t.starts_with(';') && t.ends_with(':') && !t.starts_with(|c: char| c.is_ascii_digit()) {
            let name = t.trim_end_matches(':');
            let name = name.split('(').next().unwrap_or(name);
            let name = name.rsplit(' ').next().unwrap_or(name);
            funcs.push((name.to_string(), 0));
            continue;
        }
        let mut rest = t;
        while let Some(i) = rest.find("(r10 -") {
            rest = &rest[i + 6..];
            let n: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            if let (Ok(n), Some(last)) = (n.parse::<u32>(), funcs.last_mut()) {
                last.1 = last.1.max(n);
            }
        }
    }
    funcs
}

#[test]
fn managed_neighbours_are_created_once_and_removed() {
    use plink_ctl::dataplane::neigh::{self, NeighOutcome};
    let gw = gateway();
    let p0 = gw.p0;
    // Both families: an ARP entry and a neighbour-discovery one.
    for backend in [
        std::net::IpAddr::from(Ipv4Addr::new(198, 51, 100, 77)),
        "2001:db8:100::77".parse().unwrap(),
    ] {
        let outcomes = gw
            .host
            .run_in(move || -> anyhow::Result<Vec<NeighOutcome>> {
                Ok(vec![
                    neigh::ensure_managed(p0, backend)?,
                    neigh::ensure_managed(p0, backend)?,
                ])
            })
            .unwrap()
            .unwrap();
        assert_eq!(
            outcomes,
            vec![NeighOutcome::Created, NeighOutcome::Exists],
            "{backend}"
        );
        let show = |gw: &Gw| {
            gw.host
                .ip(&["neigh", "show", &backend.to_string(), "dev", "p0"])
                .unwrap()
        };
        let shown = show(&gw);
        assert!(shown.contains("managed"), "{backend}: {shown:?}");
        gw.host
            .run_in(move || -> anyhow::Result<()> {
                neigh::remove(p0, backend)?;
                neigh::remove(p0, backend)
            })
            .unwrap()
            .unwrap();
        assert_eq!(show(&gw).trim(), "", "{backend} removed");
    }
}
