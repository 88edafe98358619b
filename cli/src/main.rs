//! The `meshvpn` command.

mod tunnel;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "meshvpn",
    version,
    about = "libmeshvpn: userspace WireGuard, userspace TCP/IP and the k3s supervisor tunnel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Websocket supervisor tunnel (k3s / rancher/remotedialer compatible).
    Tunnel(tunnel::TunnelArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Tunnel(args) => tunnel::run(args),
    };
    if let Err(e) = result {
        eprintln!("meshvpn: {e}");
        std::process::exit(1);
    }
}
