//! Viscum's TC-ingress classifier.
//!
//! # Layout
//!
//! * [`parse`]: Ethernet / VLAN / IPv4 / IPv6 / TCP / UDP, every access bounds-checked.
//! * [`lookup`]: the services map and its exact-port-then-all-ports precedence.
//! * [`redirect`]: VLAN pop, MAC rewrite and the redirect helpers.
//! * [`counters`]: global per-CPU counters and the runtime config.
//!
//! Everything the program does not redirect leaves with `TC_ACT_OK` and
//! unmodified: Viscum must never touch traffic that is not its own.
#![no_std]
#![no_main]

mod counters;
mod lookup;
mod parse;
mod redirect;

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use aya_log_ebpf::debug;
use viscum_common::GlobalCounter;

use crate::parse::{ParseError, Parsed};

#[classifier]
pub fn viscum_ingress(ctx: TcContext) -> i32 {
    counters::bump(GlobalCounter::Seen);
    match try_ingress(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

/// Every exit names its TC action; `Err` carries the action for packets the
/// classifier could not or would not handle (always `TC_ACT_OK`).
#[inline(always)]
fn try_ingress(ctx: &TcContext) -> Result<i32, i32> {
    let parsed = match parse::parse(ctx) {
        Ok(p) => p,
        Err(ParseError::NotIp) => return Err(pass()),
        Err(ParseError::Fragment) => {
            // All fragments of a datagram must take the same path, and only
            // the first one carries ports: never redirect any of them.
            counters::bump(GlobalCounter::Fragments);
            return Err(pass());
        }
        Err(ParseError::Malformed) => {
            counters::bump(GlobalCounter::Unparsable);
            return Err(pass());
        }
    };
    let Parsed { key, l2_vlan } = parsed;
    let Some(entry) = lookup::find(&key) else {
        if counters::log_enabled() {
            debug!(ctx, "miss proto={} port={}", key.proto, u16::from_be(key.port));
        }
        return Ok(pass());
    };
    // SAFETY: per-CPU value, only this CPU writes it while we run.
    let entry = unsafe { &mut *entry };
    entry.packets += 1;
    entry.bytes += u64::from(ctx.len());
    let action = redirect::redirect(ctx, entry, l2_vlan);
    if action == aya_ebpf::bindings::TC_ACT_REDIRECT as i32 {
        counters::bump(GlobalCounter::Redirected);
    } else {
        counters::bump(GlobalCounter::RedirectErrors);
    }
    if counters::log_enabled() {
        debug!(
            ctx,
            "hit proto={} port={} -> ifindex {} action {}",
            key.proto,
            u16::from_be(key.port),
            entry.ifindex,
            action
        );
    }
    Ok(action)
}

#[inline(always)]
fn pass() -> i32 {
    counters::bump(GlobalCounter::Passed);
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
