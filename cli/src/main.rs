//! `berth`: the Berth command line client.

use std::io::Write;

fn main() {
    // One crypto provider for the process (ring); an error only means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "Error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(berth_cli::run(std::env::args_os())) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "Error: {e}");
            1
        }
    };
    let _ = std::io::stdout().flush();
    // Exit without waiting for a blocked stdin reader (exec) to finish.
    std::process::exit(code);
}
