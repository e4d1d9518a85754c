//! The `viscum` binary: parse the command line, run it, print errors with
//! their causes on one line.

use clap::Parser as _;
use viscum::cli::{self, Cli};

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .filter_level(cli.log_level)
        .format_timestamp(None)
        .init();
    // One thread is plenty for a CLI and keeps the footprint small on routers.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
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
