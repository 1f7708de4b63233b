//! `berth-bench` (`make bench`): Berth beside LXD on this machine, scenario by scenario; see
//! docs/benchmarks.md.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let opts = berth_tests::bench::Options::parse();
    match berth_tests::bench::run(opts) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("berth-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
