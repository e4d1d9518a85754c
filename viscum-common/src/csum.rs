//! Incremental Internet checksum updates (RFC 1071, RFC 1624) for the classifier's rewrites.
//!
//! Pure functions over bytes as they lie in the packet, so the classifier can update the
//! IPv4 header checksum in place instead of calling `bpf_l3_csum_replace`, and user space
//! can test them against a full recomputation.

/// The IPv4 header checksum `check` (as stored, network order) once a 4-byte address in
/// the header changes from the first four bytes of `old` to those of `new`: RFC 1624,
/// equation 3 (HC' = ~(~HC + ~m + m')), in 16-bit words as they lie in memory (a
/// one's-complement sum does not depend on byte order, RFC 1071 section 2(B)).
#[inline(always)]
pub fn ip_csum_replace4(check: [u8; 2], old: &[u8; 16], new: &[u8; 16]) -> [u8; 2] {
    let w = |a: u8, b: u8| u32::from(u16::from_ne_bytes([a, b]));
    let sum = w(!check[0], !check[1])
        + w(!old[0], !old[1])
        + w(!old[2], !old[3])
        + w(new[0], new[1])
        + w(new[2], new[3]);
    (!fold16(sum)).to_ne_bytes()
}

/// The IPv4 header checksum `check` once the 16-bit word `old` (two header bytes in memory
/// order) becomes `new`: RFC 1624, equation 3.
#[inline(always)]
pub fn ip_csum_replace2(check: [u8; 2], old: [u8; 2], new: [u8; 2]) -> [u8; 2] {
    let w = |b: [u8; 2]| u32::from(u16::from_ne_bytes(b));
    let sum = w([!check[0], !check[1]]) + w([!old[0], !old[1]]) + w(new);
    (!fold16(sum)).to_ne_bytes()
}

/// Folds a sum of at most a few 16-bit words to 16 bits with end-around carry.
#[inline(always)]
fn fold16(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// The 32-bit one's-complement difference of two 16-byte addresses, as `bpf_csum_diff(old,
/// 16, new, 16, 0)` returns it (sum of `new`'s words and of `old`'s complemented words, with
/// end-around carry): the `to` of a size-0 `bpf_l4_csum_replace`. Computed inline by the
/// classifier, which spares a helper call and the two aligned stack copies the helper needs.
#[inline(always)]
pub fn csum_diff16(old: &[u8; 16], new: &[u8; 16]) -> u32 {
    let mut sum: u64 = 0;
    for i in 0..4 {
        let o = u32::from_ne_bytes([old[4 * i], old[4 * i + 1], old[4 * i + 2], old[4 * i + 3]]);
        let n = u32::from_ne_bytes([new[4 * i], new[4 * i + 1], new[4 * i + 2], new[4 * i + 3]]);
        sum += u64::from(n) + u64::from(!o);
    }
    let s = (sum & 0xffff_ffff) + (sum >> 32);
    ((s & 0xffff_ffff) + (s >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Internet checksum of `bytes` (RFC 1071), as stored in a header.
    fn full(bytes: &[u8]) -> [u8; 2] {
        let mut sum = 0u32;
        for c in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        (!(sum as u16)).to_be_bytes()
    }

    /// A deterministic stream of bytes (xorshift), so a failure names its case.
    fn bytes(seed: &mut u64, out: &mut [u8]) {
        for b in out {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *b = *seed as u8;
        }
    }

    /// A random IPv4 header with a TTL of at least 2 and a valid checksum.
    fn header(seed: &mut u64) -> [u8; 20] {
        let mut h = [0u8; 20];
        bytes(seed, &mut h);
        h[8] = h[8].max(2);
        h[10] = 0;
        h[11] = 0;
        let c = full(&h);
        h[10..12].copy_from_slice(&c);
        h
    }

    /// Writes `check` into header `h` and asserts that the header verifies.
    fn assert_verifies(h: &mut [u8; 20], check: [u8; 2], case: usize) {
        h[10..12].copy_from_slice(&check);
        assert_eq!(
            full(h),
            [0, 0],
            "case {case}: header {h:02x?} does not verify"
        );
    }

    #[test]
    fn an_address_rewrite_gives_the_recomputed_header_checksum() {
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        for case in 0..20_000 {
            let mut h = header(&mut seed);
            let mut new = [0u8; 16];
            bytes(&mut seed, &mut new[..4]);
            if case % 7 == 0 {
                // Words that sum to 0xffff / 0x0000 are where one's-complement updates go
                // wrong (RFC 1624 section 3).
                new[..4].copy_from_slice(&[0xff, 0xff, 0, 0]);
            }
            let at = if case % 2 == 0 { 12 } else { 16 };
            let mut old = [0u8; 16];
            old[..4].copy_from_slice(&h[at..at + 4]);
            let check = ip_csum_replace4([h[10], h[11]], &old, &new);
            h[at..at + 4].copy_from_slice(&new[..4]);
            assert_verifies(&mut h, check, case);
        }
    }

    #[test]
    fn a_ttl_decrement_gives_the_recomputed_header_checksum() {
        let mut seed = 0x2545_f491_4f6c_dd1d;
        for case in 0..20_000 {
            let mut h = header(&mut seed);
            let old = [h[8], h[9]];
            let new = [h[8] - 1, h[9]];
            let check = ip_csum_replace2([h[10], h[11]], old, new);
            h[8] = new[0];
            assert_verifies(&mut h, check, case);
        }
    }

    #[test]
    fn the_address_difference_is_what_bpf_csum_diff_computes() {
        // bpf_csum_diff(old, 16, new, 16, 0) = csum_partial(new) + csum_partial(~old): the
        // 32-bit one's-complement sum of the words. Equal modulo 0xffff once folded.
        let mut seed = 0xdead_beef_cafe_f00d;
        for case in 0..20_000 {
            let (mut old, mut new) = ([0u8; 16], [0u8; 16]);
            bytes(&mut seed, &mut old);
            bytes(&mut seed, &mut new);
            let d = csum_diff16(&old, &new);
            // Applied to a checksum over `old`, the difference must give the one over `new`.
            let before = full(&old);
            let mut sum = u32::from(!u16::from_ne_bytes(before));
            sum = sum.wrapping_add(d & 0xffff).wrapping_add(d >> 16);
            let mut s = u64::from(sum);
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            let after = (!(s as u16)).to_ne_bytes();
            let want = full(&new);
            // One's complement has two zeros: 0x0000 and 0xffff are the same sum.
            let same = after == want
                || (after == [0, 0] && want == [0xff, 0xff])
                || (after == [0xff, 0xff] && want == [0, 0]);
            assert!(
                same,
                "case {case}: {old:02x?} -> {new:02x?} gave {after:02x?}, want {want:02x?}"
            );
        }
    }
}
