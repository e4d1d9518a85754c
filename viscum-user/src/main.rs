//! The `viscum` binary: parse the command line, run it, print errors with
//! their causes on one line.

use clap::Parser as _;
use viscum::cli::{self, Cli};

fn main() {
    // Die quietly when the reader of our output goes away (`viscum stats | head`),
    // as command-line tools do, instead of reporting EPIPE as a failure.
    // SAFETY: setting a signal disposition before any other thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    // `trace` exists to show the classifier's debug records.
    let level = match cli.command {
        cli::Command::Trace(_) => cli
            .log_level
            .unwrap_or(log::LevelFilter::Debug)
            .max(log::LevelFilter::Debug),
        cli::Command::Run(_) => cli.log_level.unwrap_or(log::LevelFilter::Info),
        _ => cli.log_level.unwrap_or(log::LevelFilter::Warn),
    };
    let trace = matches!(cli.command, cli::Command::Trace(_));
    let mut logger = env_logger::Builder::new();
    if trace {
        // The classifier's records, which arrive through aya-log as `log` records, in words.
        logger.format(|buf, record| {
            use std::io::Write as _;
            let text = record.args().to_string();
            let described = cli::trace::describe(&text, viscum::engine::interface_name);
            if described == text {
                writeln!(buf, "[{} {}] {text}", record.level(), record.target())
            } else {
                writeln!(buf, "{described}")
            }
        });
    }
    logger
        .filter_level(level)
        // aya's own debug output (feature probing) drowns the records we want.
        .filter_module("aya", level.min(log::LevelFilter::Info))
        .format_timestamp(None)
        .init();
    // One thread is plenty for a CLI and keeps the footprint small on routers.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("viscum: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(cli::run(cli)) {
        eprintln!("viscum: {e:#}");
        std::process::exit(1);
    }
}
