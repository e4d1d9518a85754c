//! The hash the datapath's per-CPU caches place keys with (`viscum-ebpf`'s `cache` and
//! `reply_cache`): shared here so the host can test what the classifier computes.

/// A key of four words hashed to one: MurmurHash3's 32-bit body and finaliser (Austin
/// Appleby, public domain; `MurmurHash3_x86_32` without the length), every bit of every word
/// reaching every bit of the result. The caches index with its top bits.
///
/// Why not fold the words with XOR: fields that vary together cancel. The first flow cache
/// folded the 5-tuple (`client ^ service.rotate_left(16) ^ ports`), which put the service
/// address's low bytes on the client port's bits, and B2's 4,096 flows to 1,000 entries
/// landed in 441 of the 8,192 pairs of slots: three flows in four never stayed cached. Mixed,
/// any set of distinct keys spreads as random ones do (see the tests). Twenty-odd ALU
/// instructions, no memory.
#[inline(always)]
pub fn mix(words: [u32; 4]) -> u32 {
    let mut h: u32 = 0;
    for k in words {
        let k = k
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        h = (h ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64);
    }
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{collections::HashMap, vec::Vec};

    use super::*;

    /// Keys beyond two per pair of slots when `keys` are placed by the top 14 bits of `h`
    /// (one CPU's 16,384 slots of the flow cache, in 8,192 pairs).
    fn overflow(keys: &[[u32; 4]], h: impl Fn([u32; 4]) -> u32) -> usize {
        let mut pairs = HashMap::<u32, usize>::new();
        for k in keys {
            *pairs.entry(h(*k) >> (32 - 14) >> 1).or_default() += 1;
        }
        pairs.values().map(|&n| n.saturating_sub(2)).sum()
    }

    /// A flow as the flow cache hashes it: both addresses (IPv4: one word), then the ports,
    /// protocol and family (ports in network order, read as native words).
    fn flow(client: [u8; 4], service: [u8; 4], sport: u16, dport: u16) -> [u32; 4] {
        let port = |p: u16| u32::from(u16::from_ne_bytes(p.to_be_bytes()));
        [
            u32::from_ne_bytes(client),
            u32::from_ne_bytes(service),
            port(sport) | (port(dport) << 16),
            6 | (2 << 8),
        ]
    }

    #[test]
    fn correlated_flows_spread_like_random_keys() {
        // B2's flows: client port 1024 + f, to entry f * 2654435761 mod 1000 (10.0.x.y).
        let b2: Vec<[u32; 4]> = (0..4096u32)
            .map(|f| {
                let e = 0x0a00_0000 + (u64::from(f) * 2_654_435_761 % 1000) as u32;
                flow([192, 0, 2, 2], e.to_be_bytes(), 1024 + f as u16, 80)
            })
            .collect();
        // A /20 of clients on one port, and one client's sequential ports.
        let clients: Vec<[u32; 4]> = (0..4096u32)
            .map(|i| {
                flow(
                    [10, 0, (i >> 8) as u8, i as u8],
                    [198, 51, 100, 7],
                    40_000,
                    443,
                )
            })
            .collect();
        let ports: Vec<[u32; 4]> = (0..4096u16)
            .map(|i| flow([192, 168, 1, 10], [198, 51, 100, 7], 32_768 + i, 443))
            .collect();
        // 4,096 random keys in 8,192 pairs: ~130 beyond two (Poisson, mean 0.5 per pair).
        for (name, keys) in [("B2", &b2), ("clients", &clients), ("ports", &ports)] {
            let n = overflow(keys, mix);
            assert!(n < 250, "{name}: {n} of 4096 flows beyond two per pair");
        }
        // What the XOR fold did with B2's flows on a little-endian CPU, where the native words
        // put the address's last bytes on the port's bits (on a big-endian one the same fold
        // cancels other patterns instead).
        let fold =
            |k: [u32; 4]| (k[0] ^ k[1].rotate_left(16) ^ k[2] ^ k[3]).wrapping_mul(0x9e37_79b1);
        if cfg!(target_endian = "little") {
            assert!(overflow(&b2, fold) > 3000);
        }
    }
}
