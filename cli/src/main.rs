//! The `meshvpn` command.

mod demo;
mod forward;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "meshvpn",
    version,
    about = "Userspace WireGuard mesh, userspace TCP/IP and the k3s supervisor tunnel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a mesh of engines on loopback (no root) and show handshakes, traffic and stats
    Demo(demo::DemoArgs),
    /// Forward ports through the userspace stack (no root, no TUN)
    Forward(forward::ForwardArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Forward(args) => forward::run(args),
    };
    if let Err(e) = result {
        eprintln!("meshvpn: {e}");
        std::process::exit(1);
    }
}
