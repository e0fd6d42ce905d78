//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weights.
//!
//! The table maps `flow_hash % size` to a backend. Building it is pure and
//! deterministic: the same backends and weights give the same table in any
//! listing order, so a restarted controller and the datapath always agree,
//! and removing one backend moves only about `1/N` of the entries.

use std::net::IpAddr;

/// Default table size: a prime well above any realistic backend count.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;

/// One backend as the table builder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Identity used for hashing: the backend address and target port, so a
    /// backend keeps its preferences whatever else changes.
    pub address: IpAddr,
    pub port: u16,
    /// Relative share of the table; 0 means the backend gets no entry.
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error("Maglev table size {0} is not a prime")]
    NotPrime(u32),
    #[error("Maglev table size {size} must exceed the number of backends ({backends})")]
    TooSmall { size: u32, backends: usize },
    #[error("two backends share the identity {0}:{1}")]
    Duplicate(IpAddr, u16),
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// FNV-1a over the backend identity with a seed: stable across Rust versions
/// and platforms (std's hashers promise neither).
fn identity_hash(backend: &MaglevBackend, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    // An IPv4 backend hashes its 4 octets as before IPv6, so its tables
    // (and every node's) stay what they were.
    let octets: Vec<u8> = match backend.address {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    for b in octets.iter().chain(backend.port.to_be_bytes().iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche (splitmix64) so nearby addresses spread over the table.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Builds the lookup table: entry `i` holds an index into `backends`.
///
/// Returns an empty table when no backend has a positive weight (the datapath
/// then has no backend to choose and drops new flows with its own reason).
pub fn build_table(backends: &[MaglevBackend], size: u32) -> Result<Vec<u32>, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::NotPrime(size));
    }
    if backends.len() >= size as usize {
        return Err(MaglevError::TooSmall {
            size,
            backends: backends.len(),
        });
    }
    // Canonical order: listing order must not matter.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| (backends[i].address, backends[i].port));
    for pair in order.windows(2) {
        let (a, b) = (&backends[pair[0]], &backends[pair[1]]);
        if a.address == b.address && a.port == b.port {
            return Err(MaglevError::Duplicate(a.address, a.port));
        }
    }
    order.retain(|&i| backends[i].weight > 0);
    if order.is_empty() {
        return Ok(Vec::new());
    }
    let m = u64::from(size);
    let max_weight = order
        .iter()
        .map(|&i| u64::from(backends[i].weight))
        .max()
        .unwrap_or(1);
    // Permutation of each backend: offset + j * skip (mod m), skip in [1, m-1].
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let offset = identity_hash(&backends[i], 0x5eed_0001) % m;
            let skip = identity_hash(&backends[i], 0x5eed_0002) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; order.len()];
    // Weighted turns: each round a backend earns its weight and takes one slot
    // per `max_weight` earned, so shares follow the weights.
    let mut credit = vec![0u64; order.len()];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    'rounds: loop {
        for (k, &i) in order.iter().enumerate() {
            credit[k] += u64::from(backends[i].weight);
            while credit[k] >= max_weight {
                credit[k] -= max_weight;
                let (offset, skip) = perms[k];
                // Next preferred slot that is still free.
                let slot = loop {
                    let c = (offset + next[k] * skip) % m;
                    next[k] += 1;
                    if table[c as usize] == u32::MAX {
                        break c;
                    }
                };
                table[slot as usize] = i as u32;
                filled += 1;
                if filled == m {
                    break 'rounds;
                }
            }
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(last: u8, weight: u32) -> MaglevBackend {
        MaglevBackend {
            address: std::net::Ipv4Addr::new(198, 51, 100, last).into(),
            port: 8080,
            weight,
        }
    }

    fn shares(table: &[u32], n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; n];
        for &e in table {
            counts[e as usize] += 1;
        }
        counts
            .iter()
            .map(|&c| c as f64 / table.len() as f64)
            .collect()
    }

    #[test]
    fn primes() {
        assert!(is_prime(65_537) && is_prime(13) && is_prime(2));
        assert!(!is_prime(65_536) && !is_prime(1) && !is_prime(0) && !is_prime(65_535));
    }

    /// Golden vectors: a change here remaps live flows after an upgrade, so it
    /// must be deliberate.
    #[test]
    fn golden_small_table() {
        let backends = [backend(10, 1), backend(11, 1), backend(12, 2)];
        let table = build_table(&backends, 13).unwrap();
        assert_eq!(table, GOLDEN_13);
        let first: Vec<u32> = build_table(&backends, DEFAULT_TABLE_SIZE).unwrap()[..16].to_vec();
        assert_eq!(first, GOLDEN_65537_PREFIX);
    }

    const GOLDEN_13: [u32; 13] = [2, 1, 1, 2, 2, 1, 2, 2, 0, 2, 0, 2, 0];
    const GOLDEN_65537_PREFIX: [u32; 16] = [0, 2, 1, 0, 2, 2, 0, 2, 2, 1, 2, 1, 0, 2, 2, 1];

    #[test]
    fn every_slot_filled_with_a_valid_backend() {
        let backends: Vec<_> = (1..=7).map(|i| backend(i, u32::from(i))).collect();
        let table = build_table(&backends, DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(table.len(), DEFAULT_TABLE_SIZE as usize);
        assert!(table.iter().all(|&e| (e as usize) < backends.len()));
    }

    #[test]
    fn shares_follow_weights_within_one_point() {
        let weight_sets: [&[u32]; 5] = [
            &[1, 1, 1],
            &[1, 2, 3, 4],
            &[10, 1],
            &[5, 5, 2, 7, 9, 1, 3],
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        ];
        for weights in weight_sets {
            let backends: Vec<_> = weights
                .iter()
                .enumerate()
                .map(|(i, &w)| backend(10 + i as u8, w))
                .collect();
            let table = build_table(&backends, DEFAULT_TABLE_SIZE).unwrap();
            let total: u32 = weights.iter().sum();
            for (i, share) in shares(&table, backends.len()).iter().enumerate() {
                let want = f64::from(weights[i]) / f64::from(total);
                assert!(
                    (share - want).abs() <= 0.01,
                    "weights {weights:?}: backend {i} has {share:.4}, wants {want:.4}"
                );
            }
        }
    }

    #[test]
    fn removing_one_backend_moves_little() {
        for n in [3usize, 5, 10, 20] {
            let backends: Vec<_> = (0..n).map(|i| backend(10 + i as u8, 1)).collect();
            let before = build_table(&backends, DEFAULT_TABLE_SIZE).unwrap();
            let removed = n / 2;
            let mut rest = backends.clone();
            rest.remove(removed);
            let after = build_table(&rest, DEFAULT_TABLE_SIZE).unwrap();
            // Compare by identity, not index: indices shift after removal.
            let moved = before
                .iter()
                .zip(&after)
                .filter(|&(&b, &a)| backends[b as usize] != rest[a as usize])
                .count();
            let moved = moved as f64 / before.len() as f64;
            let bound = 1.0 / n as f64 + 0.02;
            assert!(
                moved <= bound,
                "n={n}: {moved:.4} of entries moved, bound {bound:.4}"
            );
        }
    }

    #[test]
    fn listing_order_does_not_matter() {
        let backends: Vec<_> = (0..6)
            .map(|i| backend(10 + i, u32::from(i % 3) + 1))
            .collect();
        let table = build_table(&backends, DEFAULT_TABLE_SIZE).unwrap();
        let mut reversed = backends.clone();
        reversed.reverse();
        let table_rev = build_table(&reversed, DEFAULT_TABLE_SIZE).unwrap();
        let ids = |t: &[u32], b: &[MaglevBackend]| -> Vec<MaglevBackend> {
            t.iter().map(|&e| b[e as usize]).collect()
        };
        assert_eq!(ids(&table, &backends), ids(&table_rev, &reversed));
    }

    #[test]
    fn refuses_bad_input() {
        assert_eq!(
            build_table(&[backend(1, 1)], 100),
            Err(MaglevError::NotPrime(100))
        );
        let many: Vec<_> = (0..13).map(|i| backend(i, 1)).collect();
        assert!(matches!(
            build_table(&many, 13),
            Err(MaglevError::TooSmall { .. })
        ));
        assert!(matches!(
            build_table(&[backend(1, 1), backend(1, 2)], 13),
            Err(MaglevError::Duplicate(..))
        ));
        assert_eq!(build_table(&[backend(1, 0)], 13), Ok(Vec::new()));
    }
}
