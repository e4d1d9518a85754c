//! Rates as `tc(8)` writes them: `"20mbit"`, `"1.5gbit"`, `"500kbps"`.

use std::fmt;

/// A rate in bits per second, parsed from `tc(8)`'s notation (section "RATES"): a decimal
/// number and a unit, case-insensitive. Bits: `bit` (or no unit), `kbit`, `mbit`, `gbit`,
/// `tbit` (powers of 1000), `kibit`, `mibit`, `gibit`, `tibit` (powers of 1024). Bytes:
/// `bps`, `kbps`, `mbps`, `gbps`, `tbps`, `kibps`, `mibps`, `gibps`, `tibps` (8 bits each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(u64);

/// The units, longest first so that `kbit` is not read as `k` + `bit`.
const UNITS: &[(&str, u64)] = &[
    ("kibit", 1 << 10),
    ("mibit", 1 << 20),
    ("gibit", 1 << 30),
    ("tibit", 1 << 40),
    ("kibps", 8 << 10),
    ("mibps", 8 << 20),
    ("gibps", 8 << 30),
    ("tibps", 8 << 40),
    ("kbit", 1_000),
    ("mbit", 1_000_000),
    ("gbit", 1_000_000_000),
    ("tbit", 1_000_000_000_000),
    ("kbps", 8_000),
    ("mbps", 8_000_000),
    ("gbps", 8_000_000_000),
    ("tbps", 8_000_000_000_000),
    ("bit", 1),
    ("bps", 8),
];

/// The fastest rate accepted: HTB keeps rates in bytes per second as a `u64`
/// (`TCA_HTB_RATE64`), and no link is near this.
const MAX_BITS: u64 = 1 << 50;

impl Rate {
    /// `bits` bits per second.
    pub const fn from_bits(bits: u64) -> Rate {
        Rate(bits)
    }

    /// Bits per second.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Bytes per second (rounded down), what the kernel's `tc_ratespec` holds.
    pub const fn bytes(self) -> u64 {
        self.0 / 8
    }
}

impl std::str::FromStr for Rate {
    type Err = String;

    /// Parses `"20mbit"` and the like (see [`Rate`]).
    ///
    /// # Errors
    /// A message naming the problem: not a number, an unknown unit (with the known ones), zero,
    /// or faster than 2^50 bit/s.
    fn from_str(text: &str) -> Result<Rate, String> {
        let t = text.trim().to_ascii_lowercase();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let unit = unit.trim();
        if number.is_empty() {
            return Err(format!(
                "'{text}' is not a rate: write a number and a unit, such as \"20mbit\""
            ));
        }
        let value: f64 = number
            .parse()
            .map_err(|_| format!("'{text}' is not a rate: '{number}' is not a number"))?;
        let scale = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(u, _)| *u == unit)
                .map(|(_, s)| *s)
                .ok_or_else(|| {
                    format!(
                        "'{text}': unknown unit '{unit}' (bit, kbit, mbit, gbit, tbit, kibit... for \
                         bits per second; bps, kbps, mbps, gbps, tbps, kibps... for bytes, as tc \
                         writes rates)"
                    )
                })?
        };
        let bits = value * scale as f64;
        if !bits.is_finite() || bits >= MAX_BITS as f64 {
            return Err(format!(
                "'{text}' is faster than any link (at most 2^50 bit/s)"
            ));
        }
        let bits = bits.round() as u64;
        if bits < 8 {
            return Err(format!(
                "'{text}' is not a usable rate: it must be at least 8bit (one byte per second)"
            ));
        }
        Ok(Rate(bits))
    }
}

impl fmt::Display for Rate {
    /// The largest SI bit unit that divides the rate exactly: `20mbit`, `1500kbit`, `7bit`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, scale) in [
            ("tbit", 1_000_000_000_000u64),
            ("gbit", 1_000_000_000),
            ("mbit", 1_000_000),
            ("kbit", 1_000),
        ] {
            if self.0 >= scale && self.0.is_multiple_of(scale) {
                return write!(f, "{}{unit}", self.0 / scale);
            }
        }
        write!(f, "{}bit", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc_units() {
        for (text, bits) in [
            ("20mbit", 20_000_000),
            ("20Mbit", 20_000_000),
            ("1.5gbit", 1_500_000_000),
            ("100kbit", 100_000),
            ("1mibit", 1 << 20),
            ("500kbps", 4_000_000),
            ("1mibps", 8 << 20),
            ("12bps", 96),
            ("1000", 1000),
            ("64bit", 64),
            (" 2 mbit ", 2_000_000),
            ("1tbit", 1_000_000_000_000),
        ] {
            assert_eq!(text.parse::<Rate>().unwrap().bits(), bits, "{text}");
        }
        assert_eq!("20mbit".parse::<Rate>().unwrap().bytes(), 2_500_000);
    }

    #[test]
    fn bad_rates_say_why() {
        for (text, needle) in [
            ("", "not a rate"),
            ("mbit", "not a rate"),
            ("fast", "not a rate"),
            ("1.2.3mbit", "not a number"),
            ("20mb", "unknown unit 'mb'"),
            ("20 megabits", "unknown unit"),
            ("0mbit", "at least 8bit"),
            ("0.5bit", "at least 8bit"),
            ("2000tbit", "faster than any link"),
            ("-5mbit", "not a rate"),
        ] {
            let err = text.parse::<Rate>().unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        for (bits, text) in [
            (20_000_000, "20mbit"),
            (1_500_000, "1500kbit"),
            (7, "7bit"),
            (2_000_000_000, "2gbit"),
        ] {
            assert_eq!(Rate::from_bits(bits).to_string(), text);
        }
    }
}
