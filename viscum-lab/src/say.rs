//! Printing for tools that must keep going when nobody reads their output any more.
//!
//! `println!` panics when stdout is a pipe whose reader has gone (`cargo xtask run | tee log`,
//! then Ctrl-C: the terminal's SIGINT ends `tee` too). In the lab that panic struck while it
//! was tearing down, so every namespace and the bpffs stayed behind. [`say!`](crate::say!)
//! and [`shout!`](crate::shout!) write a line and ignore write errors: losing the narration is
//! fine, losing the cleanup is not.

use std::{
    fmt,
    io::{self, Write as _},
};

/// Writes one line to stdout; a write error (a closed pipe) is ignored.
pub fn out(args: fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    let _ = out.write_fmt(args);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// Writes one line to stderr; a write error is ignored.
pub fn err(args: fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(args);
    let _ = err.write_all(b"\n");
}

/// `println!` that never panics (see the [module](mod@crate::say)).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::say::out(format_args!($($arg)*)) };
}

/// `eprintln!` that never panics (see the [module](mod@crate::say)).
#[macro_export]
macro_rules! shout {
    ($($arg:tt)*) => { $crate::say::err(format_args!($($arg)*)) };
}
