//! `berth`: the Berth command line client.

use std::io::Write;

fn main() {
    // One crypto provider for the process (ring); an error only means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One thread: a command is a short exchange with the server, and handing work between
    // threads only adds wake-ups (and, on a busy host, scheduling delays) to every round trip.
    // Blocking work (stdin, files, the editor) still runs on tokio's blocking threads.
    let runtime = match tokio::runtime::Builder::new_current_thread()
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
